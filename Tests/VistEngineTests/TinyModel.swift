import Foundation
import Testing

@testable import VistEngine
@testable import VistFormats
@testable import VistKernels
@testable import VistTokenizer

/// A tiny random decoder written in both checkpoint formats, to test the loaders, the
/// Q/K permutation of GGUF's llama converter, Qwen3's q/k norms, and the fast forward pass
/// against a naive one.
struct TinyModel {
    let arch: Architecture
    let dim = 64, layers = 2, heads = 4, kvHeads = 2, headDim = 16, ffn = 96, vocab = 288
    var tensors: [String: (shape: [Int], data: [Float])] = [:]  // HF names, row-major [rows, cols]

    init(arch: Architecture, seed: UInt64) {
        self.arch = arch
        var rng = Xoshiro256(seed: seed)
        func rand(_ shape: [Int], scale: Float) -> (shape: [Int], data: [Float]) {
            (shape, (0..<shape.reduce(1, *)).map { _ in Float(rng.nextFloat() * 2 - 1) * scale })
        }
        func norm(_ n: Int) -> (shape: [Int], data: [Float]) { ([n], (0..<n).map { _ in 1 + Float(rng.nextFloat() - 0.5) * 0.2 }) }
        tensors["model.embed_tokens.weight"] = rand([vocab, dim], scale: 1)
        tensors["model.norm.weight"] = norm(dim)
        for l in 0..<layers {
            let b = "model.layers.\(l)."
            tensors[b + "input_layernorm.weight"] = norm(dim)
            tensors[b + "post_attention_layernorm.weight"] = norm(dim)
            tensors[b + "self_attn.q_proj.weight"] = rand([heads * headDim, dim], scale: 0.3)
            tensors[b + "self_attn.k_proj.weight"] = rand([kvHeads * headDim, dim], scale: 0.3)
            tensors[b + "self_attn.v_proj.weight"] = rand([kvHeads * headDim, dim], scale: 0.3)
            tensors[b + "self_attn.o_proj.weight"] = rand([dim, heads * headDim], scale: 0.2)
            tensors[b + "mlp.gate_proj.weight"] = rand([ffn, dim], scale: 0.3)
            tensors[b + "mlp.up_proj.weight"] = rand([ffn, dim], scale: 0.3)
            tensors[b + "mlp.down_proj.weight"] = rand([dim, ffn], scale: 0.2)
            if arch == .qwen3 {
                tensors[b + "self_attn.q_norm.weight"] = norm(headDim)
                tensors[b + "self_attn.k_norm.weight"] = norm(headDim)
            }
        }
    }

    /// Byte-level vocabulary: 256 byte tokens, <|endoftext|>, then unused padding.
    var vocabTokens: [String] {
        var t = ByteLevel.byteToScalar.map { String($0) }
        t.append("<|endoftext|>")
        while t.count < vocab { t.append("<pad\(t.count)>") }
        return t
    }

