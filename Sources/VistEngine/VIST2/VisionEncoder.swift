import CBLAS
import Foundation
import VistFormats
import VistKernels

/// The vision encoder E (a ViT in the SigLIP layout) and the modal aligner M of VIST2.
///
/// E: 16x16 patches (a conv with stride 16 = a matmul on unfolded patches), plus learned position
/// embeddings; pre-LN blocks `x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))))` with full
/// (bidirectional) multi-head attention; a final post-LayerNorm; no CLS token.
/// M: the s x s neighbouring patch embeddings are concatenated (pixel-unshuffle, row-major
/// within the s x s window), then `v = tanh(x W + b)` maps them to the LLM width.
///
/// Tensor names follow Hugging Face's SigLIP vision model (`vision_model.embeddings...`,
/// `vision_model.encoder.layers.N...`, `vision_model.post_layernorm`), plus `aligner.weight`
/// (d_llm, s²·D) and `aligner.bias`.
public final class VisionEncoder: @unchecked Sendable {
    struct Layer {
        var ln1w: [Float], ln1b: [Float]
        var q: WeightMatrix, k: WeightMatrix, v: WeightMatrix, o: WeightMatrix  // (D, D)
        var qb: [Float], kb: [Float], vb: [Float], ob: [Float]
        var ln2w: [Float], ln2b: [Float]
        var fc1: WeightMatrix, fc1b: [Float]  // (F, D)
        var fc2: WeightMatrix, fc2b: [Float]  // (D, F)
    }

    public let config: VIST2Config.Vision
    public let merge: Int
    public let outputDim: Int
    let patch: WeightMatrix  // (D, C*16*16)
    let patchBias: [Float]
    let positions: [Float]  // (P, D)
    let layers: [Layer]
    let postW: [Float], postB: [Float]
    let aligner: WeightMatrix  // (d, s²D)
    let alignerBias: [Float]
    let file: SafetensorsFile
    let pool: ThreadPool
    let scratch = MatmulScratch()

    public init(file: SafetensorsFile, config: VIST2Config.Vision, merge: Int, outputDim: Int, pool: ThreadPool) throws(FormatError) {
        self.file = file
        self.config = config
        self.merge = merge
        self.outputDim = outputDim
        self.pool = pool
        let D = config.hiddenSize, F = config.intermediateSize, C = config.numChannels
        let e = "vision_model.embeddings."
        guard let pt = file.tensors[e + "patch_embedding.weight"] else {
            throw FormatError(file: file.path, tensor: e + "patch_embedding.weight", problem: .missing("tensor"))
        }
        guard pt.shape == [D, C, 16, 16] else {
            throw FormatError(
                file: file.path, tensor: pt.name, problem: .invalid("shape \(pt.shape) does not match the expected [\(D), \(C), 16, 16]"))
        }
        patch = WeightMatrix(type: pt.type, rows: D, cols: C * 256, data: file.data(of: pt))
        patchBias = try file.floats(e + "patch_embedding.bias", shape: [D])
        positions = try file.floats(e + "position_embedding.weight", shape: [config.patches, D])
        var ls: [Layer] = []
        for i in 0..<config.numLayers {
            let b = "vision_model.encoder.layers.\(i)."
            ls.append(
                Layer(
                    ln1w: try file.floats(b + "layer_norm1.weight", shape: [D]), ln1b: try file.floats(b + "layer_norm1.bias", shape: [D]),
                    q: try file.matrix(b + "self_attn.q_proj.weight", rows: D, cols: D),
                    k: try file.matrix(b + "self_attn.k_proj.weight", rows: D, cols: D),
                    v: try file.matrix(b + "self_attn.v_proj.weight", rows: D, cols: D),
                    o: try file.matrix(b + "self_attn.out_proj.weight", rows: D, cols: D),
                    qb: try file.floats(b + "self_attn.q_proj.bias", shape: [D]),
                    kb: try file.floats(b + "self_attn.k_proj.bias", shape: [D]),
                    vb: try file.floats(b + "self_attn.v_proj.bias", shape: [D]),
                    ob: try file.floats(b + "self_attn.out_proj.bias", shape: [D]),
                    ln2w: try file.floats(b + "layer_norm2.weight", shape: [D]), ln2b: try file.floats(b + "layer_norm2.bias", shape: [D]),
                    fc1: try file.matrix(b + "mlp.fc1.weight", rows: F, cols: D), fc1b: try file.floats(b + "mlp.fc1.bias", shape: [F]),
                    fc2: try file.matrix(b + "mlp.fc2.weight", rows: D, cols: F), fc2b: try file.floats(b + "mlp.fc2.bias", shape: [D])))
        }
        layers = ls
        postW = try file.floats("vision_model.post_layernorm.weight", shape: [D])
        postB = try file.floats("vision_model.post_layernorm.bias", shape: [D])
        aligner = try file.matrix("aligner.weight", rows: outputDim, cols: merge * merge * D)
        alignerBias = try file.floats("aligner.bias", shape: [outputDim])
    }

