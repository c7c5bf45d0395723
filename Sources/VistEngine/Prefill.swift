import Foundation
import VistKernels
import VistRender

/// Where the engine looks for a finished chunk's work before doing it (docs/MODEL.md, "Caches"):
/// level 1 holds a chunk's aligner output (m x dim floats) under `VIST2Model.chunkKey`, level 2
/// the KV entries of one visual block (`KVCache.rows`, bytes in the cache's element type) under
/// the chained `VIST2Model.prefixKey`. Anything that comes back with the wrong size is treated
/// as a miss. The daemon implements it over its on-disk store; the engine never depends on it.
public protocol VIST2BlockCache: AnyObject, Sendable {
    func alignerOutput(key: [UInt8]) -> [Float]?
    func storeAlignerOutput(key: [UInt8], _ values: ArraySlice<Float>)
    func blockKV(key: [UInt8]) -> [UInt8]?
    func storeBlockKV(key: [UInt8], _ bytes: [UInt8])
}

/// What the cached prefill of finished chunks did (the documents' and, during generation, the
/// chunk swaps').
public struct BlockStats: Sendable, Equatable {
    /// Chunks rendered and run through the vision encoder now.
    public var encoded = 0
    /// Aligner outputs taken from level 1.
    public var chunkHits = 0
    /// Visual blocks whose KV entries came from level 2 (no render, encode or prefill at all).
    public var prefixHits = 0
    public var renderNs: UInt64 = 0
    public var visionNs: UInt64 = 0
    public init() {}
}

/// What a compression (`GenerationTask.prepareCompression`) did.
public struct CompressionResult: Sendable, Codable, Equatable {
    /// Chunks of the documents, including the trailing one that a generation reads as text.
    public var chunks: Int
    public var text_tokens: Int
    /// Visual tokens of the finished chunks (all but the trailing one).
    public var visual_tokens: Int
    public var ratio: Double
    public var chunks_encoded: Int
    public var chunk_cache_hits: Int
    public var prefix_cache_hits: Int
    public var render_ms: Double
    public var vision_ms: Double
    public var elapsed_ms: Double
}

/// The prefill of one request as a list of bounded steps, so that a driver can run other
/// requests' work between them: the instruction's tokens in slices, the documents' finished
/// chunks as visual blocks (through the block cache), chunk images, then the current chunk's
/// text in slices (its last slice gives the logits of the first token).
final class PrefillProgram {
    let model: EngineModel
    let cache: KVCache
    let tf: Transformer
    let blockCache: VIST2BlockCache?
    /// Cache entries before T_cur, once the prefill is done.
    private(set) var base = 0
    /// A copy of the last row of logits a step produced (the one that predicts the first token).
    private(set) var lastLogits: [Float]? = nil
    private(set) var stats = BlockStats()
    /// Visual blocks in the cache (documents, images, and later chunk swaps).
    private(set) var blocks = 0
    /// Text tokens of the chunks now seen only as images.
    var finishedTokens: Int
    let docTokens: Int
    /// Positions of the prompt: instruction, visual blocks, current chunk.
    let promptTokens: Int
    /// The documents' finished chunks done so far, and how many there are.
    var documentProgress: (done: Int, total: Int) { (documents?.done ?? 0, documents?.texts.count ?? 0) }

    enum Step {
        case text(ArraySlice<Int32>, logits: Bool)
        case documents
        case images([[Float]])
        case markBase
    }
    private var steps: [Step] = []
    private var next = 0
    private var documents: DocumentBlocks?

    init(
        model: EngineModel, cache: KVCache, start: [Int32], finished: [Substring], images: [[Float]], current: [Int32],
        blockCache: VIST2BlockCache?, finishedTokens: Int, docTokens: Int
    ) {
        self.model = model
        self.cache = cache
        tf = model.language.transformer
        self.blockCache = blockCache
        self.finishedTokens = finishedTokens
        self.docTokens = docTokens
        let m = model.vist2?.blockSize ?? 0
        promptTokens = start.count + (finished.count + images.count) * m + current.count
        let startLogits = current.isEmpty && finished.isEmpty && images.isEmpty
        for r in tf.prefillSlices(start.count) { steps.append(.text(start[r], logits: startLogits && r.upperBound == start.count)) }
        if let vist = model.vist2, !finished.isEmpty {
            documents = DocumentBlocks(
                model: vist, texts: finished, root: vist.prefixRoot(start, kvType: cache.type), blockCache: blockCache)
            steps.append(.documents)
        }
        if !images.isEmpty { steps.append(.images(images)) }
        steps.append(.markBase)
        for r in tf.prefillSlices(current.count) { steps.append(.text(current[r], logits: r.upperBound == current.count)) }
    }