    func writeHF(to dir: URL) throws {
        var header: [String: Any] = [:]
        var data: [UInt8] = []
        for name in tensors.keys.sorted() {
            let t = tensors[name]!
            let begin = data.count
            for f in t.data { withUnsafeBytes(of: f.bitPattern.littleEndian) { data.append(contentsOf: $0) } }
            header[name] = ["dtype": "F32", "shape": t.shape, "data_offsets": [begin, data.count]]
        }
        let h = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        var file: [UInt8] = []
        withUnsafeBytes(of: UInt64(h.count).littleEndian) { file.append(contentsOf: $0) }
        file.append(contentsOf: h)
        file.append(contentsOf: data)
        try Data(file).write(to: dir.appendingPathComponent("model.safetensors"))
        let config: [String: Any] = [
            "model_type": arch.rawValue, "vocab_size": vocab, "hidden_size": dim, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kvHeads, "head_dim": headDim,
            "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "hidden_act": "silu",
        ]
        try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("config.json"))
        var vocabMap: [String: Int] = [:]
        for (i, t) in vocabTokens.enumerated() where i < 256 { vocabMap[t] = i }
        let tok: [String: Any] = [
            "model": ["type": "BPE", "vocab": vocabMap, "merges": [String]()],
            "added_tokens": [["id": 256, "content": "<|endoftext|>", "special": true]],
            "pre_tokenizer": ["type": "ByteLevel"],
        ]
        try JSONSerialization.data(withJSONObject: tok).write(to: dir.appendingPathComponent("tokenizer.json"))
    }

    /// GGUF as llama.cpp's converter writes it: ne0-first shapes, and for `llama` the Q and K rows
    /// of each head permuted from rotate-half order to interleaved pairs.
    func writeGGUF(to path: String) throws {
        var w = GGUFWriter()
        let a = arch.rawValue
        w.add("general.architecture", .string(a))
        w.add("\(a).block_count", .uint32(UInt32(layers)))
        w.add("\(a).context_length", .uint32(256))
        w.add("\(a).embedding_length", .uint32(UInt32(dim)))
        w.add("\(a).feed_forward_length", .uint32(UInt32(ffn)))
        w.add("\(a).attention.head_count", .uint32(UInt32(heads)))
        w.add("\(a).attention.head_count_kv", .uint32(UInt32(kvHeads)))
        w.add("\(a).attention.key_length", .uint32(UInt32(headDim)))
        w.add("\(a).rope.freq_base", .float32(10000))
        w.add("\(a).attention.layer_norm_rms_epsilon", .float32(1e-6))
        w.add("tokenizer.ggml.model", .string("gpt2"))
        w.add("tokenizer.ggml.pre", .string("default"))
        w.add("tokenizer.ggml.tokens", .array(vocabTokens.map { .string($0) }))
        w.add("tokenizer.ggml.token_type", .array(vocabTokens.indices.map { .int32($0 < 256 ? 1 : $0 == 256 ? 3 : 5) }))
        w.add("tokenizer.ggml.merges", .array([]))
        w.add("tokenizer.ggml.eos_token_id", .uint32(256))
        func put(_ gguf: String, _ hf: String, permuteHeads: Int? = nil) {
            let t = tensors[hf]!
            var data = t.data
            if let nh = permuteHeads, arch == .llama {
                // new row h*hd + 2i <- old row h*hd + i; new row h*hd + 2i + 1 <- old row h*hd + hd/2 + i
                let cols = t.shape[1], hd = t.shape[0] / nh
                for h in 0..<nh {
                    for i in 0..<(hd / 2) {
                        for (newRow, oldRow) in [(h * hd + 2 * i, h * hd + i), (h * hd + 2 * i + 1, h * hd + hd / 2 + i)] {
                            for c in 0..<cols { data[newRow * cols + c] = t.data[oldRow * cols + c] }
                        }
                    }
                }
            }
            w.add(tensor: gguf, dims: t.shape.reversed(), floats: data)
        }
        put("token_embd.weight", "model.embed_tokens.weight")
        put("output_norm.weight", "model.norm.weight")
        for l in 0..<layers {
            let b = "blk.\(l).", h = "model.layers.\(l)."
            put(b + "attn_norm.weight", h + "input_layernorm.weight")
            put(b + "ffn_norm.weight", h + "post_attention_layernorm.weight")
            put(b + "attn_q.weight", h + "self_attn.q_proj.weight", permuteHeads: heads)
            put(b + "attn_k.weight", h + "self_attn.k_proj.weight", permuteHeads: kvHeads)
            put(b + "attn_v.weight", h + "self_attn.v_proj.weight")
            put(b + "attn_output.weight", h + "self_attn.o_proj.weight")
            put(b + "ffn_gate.weight", h + "mlp.gate_proj.weight")
            put(b + "ffn_up.weight", h + "mlp.up_proj.weight")
            put(b + "ffn_down.weight", h + "mlp.down_proj.weight")
            if arch == .qwen3 {
                put(b + "attn_q_norm.weight", h + "self_attn.q_norm.weight")
                put(b + "attn_k_norm.weight", h + "self_attn.k_norm.weight")
            }
        }
        try w.write(to: path)
    }

    /// The Hugging Face forward pass, written naively in Double: rotate-half RoPE, GQA, SwiGLU,
    /// Qwen3 q/k norms, tied output. Returns logits (T, vocab).
    func naiveLogits(_ ids: [Int32]) -> [[Double]] {
        func t(_ n: String) -> [Double] { tensors[n]!.data.map(Double.init) }
        func matvec(_ w: [Double], rows: Int, cols: Int, _ x: [Double]) -> [Double] {
            (0..<rows).map { r in (0..<cols).reduce(0.0) { $0 + w[r * cols + $1] * x[$1] } }
        }
        func rms(_ x: [Double], _ w: [Double], eps: Double = 1e-6) -> [Double] {
            let s = 1 / (x.map { $0 * $0 }.reduce(0, +) / Double(x.count) + eps).squareRoot()
            return zip(x, w).map { $0 * s * $1 }
        }
        func rope(_ v: [Double], pos: Int) -> [Double] {
            var o = v
            let half = headDim / 2
            for i in 0..<half {
                let th = Double(pos) * pow(10000.0, -2.0 * Double(i) / Double(headDim))
                o[i] = v[i] * cos(th) - v[i + half] * sin(th)
                o[i + half] = v[i] * sin(th) + v[i + half] * cos(th)
            }
            return o
        }
        let emb = t("model.embed_tokens.weight")
        var xs = ids.map { Array(emb[(Int($0) * dim)..<(Int($0) * dim + dim)]) }
        for l in 0..<layers {
            let b = "model.layers.\(l)."
            var ks: [[[Double]]] = [], vs: [[[Double]]] = []
            var outs: [[Double]] = []
            for (pos, x) in xs.enumerated() {
                let h = rms(x, t(b + "input_layernorm.weight"))
                let q = matvec(t(b + "self_attn.q_proj.weight"), rows: heads * headDim, cols: dim, h)
                let k = matvec(t(b + "self_attn.k_proj.weight"), rows: kvHeads * headDim, cols: dim, h)
                let v = matvec(t(b + "self_attn.v_proj.weight"), rows: kvHeads * headDim, cols: dim, h)
                var qh = (0..<heads).map { Array(q[($0 * headDim)..<($0 * headDim + headDim)]) }
                var kh = (0..<kvHeads).map { Array(k[($0 * headDim)..<($0 * headDim + headDim)]) }
                if arch == .qwen3 {
                    qh = qh.map { rms($0, t(b + "self_attn.q_norm.weight")) }
                    kh = kh.map { rms($0, t(b + "self_attn.k_norm.weight")) }
                }
                qh = qh.map { rope($0, pos: pos) }
                kh = kh.map { rope($0, pos: pos) }
                ks.append(kh)
                vs.append((0..<kvHeads).map { Array(v[($0 * headDim)..<($0 * headDim + headDim)]) })
                var att: [Double] = []
                for hh in 0..<heads {
                    let g = hh / (heads / kvHeads)
                    var s = (0...pos).map { j in zip(qh[hh], ks[j][g]).map(*).reduce(0, +) / Double(headDim).squareRoot() }
                    let m = s.max()!
                    s = s.map { exp($0 - m) }
                    let z = s.reduce(0, +)
                    var o = [Double](repeating: 0, count: headDim)
                    for j in 0...pos { for d in 0..<headDim { o[d] += s[j] / z * vs[j][g][d] } }
                    att += o
                }
                outs.append(att)
            }
            for i in xs.indices {
                let o = matvec(t(b + "self_attn.o_proj.weight"), rows: dim, cols: heads * headDim, outs[i])
                xs[i] = zip(xs[i], o).map(+)
                let h = rms(xs[i], t(b + "post_attention_layernorm.weight"))
                let g = matvec(t(b + "mlp.gate_proj.weight"), rows: ffn, cols: dim, h)
                let u = matvec(t(b + "mlp.up_proj.weight"), rows: ffn, cols: dim, h)
                let a = zip(g, u).map { $0 / (1 + exp(-$0)) * $1 }
                xs[i] = zip(xs[i], matvec(t(b + "mlp.down_proj.weight"), rows: dim, cols: ffn, a)).map(+)
            }
        }
        return xs.map { matvec(emb, rows: vocab, cols: dim, rms($0, t("model.norm.weight"))) }
    }
}

