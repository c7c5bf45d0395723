import CBLAS
import CVistKernels
import Foundation
import VistKernels

/// The element type of a KV cache: f32, or IEEE half (half the memory and the bytes attention
/// reads per step; attention still accumulates in f32).
public enum KVType: String, Sendable, CaseIterable, Codable {
    case f32
    case f16

    /// Bytes per element.
    public var bytes: Int { self == .f32 ? 4 : 2 }
}

/// Keys and values of every layer for positions 0..<count, preallocated for `capacity`
/// positions, in f32 or f16 (`type`). A request's own state: the engine's forward passes write it
/// and read it, and nothing else does.
///
/// Head-major: each (layer, KV head) holds its `capacity` positions' `headDim` elements
/// contiguously, so decoding attention streams one KV head's keys and values without skipping
/// over the other heads' (1.7x faster than position-major rows on the measured machine,
/// docs/ARCHITECTURE.md). `rows(from:count:)` and `append(rows:count:)` convert to and from
/// position-major payloads, the persistent prefix cache's format.
public final class KVCache: @unchecked Sendable {
    public let layers: Int
    public let kvHeads: Int
    public let headDim: Int
    public let type: KVType
    public private(set) var capacity: Int
    private var keys: UnsafeMutableRawPointer  // (layers, kvHeads, capacity, headDim) of `type`
    private var values: UnsafeMutableRawPointer  // (layers, kvHeads, capacity, headDim) of `type`
    /// Number of positions filled.
    public internal(set) var count = 0 {
        didSet { if let l = lineage, l.positions > count { lineage = count > 0 ? Lineage(key: l.key, positions: count) : nil } }
    }

    /// What the first entries are, when the engine knows: positions 0..<`positions` hold (a
    /// prefix of) the entries that the prefix-cache chain key `key` names (docs/MODEL.md,
    /// "Caches"), so two caches with the same key hold the same bytes in their first
    /// min(positions) positions, the premise the prefix cache already serves entries on. A
    /// batched decoding step reads such shared entries once for all the rows that have them
    /// (`attendRows`). Shrinks with the count; set by `mark(_:)`.
    public struct Lineage: Hashable, Sendable {
        public let key: [UInt8]
        public let positions: Int
    }
    public private(set) var lineage: Lineage?
    /// Caches share the work on their common entries only within one scope
    /// (`GenerationRequest.sharingScope`).
    public var sharingScope: [UInt8] = []

    /// Records that the entries 0..<count are the ones `key` names.
    func mark(_ key: [UInt8]) { lineage = count > 0 ? Lineage(key: key, positions: count) : nil }

