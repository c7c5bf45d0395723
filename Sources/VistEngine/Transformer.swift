import CBLAS
import Foundation
import VistKernels

/// Keys and values of every layer for positions 0..<count, preallocated for `capacity` positions.
public final class KVCache: @unchecked Sendable {
    public let layers: Int
    public let kvDim: Int
    public private(set) var capacity: Int
    private(set) var keys: UnsafeMutablePointer<Float>  // (layers, capacity, kvDim)
    private(set) var values: UnsafeMutablePointer<Float>  // (layers, capacity, kvDim)
    /// Number of positions filled.
    public internal(set) var count = 0

    public init(config: ModelConfig, capacity: Int) {
        layers = config.layers
        kvDim = config.kvDim
        self.capacity = max(1, capacity)
        let n = layers * self.capacity * kvDim
        keys = .allocate(capacity: n)
        values = .allocate(capacity: n)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    /// Grows the cache to hold `n` positions (keeping what it holds); nothing happens when it
    /// already does. Generation plans its capacity up front and grows only when a chunk swap
    /// turns out to need more blocks than planned.
    public func reserve(_ n: Int) {
        guard n > capacity else { return }
        let total = layers * n * kvDim
        let k = UnsafeMutablePointer<Float>.allocate(capacity: total)
        let v = UnsafeMutablePointer<Float>.allocate(capacity: total)
        for l in 0..<layers {
            (k + l * n * kvDim).update(from: keys(layer: l), count: count * kvDim)
            (v + l * n * kvDim).update(from: values(layer: l), count: count * kvDim)
        }
        keys.deallocate()
        values.deallocate()
        keys = k
        values = v
        capacity = n
    }

    func keys(layer: Int) -> UnsafeMutablePointer<Float> { keys + layer * capacity * kvDim }
    func values(layer: Int) -> UnsafeMutablePointer<Float> { values + layer * capacity * kvDim }

    /// Forgets positions from `n` on (the next forward pass writes position n).
    public func truncate(to n: Int) { count = min(count, max(0, n)) }

    /// Bytes the filled entries take (f32 keys and values).
    public var bytesUsed: Int { 2 * layers * count * kvDim * 4 }

    /// Floats `rows(from:count:)` returns for `n` positions.
    public func rowFloats(_ n: Int) -> Int { 2 * layers * n * kvDim }

    /// Keys and values of positions start..<start+n of every layer, as one array: per layer, the
    /// n key rows, then the n value rows (the persistent prefix cache's payload).
    public func rows(from start: Int, count n: Int) -> [Float] {
        precondition(start >= 0 && start + n <= count)
        var out = [Float](repeating: 0, count: rowFloats(n))
        out.withUnsafeMutableBufferPointer { o in
            var off = 0
            for l in 0..<layers {
                o.baseAddress!.advanced(by: off).update(from: keys(layer: l) + start * kvDim, count: n * kvDim)
                off += n * kvDim
                o.baseAddress!.advanced(by: off).update(from: values(layer: l) + start * kvDim, count: n * kvDim)
                off += n * kvDim
            }
        }
        return out
    }

    /// Appends positions laid out as `rows` returns them; false (and nothing changed) if the
    /// array does not hold whole positions of this cache's shape or they do not fit.
    public func append(rows data: [Float], count n: Int) -> Bool {
        guard n > 0, data.count == rowFloats(n), count + n <= capacity else { return false }
        data.withUnsafeBufferPointer { d in
            var off = 0
            for l in 0..<layers {
                (keys(layer: l) + count * kvDim).update(from: d.baseAddress! + off, count: n * kvDim)
                off += n * kvDim
                (values(layer: l) + count * kvDim).update(from: d.baseAddress! + off, count: n * kvDim)
                off += n * kvDim
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

/// The decoder forward pass (Llama / Qwen3), after llama2.c's `forward()`: one function that reads
/// top to bottom, all activation buffers allocated once, shapes in comments. A batch of T tokens
/// at positions pos0..<pos0+T goes through every layer together, so weight matrices are read
/// once per batch (sgemm for T > 8, quantized matrix-vector kernels for small T).
public final class Transformer: @unchecked Sendable {
    public let weights: TransformerWeights
    public let config: ModelConfig
    public let pool: ThreadPool
    public let maxBatch: Int
    /// Tokens per sub-batch of a forward pass given a `step` (the daemon's): the most that stays
    /// within about 16 GFLOP of layer work (~100 ms on two cores for SmolLM2-135M, 64 tokens),
    /// a multiple of 16 in 16...maxBatch. Fixed per model, so the same request always runs in the
    /// same batches and gives the same numbers.
    public var stepBatch: Int
    static let stepFLOPs = 16e9
    let rope: RopeTable
    let scratch = MatmulScratch()
    /// The backbone adapter, if the model has one (`attach`), and its scratch for maxBatch rows.
    public private(set) var adapter: LoRAAdapter?
    var loraScratch: UnsafeMutablePointer<Float>?
    /// The adapted projections by shared input, writing into this transformer's buffers:
    /// q, k, v (from xn); o (from att); gate, up (from xn); down (from gate).
    var loraGroups: [[LoRAAdapter.Slot]] = []

    // Run state, sized for maxBatch rows.
    let x: UnsafeMutablePointer<Float>  // (B, dim) residual stream
    let xn: UnsafeMutablePointer<Float>  // (B, dim) normalised input of a sub-layer
    let q: UnsafeMutablePointer<Float>  // (B, qDim)
    let k: UnsafeMutablePointer<Float>  // (B, kvDim)
    let v: UnsafeMutablePointer<Float>  // (B, kvDim)
    let att: UnsafeMutablePointer<Float>  // (B, qDim) attention output, heads concatenated
    let proj: UnsafeMutablePointer<Float>  // (B, dim) output of wo / down
    let gate: UnsafeMutablePointer<Float>  // (B, ffn)
    let up: UnsafeMutablePointer<Float>  // (B, ffn)
    var scores: UnsafeMutablePointer<Float>  // (B, S) one head's attention weights, or (threads, S) in decode
    var scoresCapacity: Int
    /// Logits of the last forward pass: (1, vocab) for `.last`, (T, vocab) for `.all`.
    public private(set) var logits: UnsafeMutablePointer<Float>
    var logitsCapacity: Int

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
        let b = self.maxBatch, c = config
        x = .allocate(capacity: b * c.dim)
        xn = .allocate(capacity: b * c.dim)
        q = .allocate(capacity: b * c.qDim)
        k = .allocate(capacity: b * c.kvDim)
        v = .allocate(capacity: b * c.kvDim)
        att = .allocate(capacity: b * c.qDim)
        proj = .allocate(capacity: b * c.dim)
        gate = .allocate(capacity: b * c.ffnDim)
        up = .allocate(capacity: b * c.ffnDim)
        scoresCapacity = 0
        scores = .allocate(capacity: 1)
        logitsCapacity = c.vocabSize
        logits = .allocate(capacity: c.vocabSize)
    }

    deinit {
        for p in [x, xn, q, k, v, att, proj, gate, up, scores, logits] { p.deallocate() }
        loraScratch?.deallocate()
    }

    /// Applies `adapter` from now on: to visual-block rows (`forward(embeddings:)`) with scope
    /// `visual`, to every row with scope `all`. Its shapes were checked against this model's
    /// config when it was loaded.
    public func attach(_ adapter: LoRAAdapter) {
        loraScratch?.deallocate()
        loraScratch = .allocate(capacity: adapter.scratchFloats(maxBatch))
        loraGroups = [
            [.init(target: .q, y: q), .init(target: .k, y: k), .init(target: .v, y: v)], [.init(target: .o, y: proj)],
            [.init(target: .gate, y: gate), .init(target: .up, y: up)], [.init(target: .down, y: proj)],
        ]
        self.adapter = adapter
    }

    /// The input embedding of a token (a row of the token embedding matrix, dequantized).
    public func embedding(of token: Int32) -> [Float] {
        precondition(token >= 0 && Int(token) < config.vocabSize, "token id out of range")
        var out = [Float](repeating: 0, count: config.dim)
        out.withUnsafeMutableBufferPointer {
            dequantize(weights.tokenEmbedding.type, weights.tokenEmbedding.row(Int(token)), $0.baseAddress!, count: config.dim)
        }
        return out
    }

    public func makeCache(capacity: Int) -> KVCache {
        KVCache(config: config, capacity: min(capacity, config.contextLength))
    }

    /// Runs `tokens` at positions cache.count ..< cache.count + tokens.count, appending their keys
    /// and values to the cache. With `.all`, logits of every token are in `logits` (T, vocab)
    /// when T <= maxBatch; with more tokens only the last sub-batch's rows are kept.
    ///
    /// With `step` (and `.none` or `.last`), the tokens go in sub-batches of `stepBatch` and
    /// `step` is called between them — never after the last, so the logits are this request's
    /// when it returns. The daemon yields to other clients and checks for cancellation there; when
    /// `step` returns false the pass stops and returns false (the cache then holds the tokens run
    /// so far).
    @discardableResult
    public func forward(_ tokens: [Int32], cache: KVCache, logits rows: LogitRows, step: (() -> Bool)? = nil) -> Bool {
        precondition(cache.count + tokens.count <= cache.capacity, "KV cache overflow")
        if case .from = rows { precondition(tokens.count <= maxBatch, "logits from a row need one batch") }
        let batch: Int
        switch rows {
        case .none, .last: batch = step == nil ? maxBatch : stepBatch
        case .all, .from: batch = maxBatch
        }
        var start = 0
        while start < tokens.count {
            if start > 0, let step, !step() { return false }
            var end = min(tokens.count, start + batch)
            // A short tail would take the matrix-vector path (other rounding than the rows
            // before it); with a step it joins this sub-batch instead.
            if step != nil, tokens.count - end <= Matmul.gemmThreshold, tokens.count - start <= maxBatch { end = tokens.count }
            let last = end == tokens.count
            tokens.withUnsafeBufferPointer { buf in
                forwardBatch(
                    .tokens(UnsafeBufferPointer(rebasing: buf[start..<end])), cache: cache, rows: last ? rows : .none, causal: true,
                    adapted: adapter?.scope == .all)
            }
            start = end
        }
        return true
    }

    /// Runs rows given as input embeddings (T, dim) — VIST2's visual tokens — at positions
    /// cache.count ..< cache.count + T. With `causal: false` the rows attend to each other in both
    /// directions (a visual block), and to everything already in the cache; T <= maxBatch then.
    public func forward(embeddings: [Float], cache: KVCache, causal: Bool, logits rows: LogitRows) {
        let T = embeddings.count / config.dim
        precondition(T * config.dim == embeddings.count, "embeddings must be whole rows")
        precondition(cache.count + T <= cache.capacity, "KV cache overflow")
        precondition(causal || T <= maxBatch, "a bidirectional block must fit one batch")
        var start = 0
        while start < T {
            let end = min(T, start + maxBatch)
            embeddings.withUnsafeBufferPointer { buf in
                forwardBatch(
                    .embeddings(buf.baseAddress! + start * config.dim, end - start), cache: cache, rows: end == T ? rows : .none,
                    causal: causal, adapted: adapter != nil)
            }
            start = end
        }
    }

    /// FLOPs of the forward passes so far (multiply-add = 2), counted analytically: the weight
    /// products, attention over the visible keys, and the output projection for rows with logits.
    public var flops = 0

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

    private func reserveScores(_ n: Int) {
        if n > scoresCapacity {
            scores.deallocate()
            scores = .allocate(capacity: n)
            scoresCapacity = n
        }
    }

    /// One batch through every layer; with `adapted`, the adapter's low-rank terms are added to
    /// the projections it names, right after each product (before Qwen3's norms and RoPE).
    private func forwardBatch(_ input: Input, cache: KVCache, rows: LogitRows, causal: Bool, adapted: Bool) {
        let c = config, w = weights
        let lora = adapted ? adapter : nil
        func adapt(_ l: Int, _ group: Int, _ x: UnsafeMutablePointer<Float>, _ n: Int) {
            guard let lora, let u = loraScratch else { return }
            flops += lora.apply(l, loraGroups[group], x: x, n: n, scratch: u, pool: pool, matmul: scratch)
        }
        let T = input.count, pos0 = cache.count, S = pos0 + T
        let dim = c.dim, hd = c.headDim, qDim = c.qDim, kvDim = c.kvDim
        let group = c.heads / c.kvHeads
        let scale = 1 / Float(hd).squareRoot()
        rope.reserve(S)
        reserveScores(pool.size * (T > 1 ? min(T, Self.queryBlock) * S : S))

        // Input rows: token embeddings x[t] = E[token t], or given embeddings.
        switch input {
        case .tokens(let tokens):
            for t in 0..<T {
                let id = Int(tokens[t])
                precondition(id >= 0 && id < c.vocabSize, "token id out of range")
                dequantize(w.tokenEmbedding.type, w.tokenEmbedding.row(id), x + t * dim, count: dim)
            }
        case .embeddings(let e, _):
            x.update(from: e, count: T * dim)
        }
        let matrixParams = 2 * c.qDim * dim + 2 * c.kvDim * dim + 3 * dim * c.ffnDim
        let visibleKeys = causal ? T * pos0 + T * (T + 1) / 2 : T * S
        flops += c.layers * (2 * T * matrixParams + 4 * visibleKeys * c.qDim)

        for (l, L) in w.layers.enumerated() {
            // Attention sub-layer: xn = RMSNorm(x) * attn_norm.
            rowsParallel(T) { t in
                L.attnNorm.withUnsafeBufferPointer {
                    Ops.rmsNorm(self.x + t * dim, weight: $0.baseAddress!, out: self.xn + t * dim, n: dim, eps: c.normEps)
                }
            }
            // q = xn Wq^T (T, qDim); k, v = xn Wk^T, xn Wv^T (T, kvDim).
            Matmul.forward(L.wq, x: xn, y: q, n: T, pool: pool, scratch: scratch)
            Matmul.forward(L.wk, x: xn, y: k, n: T, pool: pool, scratch: scratch)
            Matmul.forward(L.wv, x: xn, y: v, n: T, pool: pool, scratch: scratch)
            adapt(l, 0, xn, T)  // q, k, v
            let kc = cache.keys(layer: l), vc = cache.values(layer: l)
            rowsParallel(T) { t in
                // Qwen3: RMSNorm over each query and key head before RoPE.
                if let qn = L.qNorm, let kn = L.kNorm {
                    qn.withUnsafeBufferPointer { wp in
                        for h in 0..<c.heads {
                            let p = self.q + t * qDim + h * hd; Ops.rmsNorm(p, weight: wp.baseAddress!, out: p, n: hd, eps: c.normEps)
                        }
                    }
                    kn.withUnsafeBufferPointer { wp in
                        for h in 0..<c.kvHeads {
                            let p = self.k + t * kvDim + h * hd; Ops.rmsNorm(p, weight: wp.baseAddress!, out: p, n: hd, eps: c.normEps)
                        }
                    }
                }
                // RoPE at position pos0 + t, then append k and v to the cache.
                for h in 0..<c.heads { self.rope.apply(self.q + t * qDim + h * hd, pos: pos0 + t) }
                for h in 0..<c.kvHeads { self.rope.apply(self.k + t * kvDim + h * hd, pos: pos0 + t) }
                (kc + (pos0 + t) * kvDim).update(from: self.k + t * kvDim, count: kvDim)
                (vc + (pos0 + t) * kvDim).update(from: self.v + t * kvDim, count: kvDim)
            }
            // att = softmax(q K^T / sqrt(hd), causal) V, per head; query head h reads kv head h / group.
            if T == 1 {
                attendOne(kc: kc, vc: vc, S: S, scale: scale, group: group)
            } else {
                attendBatch(kc: kc, vc: vc, T: T, pos0: pos0, scale: scale, group: group, causal: causal)
            }
            // x += att Wo^T
            Matmul.forward(L.wo, x: att, y: proj, n: T, pool: pool, scratch: scratch)
            adapt(l, 1, att, T)  // o
            rowsParallel(T) { t in Ops.add(self.x + t * dim, self.proj + t * dim, n: dim) }

            // Feed-forward sub-layer: x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T, xn = RMSNorm(x) * ffn_norm.
            rowsParallel(T) { t in
                L.ffnNorm.withUnsafeBufferPointer {
                    Ops.rmsNorm(self.x + t * dim, weight: $0.baseAddress!, out: self.xn + t * dim, n: dim, eps: c.normEps)
                }
            }
            Matmul.forward(L.gate, x: xn, y: gate, n: T, pool: pool, scratch: scratch)
            Matmul.forward(L.up, x: xn, y: up, n: T, pool: pool, scratch: scratch)
            adapt(l, 2, xn, T)  // gate, up
            rowsParallel(T) { t in Ops.swiglu(self.gate + t * c.ffnDim, up: self.up + t * c.ffnDim, n: c.ffnDim) }
            Matmul.forward(L.down, x: gate, y: proj, n: T, pool: pool, scratch: scratch)
            adapt(l, 3, gate, T)  // down
            rowsParallel(T) { t in Ops.add(self.x + t * dim, self.proj + t * dim, n: dim) }
        }
        cache.count = S

        // Final norm and logits for the requested rows.
        let first: Int
        switch rows {
        case .none: return
        case .last: first = T - 1
        case .all: first = 0
        case .from(let i): first = min(max(0, i), T)
        }
        guard first < T else { return }
        let n = T - first
        if n * c.vocabSize > logitsCapacity {
            logits.deallocate()
            logits = .allocate(capacity: n * c.vocabSize)
            logitsCapacity = n * c.vocabSize
        }
        rowsParallel(n) { i in
            w.outputNorm.withUnsafeBufferPointer {
                Ops.rmsNorm(self.x + (first + i) * dim, weight: $0.baseAddress!, out: self.xn + i * dim, n: dim, eps: c.normEps)
            }
        }
        Matmul.forward(w.output, x: xn, y: logits, n: n, pool: pool, scratch: scratch)
        flops += 2 * n * c.vocabSize * dim
    }

    /// Query rows per attention block: a block attends to keys up to its last row's position, so
    /// the causal mask skips most of the upper triangle instead of computing and zeroing it.
    static let queryBlock = 64

    /// Causal attention of T queries at pos0..<pos0+T over the cache, (head, query block) work
    /// items split over the pool's threads, each with single-threaded sgemm.
    private func attendBatch(
        kc: UnsafeMutablePointer<Float>, vc: UnsafeMutablePointer<Float>, T: Int, pos0: Int, scale: Float, group: Int, causal: Bool
    ) {
        let c = config, hd = c.headDim, qDim = c.qDim, kvDim = c.kvDim
        let blocks = (T + Self.queryBlock - 1) / Self.queryBlock
        let items = c.heads * blocks
        let stride = min(T, Self.queryBlock) * (pos0 + T)  // matches reserveScores in forwardBatch
        pool.parallel { ith, nth in
            let s = self.scores + ith * stride
            // Interleave items so both threads get a mix of short (early) and long (late) blocks.
            var item = ith
            while item < items {
                let h = item % c.heads, b = item / c.heads
                let g = h / group
                let t0 = b * Self.queryBlock, t1 = min(T, t0 + Self.queryBlock)
                let rows = t1 - t0, keys = causal ? pos0 + t1 : pos0 + T
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(keys), Int32(hd), scale,
                    self.q + t0 * qDim + h * hd, Int32(qDim), kc + g * hd, Int32(kvDim), 0, s, Int32(keys))
                for r in 0..<rows {
                    let row = s + r * keys
                    let visible = causal ? pos0 + t0 + r + 1 : keys  // causal: keys 0...pos0+t
                    Ops.softmax(row, n: visible)
                    if visible < keys { (row + visible).update(repeating: 0, count: keys - visible) }
                }
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(hd), Int32(keys), 1,
                    s, Int32(keys), vc + g * hd, Int32(kvDim), 0, self.att + t0 * qDim + h * hd, Int32(qDim))
                item += nth
            }
        }
    }

    /// Single-query attention over the cache, heads split over the pool's threads.
    private func attendOne(kc: UnsafeMutablePointer<Float>, vc: UnsafeMutablePointer<Float>, S: Int, scale: Float, group: Int) {
        let c = config, hd = c.headDim, kvDim = c.kvDim
        pool.parallel { ith, nth in
            let s = self.scores + ith * S
            for h in ThreadPool.slice(c.heads, ith, nth) {
                let g = h / group
                let qh = self.q + h * hd
                // scores = K_g q * scale; K_g is (S, hd) with rows kvDim apart. Single-threaded
                // sgemv per head from the pool's threads.
                cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(S), Int32(hd), scale, kc + g * hd, Int32(kvDim), qh, 1, 0, s, 1)
                Ops.softmax(s, n: S)
                // out = V_g^T p
                cblas_sgemv(CblasRowMajor, CblasTrans, Int32(S), Int32(hd), 1, vc + g * hd, Int32(kvDim), s, 1, 0, self.att + h * hd, 1)
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