@Suite("Tiny Llama and Qwen3 models: loaders and forward pass against a naive reference")
struct TinyModelTests {
    @Test(
        "GGUF and safetensors checkpoints of the same weights give the naive reference's logits", arguments: [Architecture.llama, .qwen3])
    func formatsAgree(arch: Architecture) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-tiny-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let tiny = TinyModel(arch: arch, seed: arch == .llama ? 1 : 2)
        try tiny.writeHF(to: dir)
        let gguf = dir.appendingPathComponent("tiny.gguf").path
        try tiny.writeGGUF(to: gguf)
        let ids: [Int32] = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 256, 3]
        let ref = tiny.naiveLogits(ids)
        for url in [dir, URL(fileURLWithPath: gguf)] {
            let m = try LanguageModel(url: url, threads: 2, maxBatch: 8)
            #expect(m.config.architecture == arch && m.config.ropeStyle == (url == dir || arch == .qwen3 ? .halves : .interleaved))
            #expect(m.tokenizer.encode("Hello world!") == Array(ids[0..<12]))
            // Prefill in two batches (8 + 6) then two single-token steps: all paths of the forward pass.
            let cache = m.transformer.makeCache(capacity: ids.count)
            let ws = m.transformer.makeWorkspace()
            let logits = m.transformer.forward(ids[0..<12], cache: cache, workspace: ws, logits: .all).logits
            var rows: [[Float]] = (8..<12).map { t in Array(logits.row(t - 8)) }
            for id in ids[12...] { rows.append(Array(m.transformer.decode([id], caches: [cache], workspace: ws).logits.row(0))) }
            #expect(cache.count == ids.count)
            var maxErr = 0.0
            for (i, row) in rows.enumerated() {
                let r = ref[8 + i]
                for v in 0..<tiny.vocab { maxErr = max(maxErr, abs(Double(row[v]) - r[v]) / (1 + abs(r[v]))) }
            }
            #expect(maxErr < 1e-4, "\(arch) from \(url.lastPathComponent): max relative error \(maxErr)")
        }
    }

    @Test(
        "export-backbone: a GGUF exported as a Hugging Face checkpoint has the original tensors (Q/K un-permuted) and logits",
        arguments: [Architecture.llama, .qwen3])
    func exportHuggingFace(arch: Architecture) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-export-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let tiny = TinyModel(arch: arch, seed: 5)
        try tiny.writeHF(to: dir)
        let gguf = dir.appendingPathComponent("tiny.gguf").path
        try tiny.writeGGUF(to: gguf)
        let out = dir.appendingPathComponent("exported")
        try LanguageModel(url: URL(fileURLWithPath: gguf), threads: 1).weights.exportHuggingFace(to: out)
        let file = try SafetensorsFile(path: out.appendingPathComponent("model.safetensors").path)
        #expect(Set(file.tensors.keys) == Set(tiny.tensors.keys))
        for (name, t) in tiny.tensors {
            let got = try file.floats(name, shape: t.shape)
            #expect(got == t.data, "\(name) differs after export")
        }
        try FileManager.default.copyItem(at: dir.appendingPathComponent("tokenizer.json"), to: out.appendingPathComponent("tokenizer.json"))
        let m = try LanguageModel(url: out, threads: 1)
        #expect(m.config.ropeStyle == .halves && m.config.architecture == arch)
        let ids: [Int32] = [72, 101, 108, 108, 111, 32, 119]
        let ref = tiny.naiveLogits(ids)
        let cache = m.transformer.makeCache(capacity: ids.count)
        let row = Array(m.transformer.forward(ids, cache: cache, workspace: m.transformer.makeWorkspace(), logits: .last).logits.last)
        let err = (0..<tiny.vocab).map { abs(Double(row[$0]) - ref[ids.count - 1][$0]) / (1 + abs(ref[ids.count - 1][$0])) }.max()!
        #expect(err < 1e-4)
    }

    /// The format error loading `url` gives, or nil when it loads.
    func loadError(_ url: URL) -> FormatError? {
        let result = Result { () throws(EngineError) -> LanguageModel in try LanguageModel(url: url, threads: 1) }
        guard case .failure(let error) = result else { return nil }
        guard case .format(let f) = error else {
            Issue.record("expected a format error, got \(error)")
            return nil
        }
        return f
    }

    @Test("Damaged configs and checkpoints name the field or tensor at fault")
    func damaged() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-tiny-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var tiny = TinyModel(arch: .llama, seed: 3)
        tiny.tensors["model.layers.1.mlp.up_proj.weight"] = nil
        try tiny.writeHF(to: dir)
        #expect(loadError(dir)?.tensor == "model.layers.1.mlp.up_proj.weight")

        let configURL = dir.appendingPathComponent("config.json")
        var cfg = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: configURL)) as? [String: Any])
        cfg["num_key_value_heads"] = 3
        try JSONSerialization.data(withJSONObject: cfg).write(to: configURL)
        #expect(loadError(dir)?.description.contains("head_count") == true)

        cfg["num_key_value_heads"] = 2
        cfg["model_type"] = "gpt_neox"
        try JSONSerialization.data(withJSONObject: cfg).write(to: configURL)
        let e = loadError(dir)
        #expect(e?.code == "unsupported_type" && e?.description.contains("gpt_neox") == true)

        cfg["model_type"] = "llama"
        cfg.removeValue(forKey: "hidden_size")
        try JSONSerialization.data(withJSONObject: cfg).write(to: configURL)
        #expect(loadError(dir)?.description.contains("hidden_size") == true)
    }
}