    public init(config: ModelConfig, capacity: Int, type: KVType = .f32) {
        layers = config.layers
        kvHeads = config.kvHeads
        headDim = config.headDim
        self.type = type
        self.capacity = max(1, capacity)
        let n = layers * kvHeads * self.capacity * headDim * type.bytes
        keys = .allocate(byteCount: n, alignment: 64)
        values = .allocate(byteCount: n, alignment: 64)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    /// Elements of one position of one layer (keys or values): all KV heads.
    public var kvDim: Int { kvHeads * headDim }
    /// Bytes of one position of one layer (keys or values).
    public var rowBytes: Int { kvDim * type.bytes }
    /// Bytes of one position of one KV head of one layer (keys or values).
    public var headBytes: Int { headDim * type.bytes }

    /// Grows the cache to hold `n` positions (keeping what it holds); nothing happens when it
    /// already does. Generation plans its capacity up front and grows only when a chunk swap
    /// turns out to need more blocks than planned.
    public func reserve(_ n: Int) {
        guard n > capacity else { return }
        let total = layers * kvHeads * n * headBytes
        let k = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: 64)
        let v = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: 64)
        for l in 0..<layers {
            for h in 0..<kvHeads {
                let dst = (l * kvHeads + h) * n * headBytes
                (k + dst).copyMemory(from: keys(layer: l, head: h), byteCount: count * headBytes)
                (v + dst).copyMemory(from: values(layer: l, head: h), byteCount: count * headBytes)
            }
        }
        keys.deallocate()
        values.deallocate()
        keys = k
        values = v
        capacity = n
    }

    /// Position 0 of KV head `head` of `layer`; position p is `p * headBytes` further.
    func keys(layer: Int, head: Int) -> UnsafeMutableRawPointer { keys + (layer * kvHeads + head) * capacity * headBytes }
    func values(layer: Int, head: Int) -> UnsafeMutableRawPointer { values + (layer * kvHeads + head) * capacity * headBytes }

    /// Writes the key and value rows (`kvDim` elements, head after head) of position `pos` of
    /// `layer` (converting to f16 if need be).
    func store(layer: Int, pos: Int, key: UnsafePointer<Float>, value: UnsafePointer<Float>) {
        for h in 0..<kvHeads {
            let kd = keys(layer: layer, head: h) + pos * headBytes, vd = values(layer: layer, head: h) + pos * headBytes
            let ks = key + h * headDim, vs = value + h * headDim
            switch type {
            case .f32:
                kd.assumingMemoryBound(to: Float.self).update(from: ks, count: headDim)
                vd.assumingMemoryBound(to: Float.self).update(from: vs, count: headDim)
            case .f16:
                vk_f32_to_f16(ks, kd.assumingMemoryBound(to: UInt16.self), Int64(headDim))
                vk_f32_to_f16(vs, vd.assumingMemoryBound(to: UInt16.self), Int64(headDim))
            }
        }
    }

    /// Forgets positions from `n` on (the next forward pass writes position n).
    public func truncate(to n: Int) { count = min(count, max(0, n)) }

    /// Bytes the filled entries take.
    public var bytesUsed: Int { 2 * layers * count * rowBytes }

    /// Bytes `rows(from:count:)` returns for `n` positions.
    public func payloadBytes(_ n: Int) -> Int { 2 * layers * n * rowBytes }

    /// Keys and values of positions start..<start+n of every layer, as bytes in the cache's
    /// element type, position-major: per layer, the n key rows (each `kvDim` elements, head
    /// after head), then the n value rows (the persistent prefix cache's payload). Empty when
    /// the range is not filled.
    public func rows(from start: Int, count n: Int) -> [UInt8] {
        guard start >= 0, n >= 0, start + n <= count else { return [] }
        var out = [UInt8](repeating: 0, count: payloadBytes(n))
        out.withUnsafeMutableBytes { o in
            for l in 0..<layers {
                let k = o.baseAddress! + 2 * l * n * rowBytes, v = k + n * rowBytes
                for h in 0..<kvHeads {
                    let ks = keys(layer: l, head: h) + start * headBytes, vs = values(layer: l, head: h) + start * headBytes
                    for p in 0..<n {
                        (k + p * rowBytes + h * headBytes).copyMemory(from: ks + p * headBytes, byteCount: headBytes)
                        (v + p * rowBytes + h * headBytes).copyMemory(from: vs + p * headBytes, byteCount: headBytes)
                    }
                }
            }
        }
        return out
    }

    /// Appends positions laid out as `rows` returns them; false (and nothing changed) if the
    /// bytes are not whole positions of this cache's shape and type or they do not fit.
    public func append(rows data: [UInt8], count n: Int) -> Bool {
        guard n > 0, data.count == payloadBytes(n), count + n <= capacity else { return false }
        data.withUnsafeBytes { d in
            for l in 0..<layers {
                let k = d.baseAddress! + 2 * l * n * rowBytes, v = k + n * rowBytes
                for h in 0..<kvHeads {
                    let kd = keys(layer: l, head: h) + count * headBytes, vd = values(layer: l, head: h) + count * headBytes
                    for p in 0..<n {
                        (kd + p * headBytes).copyMemory(from: k + p * rowBytes + h * headBytes, byteCount: headBytes)
                        (vd + p * headBytes).copyMemory(from: v + p * rowBytes + h * headBytes, byteCount: headBytes)
                    }
                }
            }
        }
        count += n
        return true
    }
}

/// Which rows of a forward pass produce logits.
public enum LogitRows: Sendable {
    case none
    case last
    case all
    /// Rows i..<T of a batch of T <= maxBatch tokens.
    case from(Int)
}

/// The activation buffers of forward passes of up to `rows` rows at a time, and their scratch.
/// Whoever runs passes owns one (the daemon's engine thread, a CLI command) and hands it to each
/// pass; nothing in it outlives a pass except the logits it returned, which stay valid until the
/// next pass with this workspace.
public final class Workspace: @unchecked Sendable {
    public let rows: Int
    let x: UnsafeMutablePointer<Float>  // (B, dim) residual stream
    let xn: UnsafeMutablePointer<Float>  // (B, dim) normalised input of a sub-layer
    let q: UnsafeMutablePointer<Float>  // (B, qDim)
    let k: UnsafeMutablePointer<Float>  // (B, kvDim)
    let v: UnsafeMutablePointer<Float>  // (B, kvDim)
    let att: UnsafeMutablePointer<Float>  // (B, qDim) attention output, heads concatenated
    let proj: UnsafeMutablePointer<Float>  // (B, dim) output of wo / down
    let gate: UnsafeMutablePointer<Float>  // (B, ffn)
    let up: UnsafeMutablePointer<Float>  // (B, ffn)
    var scores = Buffer()  // attention weights, per thread
    var headKV = Buffer()  // an f16 cache's keys and values of one head as f32 per thread; attention parts' outputs
    var logits = Buffer()  // (rows with logits, vocab)
    var lora = Buffer()  // the adapter's scratch
    let matmul = MatmulScratch()
    /// Attention parts that decoding steps with this workspace read once for several rows of
    /// the same lineage (`Transformer.attendRows`): one per (layer, KV head, part of 256 keys,
    /// group of rows).
    public internal(set) var sharedParts = 0

    /// A growable float buffer (contents are not kept when it grows).
    struct Buffer {
        var base = UnsafeMutablePointer<Float>.allocate(capacity: 1)
        var capacity = 1

        /// Room for at least n floats; returns the buffer.
        mutating func reserve(_ n: Int) -> UnsafeMutablePointer<Float> {
            if n > capacity {
                base.deallocate()
                base = .allocate(capacity: n)
                capacity = n
            }
            return base
        }
    }