    /// Runs one step; returns whether the program is done, and the FLOPs of the step.
    func step(_ ws: Workspace) -> (done: Bool, flops: Int) {
        var flops = 0
        if next < steps.count {
            switch steps[next] {
            case .text(let ids, let logits):
                let pass = tf.forward(ids, cache: cache, workspace: ws, logits: logits ? .last : .none)
                if logits { lastLogits = Array(pass.logits.last) }
                flops = pass.flops
                next += 1
            case .documents:
                if let d = documents {
                    let (done, f) = d.step(kv: cache, ws: ws, stats: &stats)
                    flops = f
                    if done {
                        blocks += d.texts.count
                        next += 1
                    }
                } else {
                    next += 1
                }
            case .images(let images):
                if let vist = model.vist2 {
                    let t = DispatchTime.now().uptimeNanoseconds
                    let e = vist.vision.encode(images)
                    stats.visionNs += DispatchTime.now().uptimeNanoseconds - t
                    flops = images.count * vist.vision.flopsPerImage + prefillEmbeddings(e, count: images.count, ws: ws)
                }
                next += 1
            case .markBase:
                break
            }
        }
        // Marks take no work: done at once, so the step that ends the prefill says so.
        while next < steps.count, case .markBase = steps[next] {
            base = cache.count
            next += 1
        }
        return (next == steps.count, flops)
    }

    /// Renders, encodes and prefills `texts` as visual blocks after the cache's entries (a chunk
    /// swap during decoding); returns the FLOPs. When the prefix chain names every entry before
    /// them (the cache's lineage covers them all: the text before the documents, the documents'
    /// blocks, earlier swaps), the blocks go through the block cache the way the documents' do,
    /// and the lineage grows over them: a request that swaps the same text after the same
    /// entries (the same generation again, or identical ones running together) finds the blocks'
    /// aligner outputs and KV entries there instead of rendering, encoding and prefilling them.
    func prefillBlocks(_ texts: [Substring], ws: Workspace) -> Int {
        guard let vist = model.vist2, !texts.isEmpty else { return 0 }
        if let lineage = cache.lineage, lineage.positions == cache.count {
            let d = DocumentBlocks(model: vist, texts: texts, root: lineage.key, blockCache: blockCache)
            var flops = 0
            while true {
                let (done, f) = d.step(kv: cache, ws: ws, stats: &stats)
                flops += f
                if done { break }
            }
            blocks += texts.count
            return flops
        }
        let (e, r, v) = vist.encodeChunks(texts)
        stats.renderNs += r
        stats.visionNs += v
        return texts.count * vist.vision.flopsPerImage + prefillEmbeddings(e, count: texts.count, ws: ws)
    }

    private func prefillEmbeddings(_ e: [Float], count: Int, ws: Workspace) -> Int {
        guard let vist = model.vist2 else { return 0 }
        let n = vist.visualTokens * vist.language.config.dim
        var flops = 0
        for b in 0..<count { flops += vist.prefillBlock(e[(b * n)..<((b + 1) * n)], kv: cache, ws: ws).flops }
        blocks += count
        return flops
    }
}

extension VIST2Model {
    /// One visual block: [vision_start] m visual tokens [vision_end], bidirectional inside (or
    /// causal, with the config's `block_attention` "causal"). With `logits: .last`, the block's
    /// last row predicts the token after it.
    public func prefillBlock(_ e: ArraySlice<Float>, kv: KVCache, ws: Workspace, logits: LogitRows = .none) -> Pass {
        let tf = language.transformer
        let startRow = visionStart.map { tf.embedding(of: $0) } ?? []
        let endRow = visionEnd.map { tf.embedding(of: $0) } ?? []
        return tf.forward(embeddings: startRow + e + endRow, cache: kv, workspace: ws, causal: config.causalBlocks, logits: logits)
    }
}