    /// Visual tokens per image: (H/16)(W/16)/s².
    public var tokensPerImage: Int { config.patches / (merge * merge) }

    /// FLOPs of encoding one image (multiply-add = 2), counted analytically.
    public var flopsPerImage: Int {
        let P = config.patches, D = config.hiddenSize, F = config.intermediateSize
        let perLayer = 2 * P * (4 * D * D + 2 * D * F) + 4 * P * P * D
        return 2 * P * config.numChannels * 256 * D + config.numLayers * perLayer + 2 * tokensPerImage * merge * merge * D * outputDim
    }

    /// Encodes images given as normalised pixels (H*W floats in [-1, 1], one channel; replicated
    /// when the encoder has 3) into visual tokens: returns (images * tokensPerImage, outputDim).
    public func encode(_ images: [[Float]]) -> [Float] {
        var out = [Float](repeating: 0, count: images.count * tokensPerImage * outputDim)
        for (i, img) in images.enumerated() {
            precondition(img.count == config.imageHeight * config.imageWidth, "image size")
            out.withUnsafeMutableBufferPointer { encodeOne(img, into: $0.baseAddress! + i * tokensPerImage * outputDim) }
        }
        return out
    }

    private func encodeOne(_ img: [Float], into out: UnsafeMutablePointer<Float>) {
        let c = config
        let P = c.patches, D = c.hiddenSize, F = c.intermediateSize, C = c.numChannels
        let H = c.numHeads, hd = c.headDim
        var cols = [Float](repeating: 0, count: P * C * 256)  // (P, C*16*16) unfolded patches
        for py in 0..<c.gridHeight {
            for px in 0..<c.gridWidth {
                let p = py * c.gridWidth + px
                for ch in 0..<C {
                    for ky in 0..<16 {
                        for kx in 0..<16 {
                            cols[p * C * 256 + ch * 256 + ky * 16 + kx] = img[(py * 16 + ky) * c.imageWidth + px * 16 + kx]
                        }
                    }
                }
            }
        }
        var x = [Float](repeating: 0, count: P * D)
        var h = [Float](repeating: 0, count: P * D)
        var q = [Float](repeating: 0, count: P * D), k = q, v = q, att = q, tmp = q
        var mid = [Float](repeating: 0, count: P * F)
        let rowsPerThread = (P + pool.size - 1) / pool.size
        var scores = [Float](repeating: 0, count: pool.size * rowsPerThread * P)
        func linear(_ w: WeightMatrix, _ bias: [Float], _ input: [Float], _ output: inout [Float], _ n: Int) {
            input.withUnsafeBufferPointer { ip in
                output.withUnsafeMutableBufferPointer { op in
                    Matmul.forward(w, x: ip.baseAddress!, y: op.baseAddress!, n: n, pool: pool, scratch: scratch)
                    for r in 0..<n { for j in 0..<w.rows { op[r * w.rows + j] += bias[j] } }
                }
            }
        }
        func layerNorm(_ input: [Float], _ w: [Float], _ b: [Float], _ output: inout [Float]) {
            for r in 0..<P {
                var mean = 0.0, sq = 0.0
                for j in 0..<D { mean += Double(input[r * D + j]) }
                mean /= Double(D)
                for j in 0..<D {
                    let d = Double(input[r * D + j]) - mean
                    sq += d * d
                }
                let inv = 1 / (sq / Double(D) + Double(c.layerNormEps)).squareRoot()
                for j in 0..<D { output[r * D + j] = Float((Double(input[r * D + j]) - mean) * inv) * w[j] + b[j] }
            }
        }
        // Patch embedding + position embedding.
        linear(patch, patchBias, cols, &x, P)
        for i in 0..<(P * D) { x[i] += positions[i] }
        let scale = 1 / Float(hd).squareRoot()
        for L in layers {
            layerNorm(x, L.ln1w, L.ln1b, &h)
            linear(L.q, L.qb, h, &q, P)
            linear(L.k, L.kb, h, &k, P)
            linear(L.v, L.vb, h, &v, P)
            // Full attention, the query rows split over the pool's threads: each thread scores
            // its rows against all keys, one head at a time, with single-threaded sgemm.
            q.withUnsafeBufferPointer { qp in
                k.withUnsafeBufferPointer { kp in
                    v.withUnsafeBufferPointer { vp in
                        att.withUnsafeMutableBufferPointer { ap in
                            scores.withUnsafeMutableBufferPointer { sb in
                                let (q0, k0, v0) = (qp.baseAddress!, kp.baseAddress!, vp.baseAddress!)
                                let (a0, s0) = (ap.baseAddress!, sb.baseAddress!)
                                pool.parallel { ith, nth in
                                    let rows = ThreadPool.slice(P, ith, nth)
                                    guard !rows.isEmpty else { return }
                                    let n = Int32(rows.count), sp = s0 + ith * rowsPerThread * P
                                    for head in 0..<H {
                                        let col = rows.lowerBound * D + head * hd
                                        cblas_sgemm(
                                            CblasRowMajor, CblasNoTrans, CblasTrans, n, Int32(P), Int32(hd), scale,
                                            q0 + col, Int32(D), k0 + head * hd, Int32(D), 0, sp, Int32(P))
                                        for r in 0..<rows.count { Ops.softmax(sp + r * P, n: P) }
                                        cblas_sgemm(
                                            CblasRowMajor, CblasNoTrans, CblasNoTrans, n, Int32(hd), Int32(P), 1,
                                            sp, Int32(P), v0 + head * hd, Int32(D), 0, a0 + col, Int32(D))
                                    }
                                }
                            }
                        }
                    }
                }
            }
            linear(L.o, L.ob, att, &tmp, P)
            for i in 0..<(P * D) { x[i] += tmp[i] }
            layerNorm(x, L.ln2w, L.ln2b, &h)
            linear(L.fc1, L.fc1b, h, &mid, P)
            mid.withUnsafeMutableBufferPointer { mp in
                let m0 = mp.baseAddress!
                pool.parallel { ith, nth in
                    let rows = ThreadPool.slice(P, ith, nth)
                    Ops.geluTanh(m0 + rows.lowerBound * F, n: rows.count * F)
                }
            }
            linear(L.fc2, L.fc2b, mid, &tmp, P)
            for i in 0..<(P * D) { x[i] += tmp[i] }
        }
        layerNorm(x, postW, postB, &h)
        // Aligner: concatenate each s x s window of patch embeddings, then tanh(x W + b).
        let s = merge, gw = c.gridWidth, m = tokensPerImage
        var merged = [Float](repeating: 0, count: m * s * s * D)
        for ty in 0..<(c.gridHeight / s) {
            for tx in 0..<(gw / s) {
                let t = ty * (gw / s) + tx
                for dy in 0..<s {
                    for dx in 0..<s {
                        let p = (ty * s + dy) * gw + tx * s + dx
                        let dst = t * s * s * D + (dy * s + dx) * D
                        for j in 0..<D { merged[dst + j] = h[p * D + j] }
                    }
                }
            }
        }
        var y = [Float](repeating: 0, count: m * outputDim)
        linear(aligner, alignerBias, merged, &y, m)
        for i in 0..<(m * outputDim) { out[i] = tanhf(y[i]) }
    }
}