    public init(config: ModelConfig, rows: Int) {
        self.rows = max(1, rows)
        let b = self.rows, c = config
        x = .allocate(capacity: b * c.dim)
        xn = .allocate(capacity: b * c.dim)
        q = .allocate(capacity: b * c.qDim)
        k = .allocate(capacity: b * c.kvDim)
        v = .allocate(capacity: b * c.kvDim)
        att = .allocate(capacity: b * c.qDim)
        proj = .allocate(capacity: b * c.dim)
        gate = .allocate(capacity: b * c.ffnDim)
        up = .allocate(capacity: b * c.ffnDim)
    }

    deinit {
        for p in [x, xn, q, k, v, att, proj, gate, up, scores.base, headKV.base, logits.base, lora.base] { p.deallocate() }
    }
}

/// Logits of a forward pass: `rows` rows of `vocab` floats in the workspace that ran it (which it
/// keeps alive), valid until that workspace runs its next pass (copy a row to keep it).
public struct Logits: @unchecked Sendable {
    public let rows: Int
    public let vocab: Int
    let base: UnsafePointer<Float>?
    let owner: Workspace?

    static let none = Logits(rows: 0, vocab: 0, base: nil, owner: nil)

    /// `body` with row i (0..<rows; an empty buffer when there is no such row), read in place.
    public func withRow<R>(_ i: Int, _ body: (UnsafeBufferPointer<Float>) throws -> R) rethrows -> R {
        try withExtendedLifetime(owner) {
            guard let base, i >= 0, i < rows else { return try body(UnsafeBufferPointer(start: nil, count: 0)) }
            return try body(UnsafeBufferPointer(start: base + i * vocab, count: vocab))
        }
    }

    /// A copy of row i.
    public func row(_ i: Int) -> [Float] { withRow(i) { Array($0) } }

    /// A copy of the last row, the one that predicts the next token.
    public var last: [Float] { row(rows - 1) }
}

/// What a forward pass returns: its logits and the FLOPs it did (multiply-add = 2), counted
/// analytically (the weight products, attention over the visible keys, the adapter, and the
/// output projection for rows with logits), so each request adds up its own work.
public struct Pass {
    public let logits: Logits
    public let flops: Int
}

/// The decoder forward pass (Llama / Qwen3), after llama2.c's `forward()`: one function that reads
/// top to bottom, shapes in comments. A batch of T tokens at positions pos0..<pos0+T goes through
/// every layer together, so weight matrices are read once per batch (sgemm for T > 8, quantized
/// matrix-vector kernels for small T); `decode` runs one token of each of several requests the
/// same way, each row attending to its own cache.
///
/// The transformer holds the weights, the adapter and the thread pool only. The state of a
/// request (its KV cache, logits, FLOPs) is its own and passed in; activations live in a
/// `Workspace` the caller owns. Passes may run from one thread at a time (the pool is shared).
public final class Transformer: @unchecked Sendable {
    public let weights: TransformerWeights
    public let config: ModelConfig
    public let pool: ThreadPool
    public let maxBatch: Int
    /// Tokens per prefill slice when a caller works in steps (`prefillSlices`): the most that
    /// stays within about 16 GFLOP of layer work (~100 ms on two cores for SmolLM2-135M, 64
    /// tokens), a multiple of 16 in 16...maxBatch. Fixed per model, so the same request always
    /// runs in the same batches and gives the same numbers.
    public var stepBatch: Int
    static let stepFLOPs = 16e9
    let rope: RopeTable
    /// The backbone adapter, if the model has one (`attach`).
    public private(set) var adapter: LoRAAdapter?

    public init(weights: TransformerWeights, threads: Int, maxBatch: Int = 512) {
        self.weights = weights
        config = weights.config
        pool = ThreadPool(threads: threads)
        setBLASThreads(1)
        self.maxBatch = max(1, maxBatch)
        let (d, qd, kvd, ffn) = (Double(config.dim), Double(config.qDim), Double(config.kvDim), Double(config.ffnDim))
        let perToken = max(1, 2 * Double(config.layers) * (2 * d * qd + 2 * d * kvd + 3 * d * ffn))
        stepBatch = min(self.maxBatch, max(16, Int(min(1e6, Self.stepFLOPs / perToken)) / 16 * 16))
        rope = RopeTable(dims: config.headDim, base: config.ropeBase, style: config.ropeStyle)
    }

    /// Applies `adapter` from now on: to visual-block rows (`forward(embeddings:)`) with scope
    /// `visual`, to every row with scope `all`. Its shapes were checked against this model's
    /// config when it was loaded. Call before any pass runs.
    public func attach(_ adapter: LoRAAdapter) { self.adapter = adapter }

    /// A workspace for passes of up to `maxBatch` rows.
    /// With `exactActivations`, the workspace's products keep f32 activations (the path equal to
    /// the float64 reference; `MatmulScratch.exactActivations`).
    public func makeWorkspace(exactActivations: Bool = false) -> Workspace {
        let ws = Workspace(config: config, rows: maxBatch)
        ws.matmul.exactActivations = exactActivations
        return ws
    }