/// The documents' finished chunks as visual blocks after the entries already in the KV cache
/// (whose content `root` names), doing as little work as the block cache allows: the longest run
/// of blocks whose KV is in the prefix cache is copied in; for the rest, aligner outputs come
/// from the chunk cache or are rendered and encoded (in batches of 8), each block is prefilled,
/// and both levels are filled. The KV entries are the same either way (a cached entry is the
/// stored result of the same computation). One `step` is a run of prefix-cache hits, one batch
/// of encodings, or one block's prefill.
final class DocumentBlocks {
    let model: VIST2Model
    let texts: [Substring]
    let blockCache: VIST2BlockCache?
    let chunkKeys: [[UInt8]]
    private var chain: [UInt8]
    /// Blocks in the KV cache.
    private(set) var done = 0
    private var lookingUp: Bool
    /// The current batch's aligner outputs (blocks done..<done + outputs.count).
    private var outputs: [ArraySlice<Float>] = []
    private var nextOutput = 0
    static let batch = 8
    /// Prefix-cache hits copied in per step (each is a read from the store).
    static let hitsPerStep = 16

    init(model: VIST2Model, texts: [Substring], root: [UInt8], blockCache: VIST2BlockCache?) {
        self.model = model
        self.texts = texts
        self.blockCache = blockCache
        // The keys name the cache's content as it grows (`KVCache.mark`), with or without a block cache.
        chunkKeys = texts.map { model.chunkKey($0) }
        chain = root
        lookingUp = blockCache != nil
    }

    func step(kv: KVCache, ws: Workspace, stats: inout BlockStats) -> (done: Bool, flops: Int) {
        let n = texts.count
        let m = model.visualTokens, dim = model.language.config.dim, blockSize = model.blockSize
        // Before the first block the cache holds what the root names (the text before the blocks).
        if done == 0 && kv.lineage == nil { kv.mark(chain) }
        if lookingUp, let cache = blockCache {
            var hits = 0
            while done < n && hits < Self.hitsPerStep {
                let key = model.prefixKey(chain, chunkKeys[done])
                guard let rows = cache.blockKV(key: key), kv.append(rows: rows, count: blockSize) else {
                    lookingUp = false
                    break
                }
                chain = key
                kv.mark(chain)
                stats.prefixHits += 1
                done += 1
                hits += 1
            }
            if done == n { lookingUp = false }
            return (done == n, 0)
        }
        if nextOutput == outputs.count {
            guard done < n else { return (true, 0) }
            // Encode the next batch: aligner outputs from the chunk cache, the rest rendered.
            let end = min(n, done + Self.batch)
            var batch = [ArraySlice<Float>?](repeating: nil, count: end - done)
            if let cache = blockCache {
                for j in done..<end {
                    if let e = cache.alignerOutput(key: chunkKeys[j]), e.count == m * dim {
                        batch[j - done] = e[...]
                        stats.chunkHits += 1
                    }
                }
            }
            let missing = (done..<end).filter { batch[$0 - done] == nil }
            var flops = 0
            if !missing.isEmpty {
                let (e, r, v) = model.encodeChunks(missing.map { texts[$0] })
                stats.renderNs += r
                stats.visionNs += v
                stats.encoded += missing.count
                flops += missing.count * model.vision.flopsPerImage
                for (b, j) in missing.enumerated() {
                    let slice = e[(b * m * dim)..<((b + 1) * m * dim)]
                    batch[j - done] = slice
                    blockCache?.storeAlignerOutput(key: chunkKeys[j], slice)
                }
            }
            outputs = batch.map { $0 ?? [] }
            nextOutput = 0
            return (false, flops)
        }
        // Prefill the next block of the batch.
        let at = kv.count
        let pass = model.prefillBlock(outputs[nextOutput], kv: kv, ws: ws)
        chain = model.prefixKey(chain, chunkKeys[done])
        kv.mark(chain)
        blockCache?.storeBlockKV(key: chain, kv.rows(from: at, count: blockSize))
        nextOutput += 1
        done += 1
        if nextOutput == outputs.count {
            outputs = []
            nextOutput = 0
        }
        return (done == n, pass.flops)
    }
}