    /// The input embedding of a token (a row of the token embedding matrix, dequantized).
    public func embedding(of token: Int32) -> [Float] {
        precondition(token >= 0 && Int(token) < config.vocabSize, "token id out of range")
        var out = [Float](repeating: 0, count: config.dim)
        out.withUnsafeMutableBufferPointer {
            weights.tokenEmbedding.dequantizeRows(Int(token)..<(Int(token) + 1), into: $0.baseAddress!)
        }
        return out
    }

    public func makeCache(capacity: Int, type: KVType = .f32) -> KVCache {
        KVCache(config: config, capacity: min(capacity, config.contextLength), type: type)
    }

    /// How a prefill of `n` tokens is cut when the caller works in steps: slices of `stepBatch`
    /// tokens, except that a short tail (one that would take the matrix-vector path, with other
    /// rounding than the rows before it) joins the slice before it when both fit one batch.
    public func prefillSlices(_ n: Int) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var start = 0
        while start < n {
            var end = min(n, start + stepBatch)
            if n - end <= Matmul.gemmThreshold, n - start <= maxBatch { end = n }
            out.append(start..<end)
            start = end
        }
        return out
    }

    /// Runs `tokens` at positions cache.count ..< cache.count + tokens.count, appending their keys
    /// and values to the cache, in batches of up to `maxBatch` tokens. Logits come from the last
    /// batch (`.all` and `.from` then need tokens.count <= maxBatch for every row to be there).
    public func forward<C: RandomAccessCollection<Int32>>(
        _ tokens: C, cache: KVCache, workspace ws: Workspace, logits rows: LogitRows
    ) -> Pass where C.Index == Int {
        precondition(cache.count + tokens.count <= cache.capacity, "KV cache overflow")
        let ids = Array(tokens)
        var start = 0, flops = 0
        var logits = Logits.none
        while start < ids.count {
            let end = min(ids.count, start + min(maxBatch, ws.rows))
            let pass = ids.withUnsafeBufferPointer { buf in
                forwardBatch(
                    .tokens(UnsafeBufferPointer(rebasing: buf[start..<end])), placement: .sequence(cache, causal: true),
                    rows: end == ids.count ? rows : .none, adapted: adapter?.scope == .all, ws: ws)
            }
            flops += pass.flops
            logits = pass.logits
            start = end
        }
        return Pass(logits: logits, flops: flops)
    }

    /// Runs rows given as input embeddings (T, dim) — VIST2's visual tokens — at positions
    /// cache.count ..< cache.count + T. With `causal: false` the rows attend to each other in both
    /// directions (a visual block), and to everything already in the cache; T <= maxBatch then.
    public func forward(embeddings: [Float], cache: KVCache, workspace ws: Workspace, causal: Bool, logits rows: LogitRows) -> Pass {
        let T = embeddings.count / config.dim
        let batch = min(maxBatch, ws.rows)
        precondition(T * config.dim == embeddings.count, "embeddings must be whole rows")
        precondition(cache.count + T <= cache.capacity, "KV cache overflow")
        precondition(causal || T <= batch, "a bidirectional block must fit one batch")
        var start = 0, flops = 0
        var logits = Logits.none
        while start < T {
            let end = min(T, start + batch)
            let pass = embeddings.withUnsafeBufferPointer { buf in
                forwardBatch(
                    .embeddings(buf.baseAddress! + start * config.dim, end - start), placement: .sequence(cache, causal: causal),
                    rows: end == T ? rows : .none, adapted: adapter != nil, ws: ws)
            }
            flops += pass.flops
            logits = pass.logits
            start = end
        }
        return Pass(logits: logits, flops: flops)
    }

    /// One decoding step of several requests at once: `tokens[i]` goes to position
    /// caches[i].count of caches[i] (distinct caches, each with room for one more position) and
    /// attends to that cache alone. Weights are read once for all rows; row i's logits and
    /// numbers are exactly those of running its token alone. Returns every row's logits and each
    /// row's FLOPs.
    public func decode(_ tokens: [Int32], caches: [KVCache], workspace ws: Workspace) -> (logits: Logits, flops: [Int]) {
        precondition(tokens.count == caches.count && tokens.count <= ws.rows, "one token per cache, within the workspace's rows")
        precondition(caches.allSatisfy { $0.count < $0.capacity }, "KV cache overflow")
        precondition(Set(caches.map(ObjectIdentifier.init)).count == caches.count, "a cache may appear once per step")
        guard !tokens.isEmpty else { return (.none, []) }
        let before = caches.map(\.count)
        let pass = tokens.withUnsafeBufferPointer { buf in
            forwardBatch(.tokens(buf), placement: .decode(caches), rows: .all, adapted: adapter?.scope == .all, ws: ws)
        }
        // The weight and output products are the same for every row; attention differs by the
        // keys each row sees.
        let attention = before.map { 4 * ($0 + 1) * config.qDim * config.layers }
        let shared = (pass.flops - attention.reduce(0, +)) / tokens.count
        return (pass.logits, attention.map { shared + $0 })
    }

    enum Input {
        case tokens(UnsafeBufferPointer<Int32>)
        case embeddings(UnsafePointer<Float>, Int)

        var count: Int {
            switch self {
            case .tokens(let b): return b.count
            case .embeddings(_, let n): return n
            }
        }
    }

    /// Where the rows of a batch go: consecutive positions of one cache (row t at cache.count + t,
    /// attending causally or, for a visual block, in both directions), or one row per cache at
    /// its next position (a decoding step of several requests).
    enum Placement {
        case sequence(KVCache, causal: Bool)
        case decode([KVCache])
    }

    /// One batch through every layer; with `adapted`, the adapter's low-rank terms are added to
    /// the projections it names, right after each product (before Qwen3's norms and RoPE).
    private func forwardBatch(_ input: Input, placement: Placement, rows: LogitRows, adapted: Bool, ws: Workspace) -> Pass {
        let c = config, w = weights
        let T = input.count
        precondition(T <= ws.rows, "batch larger than the workspace")
        let dim = c.dim, hd = c.headDim, qDim = c.qDim, kvDim = c.kvDim
        let group = c.heads / c.kvHeads
        let scale = 1 / Float(hd).squareRoot()
        // Row t's cache and position.
        let caches: [KVCache], positions: [Int]
        var flops = 0
        let matrixParams = 2 * c.qDim * dim + 2 * c.kvDim * dim + 3 * dim * c.ffnDim
        switch placement {
        case .sequence(let cache, let causal):
            caches = [cache]
            positions = (0..<T).map { cache.count + $0 }
            let pos0 = cache.count
            flops += c.layers * 4 * (causal ? T * pos0 + T * (T + 1) / 2 : T * (pos0 + T)) * c.qDim
        case .decode(let cs):
            caches = cs
            positions = cs.map(\.count)
            flops += c.layers * 4 * positions.reduce(0) { $0 + $1 + 1 } * c.qDim
        }
        flops += c.layers * 2 * T * matrixParams
        func cache(_ t: Int) -> KVCache { caches.count == 1 ? caches[0] : caches[t] }
        let maxS = (positions.max() ?? 0) + 1
        rope.reserve(maxS + T)

        let lora = adapted ? adapter : nil
        let loraScratch = lora.map { ws.lora.reserve($0.scratchFloats(ws.rows)) }
        let loraGroups: [[LoRAAdapter.Slot]] =
            lora == nil
            ? []
            : [
                [.init(target: .q, y: ws.q), .init(target: .k, y: ws.k), .init(target: .v, y: ws.v)], [.init(target: .o, y: ws.proj)],
                [.init(target: .gate, y: ws.gate), .init(target: .up, y: ws.up)], [.init(target: .down, y: ws.proj)],
            ]
        func adapt(_ l: Int, _ group: Int, _ x: UnsafeMutablePointer<Float>) {
            guard let lora, let u = loraScratch else { return }
            flops += lora.apply(l, loraGroups[group], x: x, n: T, scratch: u, pool: pool, matmul: ws.matmul)
        }

        // Input rows: token embeddings x[t] = E[token t], or given embeddings.
        switch input {
        case .tokens(let tokens):
            for t in 0..<T {
                let id = Int(tokens[t])
                precondition(id >= 0 && id < c.vocabSize, "token id out of range")
                w.tokenEmbedding.dequantizeRows(id..<(id + 1), into: ws.x + t * dim)
            }
        case .embeddings(let e, _):
            ws.x.update(from: e, count: T * dim)
        }

        for (l, L) in w.layers.enumerated() {
            // Attention sub-layer: xn = RMSNorm(x) * attn_norm.
            rowsParallel(T) { t in
                L.attnNorm.withUnsafeBufferPointer {
                    Ops.rmsNorm(ws.x + t * dim, weight: $0.baseAddress!, out: ws.xn + t * dim, n: dim, eps: c.normEps)
                }
            }
            // q = xn Wq^T (T, qDim); k, v = xn Wk^T, xn Wv^T (T, kvDim).
            Matmul.forward([(L.wq, ws.q), (L.wk, ws.k), (L.wv, ws.v)], x: ws.xn, n: T, pool: pool, scratch: ws.matmul)
            adapt(l, 0, ws.xn)  // q, k, v
            rowsParallel(T) { t in
                // Qwen3: RMSNorm over each query and key head before RoPE.
                if let qn = L.qNorm, let kn = L.kNorm {
                    qn.withUnsafeBufferPointer { wp in
                        for h in 0..<c.heads {
                            let p = ws.q + t * qDim + h * hd; Ops.rmsNorm(p, weight: wp.baseAddress!, out: p, n: hd, eps: c.normEps)
                        }
                    }
                    kn.withUnsafeBufferPointer { wp in
                        for h in 0..<c.kvHeads {
                            let p = ws.k + t * kvDim + h * hd; Ops.rmsNorm(p, weight: wp.baseAddress!, out: p, n: hd, eps: c.normEps)
                        }
                    }
                }
                // RoPE at the row's position, then append k and v to its cache.
                let pos = positions[t]
                for h in 0..<c.heads { self.rope.apply(ws.q + t * qDim + h * hd, pos: pos) }
                for h in 0..<c.kvHeads { self.rope.apply(ws.k + t * kvDim + h * hd, pos: pos) }
                cache(t).store(layer: l, pos: pos, key: ws.k + t * kvDim, value: ws.v + t * kvDim)
            }
            // att = softmax(q K^T / sqrt(hd), causal) V, per head; query head h reads kv head h / group.
            switch placement {
            case .sequence(let kv, let causal) where T > 1:
                attendBatch(kv, layer: l, T: T, pos0: positions[0], scale: scale, group: group, causal: causal, ws: ws)
            default:
                attendRows(caches: (0..<T).map(cache), layer: l, positions: positions, scale: scale, group: group, ws: ws)
            }
            // x += att Wo^T
            Matmul.forward(L.wo, x: ws.att, y: ws.proj, n: T, pool: pool, scratch: ws.matmul)
            adapt(l, 1, ws.att)  // o
            rowsParallel(T) { t in Ops.add(ws.x + t * dim, ws.proj + t * dim, n: dim) }

            // Feed-forward sub-layer: x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T, xn = RMSNorm(x) * ffn_norm.
            rowsParallel(T) { t in
                L.ffnNorm.withUnsafeBufferPointer {
                    Ops.rmsNorm(ws.x + t * dim, weight: $0.baseAddress!, out: ws.xn + t * dim, n: dim, eps: c.normEps)
                }
            }
            Matmul.forward([(L.gate, ws.gate), (L.up, ws.up)], x: ws.xn, n: T, pool: pool, scratch: ws.matmul)
            adapt(l, 2, ws.xn)  // gate, up
            rowsParallel(T) { t in Ops.swiglu(ws.gate + t * c.ffnDim, up: ws.up + t * c.ffnDim, n: c.ffnDim) }
            Matmul.forward(L.down, x: ws.gate, y: ws.proj, n: T, pool: pool, scratch: ws.matmul)
            adapt(l, 3, ws.gate)  // down
            rowsParallel(T) { t in Ops.add(ws.x + t * dim, ws.proj + t * dim, n: dim) }
        }
        switch placement {
        case .sequence(let kv, _): kv.count += T
        case .decode(let cs): for kv in cs { kv.count += 1 }
        }

        // Final norm and logits for the requested rows.
        let first: Int
        switch rows {
        case .none: return Pass(logits: .none, flops: flops)
        case .last: first = T - 1
        case .all: first = 0
        case .from(let i): first = min(max(0, i), T)
        }
        guard first < T else { return Pass(logits: .none, flops: flops) }
        let n = T - first
        let logits = ws.logits.reserve(n * c.vocabSize)
        rowsParallel(n) { i in
            w.outputNorm.withUnsafeBufferPointer {
                Ops.rmsNorm(ws.x + (first + i) * dim, weight: $0.baseAddress!, out: ws.xn + i * dim, n: dim, eps: c.normEps)
            }
        }
        Matmul.forward(w.output, x: ws.xn, y: logits, n: n, pool: pool, scratch: ws.matmul)
        flops += 2 * n * c.vocabSize * dim
        return Pass(logits: Logits(rows: n, vocab: c.vocabSize, base: logits, owner: ws), flops: flops)
    }

    /// Query rows per attention block: a block attends to keys up to its last row's position, so
    /// the causal mask skips most of the upper triangle instead of computing and zeroing it.
    static let queryBlock = 64

    /// Attention of T queries at pos0..<pos0+T over one cache (causal, or both ways inside the
    /// batch), (head, query block) work items split over the pool's threads, each with
    /// single-threaded sgemm. An f16 cache's keys and values of the head are widened to f32 per
    /// item first (a small cost next to the two products).
    func attendBatch(
        _ cache: KVCache, layer l: Int, T: Int, pos0: Int, scale: Float, group: Int, causal: Bool, ws: Workspace
    ) {
        let c = config, hd = c.headDim, qDim = c.qDim
        let blocks = (T + Self.queryBlock - 1) / Self.queryBlock
        let items = c.heads * blocks
        let S = pos0 + T
        let stride = min(T, Self.queryBlock) * S
        let scores = ws.scores.reserve(pool.size * stride)
        let f16 = cache.type == .f16
        let headKV = f16 ? ws.headKV.reserve(pool.size * 2 * S * hd) : ws.headKV.reserve(1)
        let (q, att) = (ws.q, ws.att)
        pool.parallel { ith, nth in
            let s = scores + ith * stride
            // Interleave items so both threads get a mix of short (early) and long (late) blocks.
            var item = ith
            var widened = -1  // the kv head whose keys and values are in this thread's headKV
            while item < items {
                let h = item % c.heads, b = item / c.heads
                let g = h / group
                let t0 = b * Self.queryBlock, t1 = min(T, t0 + Self.queryBlock)
                let rows = t1 - t0, keys = causal ? pos0 + t1 : S
                // The head's keys and values: S rows of hd, contiguous.
                let kp: UnsafePointer<Float>, vp: UnsafePointer<Float>
                if f16 {
                    let kw = headKV + ith * 2 * S * hd, vw = kw + S * hd
                    if widened != g {
                        // All S positions of the kv head, kept while this thread's items stay on it.
                        let k16 = cache.keys(layer: l, head: g).assumingMemoryBound(to: UInt16.self),
                            v16 = cache.values(layer: l, head: g).assumingMemoryBound(to: UInt16.self)
                        vk_f16_to_f32(k16, kw, Int64(S * hd))
                        vk_f16_to_f32(v16, vw, Int64(S * hd))
                        widened = g
                    }
                    (kp, vp) = (UnsafePointer(kw), UnsafePointer(vw))
                } else {
                    kp = UnsafePointer(cache.keys(layer: l, head: g).assumingMemoryBound(to: Float.self))
                    vp = UnsafePointer(cache.values(layer: l, head: g).assumingMemoryBound(to: Float.self))
                }
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(keys), Int32(hd), scale,
                    q + t0 * qDim + h * hd, Int32(qDim), kp, Int32(hd), 0, s, Int32(keys))
                for r in 0..<rows {
                    let row = s + r * keys
                    let visible = causal ? pos0 + t0 + r + 1 : keys  // causal: keys 0...pos0+t
                    Ops.softmax(row, n: visible)
                    if visible < keys { (row + visible).update(repeating: 0, count: keys - visible) }
                }
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(hd), Int32(keys), 1,
                    s, Int32(keys), vp, Int32(hd), 0, att + t0 * qDim + h * hd, Int32(qDim))
                item += nth
            }
        }
    }

    /// Keys per part of a decoding row's attention: a longer row is split into parts that run on
    /// different threads and are merged after (flash-decoding). Fixed, so how a row is split
    /// depends on its length only, never on the batch it is in: a request's numbers are the same
    /// alone and batched.
    static let attentionPart = 256

    /// Queries per shared attention call (rows that share a lineage times the query heads per
    /// KV head); more rows are split over several calls. The kernel's SIMD path takes this many.
    static let sharedQueries = Int(VK_ATTEND_GMAX)

    /// Single-query attention of each row t over keys 0...positions[t] of its cache: decoding,
    /// alone or batched. Over an f32 cache, one sgemv pair per query head. Over an f16 cache,
    /// work items are (row, KV head, part of the keys): the query heads that share a KV head are
    /// done together, so each key and value row is read (and widened) once per KV head
    /// (`vk_attend_group`), and the parts of a row are merged by their softmax maxima and sums.
    /// Rows whose caches have the same `lineage` (requests over the same documents) share the
    /// items of the whole parts inside it: the keys are read once for all of them.
    func attendRows(caches: [KVCache], layer l: Int, positions: [Int], scale: Float, group: Int, ws: Workspace) {
        let c = config, hd = c.headDim, qDim = c.qDim, G = group
        // Rows over f32 caches: one sgemv pair per query head (the path the parity fixtures
        // were measured on).
        let f32Rows = positions.indices.filter { caches[$0].type == .f32 }
        if !f32Rows.isEmpty {
            let maxS = (f32Rows.map { positions[$0] }.max() ?? 0) + 1
            let scores = ws.scores.reserve(pool.size * maxS)
            let (q, att) = (ws.q, ws.att)
            pool.parallel { ith, nth in
                let s = scores + ith * maxS
                for item in ThreadPool.slice(f32Rows.count * c.heads, ith, nth) {
                    let t = f32Rows[item / c.heads], h = item % c.heads, g = h / G, S = positions[t] + 1
                    let kc = caches[t].keys(layer: l, head: g).assumingMemoryBound(to: Float.self)
                    let vc = caches[t].values(layer: l, head: g).assumingMemoryBound(to: Float.self)
                    // scores = K_g q * scale; K_g is (S, hd), contiguous; out = V_g^T p.
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(S), Int32(hd), scale, kc, Int32(hd), q + t * qDim + h * hd, 1, 0, s, 1)
                    Ops.softmax(s, n: S)
                    cblas_sgemv(CblasRowMajor, CblasTrans, Int32(S), Int32(hd), 1, vc, Int32(hd), s, 1, 0, att + t * qDim + h * hd, 1)
                }
            }
        }
        // Rows over f16 caches: the group kernel, in parts.
        let half = positions.indices.filter { caches[$0].type == .f16 }
        guard !half.isEmpty else { return }
        let part = Self.attentionPart
        let parts = positions.map { (($0 + 1) + part - 1) / part }
        // Rows whose caches share a lineage (the same entries at the start) share the items of
        // the whole parts inside it: one kernel call over those keys for all their queries, each
        // key and value row read once per step instead of once per row. A query's numbers do not
        // depend on the other queries of its call, and the parts are the same, so each row's
        // result is bit for bit the one it gets alone.
        var sharing: [[Int]] = []  // rows, at most maxShared to a call
        var sharedParts: [Int] = []  // leading parts the rows of sharing[i] share
        do {
            struct Shared: Hashable { let scope: [UInt8], key: [UInt8] }
            var byKey: [Shared: Int] = [:]
            var groups: [[(t: Int, parts: Int)]] = []  // rows of one key, and the whole parts each has of it
            for t in half {
                guard let l = caches[t].lineage, l.positions >= part else { continue }
                let row = (t: t, parts: l.positions / part)
                let k = Shared(scope: caches[t].sharingScope, key: l.key)
                if let i = byKey[k] { groups[i].append(row) } else { byKey[k] = groups.count; groups.append([row]) }
            }
            let maxShared = max(1, Self.sharedQueries / G)
            for g in groups where g.count > 1 {
                for c in stride(from: 0, to: g.count, by: maxShared) {
                    let rows = g[c..<min(g.count, c + maxShared)]
                    guard rows.count > 1 else { continue }
                    sharing.append(rows.map(\.t))
                    sharedParts.append(rows.reduce(Int.max) { min($0, $1.parts) })
                }
            }
        }
        // Items: a run of keys of one KV head of one cache, for `queries` queries (G per row) at
        // `q` (a row's own in ws.q, or gathered for a shared item); outputs at `out`: m, l
        // (`queries` each), then the queries' o (hd each). slot[first[t] + g * parts[t] + p] says
        // where row t's part p of head g is: the item's output and the row's first query in it.
        struct Item {
            var t: Int, g: Int, s0: Int, s1: Int, queries: Int, q: Int, gathered: Bool, out: Int
        }
        var items: [Item] = []
        var first = [Int](repeating: 0, count: positions.count)
        var slots: [(out: Int, queries: Int, index: Int)] = []
        var outFloats = 0
        let qDimG = G * hd
        var gatheredFloats = 0  // the shared items' queries, gathered
        for t in half {
            first[t] = slots.count
            slots.append(contentsOf: repeatElement((out: 0, queries: 0, index: 0), count: c.kvHeads * parts[t]))
        }
        var ownFrom = [Int](repeating: 0, count: positions.count)  // the first part a row reads alone
        for (i, rows) in sharing.enumerated() {
            let n = rows.count * G
            for g in 0..<c.kvHeads {
                let q = gatheredFloats
                gatheredFloats += n * hd
                for p in 0..<sharedParts[i] {
                    let out = outFloats
                    items.append(Item(t: rows[0], g: g, s0: p * part, s1: (p + 1) * part, queries: n, q: q, gathered: true, out: out))
                    outFloats += n * (2 + hd)
                    for (r, t) in rows.enumerated() { slots[first[t] + g * parts[t] + p] = (out, n, r * G) }
                }
            }
            for t in rows { ownFrom[t] = sharedParts[i] }
        }
        for t in half {
            let S = positions[t] + 1
            for g in 0..<c.kvHeads {
                for p in ownFrom[t]..<parts[t] {
                    let out = outFloats
                    items.append(
                        Item(
                            t: t, g: g, s0: p * part, s1: min(S, (p + 1) * part), queries: G, q: t * qDim + g * qDimG, gathered: false,
                            out: out))
                    outFloats += G * (2 + hd)
                    slots[first[t] + g * parts[t] + p] = (out, G, 0)
                }
            }
        }
        ws.sharedParts += items.count { $0.gathered }
        let outs = ws.headKV.reserve(outFloats + gatheredFloats)
        let gq = outs + outFloats
        let maxQueries = items.lazy.map(\.queries).max() ?? G
        let scores = ws.scores.reserve(pool.size * maxQueries * part)
        let q = ws.q
        // Gather the shared items' queries: row after row, each row's G heads of the KV head.
        var at = 0
        for rows in sharing {
            for g in 0..<c.kvHeads {
                for t in rows {
                    (gq + at).update(from: q + t * qDim + g * qDimG, count: qDimG)
                    at += qDimG
                }
            }
        }
        // Claimed while running: a shared item costs several own ones.
        pool.parallel(units: items.count) { range, ith in
            let sc = scores + ith * maxQueries * part
            for i in range {
                let it = items[i], cache = caches[it.t]
                let off = it.s0 * cache.headBytes
                let o = outs + it.out, n = it.queries
                let qp = it.gathered ? gq + it.q : q + it.q
                vk_attend_group(
                    1, cache.keys(layer: l, head: it.g) + off, cache.values(layer: l, head: it.g) + off, Int64(hd),
                    qp, Int64(n), Int64(hd), scale, Int64(it.s1 - it.s0), sc, o, o + n, o + 2 * n)
            }
        }
        // Merge each row's parts: weights exp(m_p - M), normalised by the weighted sums.
        let att = ws.att
        rowsParallel(half.count) { i in
            let t = half[i]
            for g in 0..<c.kvHeads {
                let base = first[t] + g * parts[t]
                for j in 0..<G {
                    let out = att + t * qDim + (g * G + j) * hd
                    var M = -Float.infinity
                    for p in 0..<parts[t] {
                        let s = slots[base + p]
                        M = max(M, outs[s.out + s.index + j])
                    }
                    var L: Float = 0
                    for i in 0..<hd { out[i] = 0 }
                    for p in 0..<parts[t] {
                        let s = slots[base + p]
                        let o = outs + s.out
                        let w = exp(o[s.index + j] - M)
                        L += o[s.queries + s.index + j] * w
                        let op = o + 2 * s.queries + (s.index + j) * hd
                        for i in 0..<hd { out[i] += w * op[i] }
                    }
                    let inv = 1 / L
                    for i in 0..<hd { out[i] *= inv }
                }
            }
        }
    }

    /// Runs body(t) for t in 0..<n, split over the pool when there is more than one row.
    @inline(__always)
    private func rowsParallel(_ n: Int, _ body: (Int) -> Void) {
        if n == 1 {
            body(0)
            return
        }
        pool.parallel { ith, nth in
            for t in ThreadPool.slice(n, ith, nth) { body(t) }
        }
    }
}
