import Foundation
import VistKernels
import VistRender
import VistTokenizer

/// A loaded model as the engine runs it: a plain decoder, or a VIST2 model around one.
public enum EngineModel: Sendable {
    case language(LanguageModel)
    case vist2(VIST2Model)

    /// The decoder (a VIST2 model's backbone).
    public var language: LanguageModel {
        switch self {
        case .language(let lm): return lm
        case .vist2(let m): return m.language
        }
    }

    public var vist2: VIST2Model? {
        if case .vist2(let m) = self { return m }
        return nil
    }
}

/// What to generate: an instruction, and for a VIST2 model the documents it reads (compressed,
/// or in full-text mode).
public struct GenerationRequest: Sendable {
    public var prompt: String
    /// Wrap the prompt in the model's chat template (ChatML) as one user message.
    public var chat = false
    public var maxTokens = 128
    public var sampling = SamplingParams()
    /// Generation stops before the first occurrence of any of these strings.
    public var stop: [String] = []
    /// Keep generating past end-of-generation tokens (for benchmarks, like llama.cpp's --ignore-eos).
    public var ignoreEOS = false
    /// Documents given as context (VIST2 models), concatenated with a newline between them.
    public var documents: [String] = []
    /// Read the whole text with the backbone alone (the baseline VIST2 is compared against).
    public var fullText = false
    /// Finished chunks given only as their images (normalised pixels, as `GrayImage.normalized()`
    /// gives), in order; `documents` then hold just the current chunk's text. The engine never
    /// sees the text of these chunks.
    public var images: [[Float]] = []
    /// The persistent block cache to read and fill (the daemon's), if any.
    public var cache: VIST2BlockCache? = nil
    /// How an earlier version of these documents was chunked (the daemon keeps it per open
    /// document): the chunks an edit leaves alone are kept (`Chunker.chunking(_:reusing:step:)`).
    public var previousChunking: Chunking? = nil
    /// The KV cache's element type.
    public var kvType: KVType = .f32
    /// Requests whose caches hold the same entries (`KVCache.lineage`) share the work on them in
    /// a batched decoding step only within one scope: the daemon passes the block cache's owner,
    /// so a user's request never runs faster or slower because another user's reads the same
    /// documents, as its cache entries are never another user's. Empty: one scope for all.
    public var sharingScope: [UInt8] = []

    public init(prompt: String, documents: [String] = [], fullText: Bool = false) {
        self.prompt = prompt
        self.documents = documents
        self.fullText = fullText
    }

    public func validate() throws(EngineError) {
        try sampling.validate()
        guard maxTokens >= 0, maxTokens <= 1 << 20 else { throw .badArgument("max tokens must be in 0...\(1 << 20), got \(maxTokens)") }
        guard stop.allSatisfy({ !$0.isEmpty }) else { throw .badArgument("stop strings must not be empty") }
    }
}

/// Why generation ended.
public enum StopReason: String, Sendable, Codable {
    case endOfGeneration = "eos"
    case stopString = "stop"
    case maxTokens = "length"
    case contextFull = "context"
    case cancelled
}

/// The outcome, timings and costs of one generation; field names are the `--json` keys.
///
/// Times are what the request experienced: `ttft_ms` from the moment the task was prepared to its
/// first token; `prefill_ms` the engine time of its own prefill steps; `decode_ms` from its first
/// token to its last (shared with the requests decoded in the same batched steps), so
/// `decode_tokens_per_s` is the rate its client saw. FLOPs are this request's own work.
public struct GenerationResult: Sendable, Codable {
    public var text: String
    public var prompt_tokens: Int
    public var generated_tokens: Int
    public var ttft_ms: Double
    public var prefill_tokens_per_s: Double
    public var decode_tokens_per_s: Double
    public var peak_rss_bytes: Int
    public var stop_reason: StopReason
    public var token_ids: [Int32]
    /// Peak and final KV cache bytes, and the cache's element type.
    public var kv_bytes: Int
    public var kv_bytes_final: Int
    public var kv_type: KVType
    /// FLOPs of the request, counted analytically (backbone, vision encoder and aligner).
    public var flops: Int
    public var prefill_ms: Double
    public var decode_ms: Double
    /// Present when the request read documents or images, or wrote past a chunk boundary.
    public var compression: CompressionStats?

    /// The figures of a VIST2 model's chunked reading and writing.
    public struct CompressionStats: Sendable, Codable, Equatable {
        /// "vist2" or "full-text".
        public var mode: String
        /// Tokens of the documents' text.
        public var doc_text_tokens: Int
        /// Visual tokens in the cache at the end (finished chunks x m).
        public var visual_tokens: Int
        /// Text tokens now represented by visual tokens / visual tokens.
        public var compression_ratio: Double
        public var render_ms: Double
        public var vision_ms: Double
        /// Finished chunks seen as images (from the documents and from generation).
        public var chunks: Int
        /// Chunk-boundary swaps during generation.
        public var swaps: Int
        /// The time they took (render, encode and the visual blocks' prefill): part of `decode_ms`.
        public var swap_ms: Double
        /// Of the documents' finished chunks: rendered and encoded now, aligner outputs from the
        /// chunk cache, visual blocks whose KV came from the prefix cache.
        public var chunks_encoded: Int
        public var chunk_cache_hits: Int
        public var prefix_cache_hits: Int
    }

    public init(
        text: String, prompt_tokens: Int, generated_tokens: Int, ttft_ms: Double, prefill_tokens_per_s: Double,
        decode_tokens_per_s: Double, peak_rss_bytes: Int, stop_reason: StopReason, token_ids: [Int32], kv_bytes: Int,
        kv_bytes_final: Int, kv_type: KVType, flops: Int, prefill_ms: Double, decode_ms: Double, compression: CompressionStats? = nil
    ) {
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.generated_tokens = generated_tokens
        self.ttft_ms = ttft_ms
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.decode_tokens_per_s = decode_tokens_per_s
        self.peak_rss_bytes = peak_rss_bytes
        self.stop_reason = stop_reason
        self.token_ids = token_ids
        self.kv_bytes = kv_bytes
        self.kv_bytes_final = kv_bytes_final
        self.kv_type = kv_type
        self.flops = flops
        self.prefill_ms = prefill_ms
        self.decode_ms = decode_ms
        self.compression = compression
    }

    enum CodingKeys: String, CodingKey {
        case text, prompt_tokens, generated_tokens, ttft_ms, prefill_tokens_per_s, decode_tokens_per_s, peak_rss_bytes, stop_reason
        case token_ids, kv_bytes, kv_bytes_final, kv_type, flops, prefill_ms, decode_ms
    }

    // JSON keeps one flat object: the compression figures sit beside the others.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        text = try c.decode(String.self, forKey: .text)
        prompt_tokens = try c.decode(Int.self, forKey: .prompt_tokens)
        generated_tokens = try c.decode(Int.self, forKey: .generated_tokens)
        ttft_ms = try c.decode(Double.self, forKey: .ttft_ms)
        prefill_tokens_per_s = try c.decode(Double.self, forKey: .prefill_tokens_per_s)
        decode_tokens_per_s = try c.decode(Double.self, forKey: .decode_tokens_per_s)
        peak_rss_bytes = try c.decode(Int.self, forKey: .peak_rss_bytes)
        stop_reason = try c.decode(StopReason.self, forKey: .stop_reason)
        token_ids = try c.decode([Int32].self, forKey: .token_ids)
        kv_bytes = try c.decode(Int.self, forKey: .kv_bytes)
        kv_bytes_final = try c.decode(Int.self, forKey: .kv_bytes_final)
        kv_type = try c.decode(KVType.self, forKey: .kv_type)
        flops = try c.decode(Int.self, forKey: .flops)
        prefill_ms = try c.decode(Double.self, forKey: .prefill_ms)
        decode_ms = try c.decode(Double.self, forKey: .decode_ms)
        // The compression figures are there when "mode" is (a result with a mode but without one
        // of them does not read).
        let mode = try decoder.container(keyedBy: ModeKey.self)
        compression = mode.contains(.mode) ? try CompressionStats(from: decoder) : nil
    }

    private enum ModeKey: CodingKey { case mode }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(text, forKey: .text)
        try c.encode(prompt_tokens, forKey: .prompt_tokens)
        try c.encode(generated_tokens, forKey: .generated_tokens)
        try c.encode(ttft_ms, forKey: .ttft_ms)
        try c.encode(prefill_tokens_per_s, forKey: .prefill_tokens_per_s)
        try c.encode(decode_tokens_per_s, forKey: .decode_tokens_per_s)
        try c.encode(peak_rss_bytes, forKey: .peak_rss_bytes)
        try c.encode(stop_reason, forKey: .stop_reason)
        try c.encode(token_ids, forKey: .token_ids)
        try c.encode(kv_bytes, forKey: .kv_bytes)
        try c.encode(kv_bytes_final, forKey: .kv_bytes_final)
        try c.encode(kv_type, forKey: .kv_type)
        try c.encode(flops, forKey: .flops)
        try c.encode(prefill_ms, forKey: .prefill_ms)
        try c.encode(decode_ms, forKey: .decode_ms)
        try compression?.encode(to: encoder)
    }
}

/// One generation as a task you pull from (the shape of mlx-swift-lm's token iterator): made
/// ready by `prepare` (text work only: tokenizing, chunking; any thread), then `prefillStep` until
/// it returns true, then `next` per token. The KV cache, the logits that predict the next token,
/// the sampler and every counter belong to the task; the model's weights are shared and
/// activations live in the caller's workspace.
///
/// Plain language-model generation is the same task without documents. With a VIST2 model it runs
/// the inference of docs/MODEL.md (section "Inference"):
///
/// 1. Prefill: the instruction as text; the documents cut by the chunker; every chunk but the last
///    rendered, encoded (vision encoder, then aligner) and prefilled as a visual block
///    (bidirectional inside the block); the last chunk stays text (T_cur).
/// 2. Decode T_cur's tokens; they see the instruction, every visual block and T_cur's prefix.
/// 3. When T_cur reaches L tokens: its last token's forward pass has already produced the logits
///    of the next token; then T_cur is detokenized, its L text entries are evicted from the KV
///    cache, it is rendered and encoded, its visual block is prefilled at the positions the text
///    had started at, and decoding continues in a new empty chunk.
///
/// Because the cache always holds [instruction, V1 ... Vk, T_cur] in that order, cache index and
/// compressed position coincide; no text of a finished chunk is ever in the cache.
///
/// A batching driver (the daemon) uses the parts of `next` separately: `state` says what a task
/// needs; `.ready` tasks `emit` their next token, `.decoding` tasks go through one
/// `Transformer.decode` together and `accept` their rows of the logits.
public final class GenerationTask: @unchecked Sendable {
    public enum State: Equatable, Sendable {
        /// Prefill steps remain.
        case prefilling
        /// The logits of the next token are here: `emit` samples it.
        case ready
        /// `token` needs a forward pass (alone or in a batch) before the next `emit`.
        case decoding(token: Int32)
        /// The current chunk is full: `prefillStep` swaps it for its visual block (the logits
        /// of the next token are kept), then the state is `.ready`.
        case swapping
        case finished(StopReason)
    }

    public let request: GenerationRequest
    public let model: EngineModel
    /// How the documents were chunked (compressed mode; the daemon keeps it for the next request).
    public let chunking: Chunking?
    public private(set) var state = State.prefilling
    public let cache: KVCache

    let lm: LanguageModel
    let tf: Transformer
    let tok: Tokenizer
    var program: PrefillProgram
    var sampler: Sampler
    var logits: [Float]
    var history: [Int32]
    var generated: [Int32] = []
    var out: StreamingText
    /// Teacher forcing: tokens fed instead of sampled, and what sees the logits that predict them.
    var forced: Forced?
    struct Forced {
        let tokens: [Int32]
        let observe: (Int, UnsafeBufferPointer<Float>) -> Void
        let onSwap: (Int) -> Void
    }

    // VIST2 chunk state during decoding.
    var current: [Int32] = []  // T_cur's tokens
    var base = 0  // cache entries before T_cur
    var swaps = 0
    var swapNs: UInt64 = 0

    // Counters.
    let created: UInt64
    var flops = 0
    var prefillNs: UInt64 = 0
    var firstToken: UInt64? = nil
    var lastToken: UInt64 = 0
    var picks = 0
    var ttftMs = 0.0
    var peakKV = 0
    var leftover = ""

    /// Tokenizes the instruction and the documents and chunks them (compressed mode): text work
    /// only, no forward pass, so it may run on any thread while the engine serves others.
    /// `isCancelled` is asked while a long text is processed. Throws for a request that cannot
    /// run (bad arguments, a context too small).
    public static func prepare(
        _ req: GenerationRequest, model: EngineModel, isCancelled: (() -> Bool)? = nil
    ) throws(EngineError) -> GenerationTask {
        try GenerationTask(req, model: model, forced: nil, compressOnly: false, isCancelled: isCancelled)
    }

    /// A task that gets documents ready for generation without generating: everything a
    /// generation over them with this instruction would prefill before its first text token (the
    /// instruction, then every finished chunk as a visual block), through `req.cache`, so that
    /// the generation that follows (or any after a restart) finds it there. Only `prompt`,
    /// `chat`, `documents`, `cache`, `previousChunking` and `kvType` of `req` matter; the task
    /// is done when `prefillStep` returns true, and `compressionResult` reports it.
    public static func prepareCompression(
        _ req: GenerationRequest, model: VIST2Model, isCancelled: (() -> Bool)? = nil
    ) throws(EngineError) -> GenerationTask {
        var r = req
        r.maxTokens = 0
        r.fullText = false
        r.images = []
        r.stop = []
        return try GenerationTask(r, model: .vist2(model), forced: nil, compressOnly: true, isCancelled: isCancelled)
    }

    /// Whether this task only compresses (`prepareCompression`).
    public let compressOnly: Bool

    init(_ req: GenerationRequest, model: EngineModel, forced: Forced?, compressOnly: Bool, isCancelled: (() -> Bool)?) throws(EngineError)
    {
        try req.validate()
        created = DispatchTime.now().uptimeNanoseconds
        request = req
        self.model = model
        self.forced = forced
        self.compressOnly = compressOnly
        let lm = model.language, tok = lm.tokenizer, tf = lm.transformer
        self.lm = lm
        self.tf = tf
        self.tok = tok
        let vist = model.vist2
        guard vist != nil || (req.documents.isEmpty && req.images.isEmpty) else {
            throw .badArgument("documents and images need a VIST2 model; this is a plain language model")
        }
        let step: (() -> Bool)? = isCancelled.map { c in { !c() } }
        let limit = lm.config.contextLength
        let instruction = req.chat ? lm.chatPrompt(req.prompt) : req.prompt
        var start = tok.encode(instruction, addSpecial: true, parseSpecial: req.chat)
        let docText = req.documents.joined(separator: "\n")
        let L = vist?.chunkLength ?? 0, m = vist?.blockSize ?? 0
        var finished: [Substring] = []
        var finishedTokens = 0
        var current: [Int32] = []
        var docTokens = 0
        var chunking: Chunking? = nil
        if let vist, !req.fullText, req.images.isEmpty, !docText.isEmpty {
            guard let c = vist.chunker.chunking(docText, reusing: req.previousChunking, step: step) else { throw .cancelled }
            chunking = c
            finished = c.chunks.dropLast().map(\.text)
            finishedTokens = c.chunks.dropLast().map(\.tokens).reduce(0, +)
            current = c.chunks.last.map { tok.encode(String($0.text), addSpecial: false) } ?? []
            docTokens = c.chunks.map(\.tokens).reduce(0, +)
        } else if !docText.isEmpty {
            guard let ids = tok.encode(docText, addSpecial: false, step: step) else { throw .cancelled }
            current = ids
            docTokens = ids.count
        }
        if compressOnly {
            guard vist != nil else { throw .badArgument("compression needs a VIST2 model") }
            // No current chunk and no first token: the instruction and the finished chunks.
            current = []
        } else if start.isEmpty && current.isEmpty {
            // An empty prompt starts from BOS (or EOS, which SmolLM2 uses as its document separator).
            guard let s = tok.bos ?? tok.eos else { throw .badArgument("the prompt is empty and the model has no BOS token") }
            start = [s]
        }
        let capacity: Int
        if compressOnly {
            let need = start.count + finished.count * m + 1
            guard need <= limit else { throw .contextOverflow(needed: need, limit: limit) }
            capacity = need
        } else if vist == nil || req.fullText {
            guard start.count + current.count < limit else { throw .contextOverflow(needed: start.count + current.count + 1, limit: limit) }
            capacity = min(limit, start.count + current.count + req.maxTokens)
        } else if !req.images.isEmpty {
            let vc = vist!.config.vision
            guard req.images.allSatisfy({ $0.count == vc.imageHeight * vc.imageWidth }) else {
                throw .badArgument("chunk images must have \(vc.imageWidth)x\(vc.imageHeight) pixels")
            }
            guard current.count <= L else { throw .badArgument("the current chunk has \(current.count) tokens, more than L = \(L)") }
            // The first generated token is predicted from the current chunk's last token, which must come after the images.
            guard !current.isEmpty else { throw .badArgument("chunk images need the current chunk's text after them") }
            let prefilled = start.count + req.images.count * m + current.count
            guard prefilled < limit else { throw .contextOverflow(needed: prefilled + 1, limit: limit) }
            let maxBlocks = req.images.count + req.maxTokens / max(1, L) + 2
            capacity = min(limit, start.count + maxBlocks * m + L + 1)
        } else {
            let prefilled = start.count + finished.count * m + current.count
            guard prefilled < limit else { throw .contextOverflow(needed: prefilled + 1, limit: limit) }
            // Room for the instruction, the blocks the documents and the generation can produce, and one live chunk.
            let maxBlocks = finished.count + (current.count + req.maxTokens) / max(1, L) + 1
            capacity = min(limit, start.count + maxBlocks * m + L + 1)
        }
        self.chunking = chunking
        cache = tf.makeCache(capacity: capacity, type: req.kvType)
        cache.sharingScope = req.sharingScope
        program = PrefillProgram(
            model: model, cache: cache, start: start, finished: finished, images: req.images, current: current,
            blockCache: req.cache, finishedTokens: finishedTokens, docTokens: docTokens)
        sampler = Sampler(forced == nil ? req.sampling : .greedy)
        logits = [Float](repeating: 0, count: lm.config.vocabSize)
        history = start + current
        self.current = current
        out = StreamingText(stops: (forced == nil ? req.stop : []).map { Array($0.utf8) })
    }

    /// Runs one bounded piece of the prefill (a slice of text tokens, one visual block, or one
    /// batch of chunk encodings) with `ws`; true once the prefill is complete and the first token
    /// can be sampled.
    @discardableResult
    public func prefillStep(_ ws: Workspace) -> Bool {
        if state == .swapping, let vist = model.vist2 {
            let t = DispatchTime.now().uptimeNanoseconds
            swap(vist, ws: ws)
            swapNs += DispatchTime.now().uptimeNanoseconds - t
            if state == .swapping { state = .ready }
            return true
        }
        guard state == .prefilling else { return true }
        let t = DispatchTime.now().uptimeNanoseconds
        let (done, f) = program.step(ws)
        flops += f
        prefillNs += DispatchTime.now().uptimeNanoseconds - t
        peakKV = max(peakKV, cache.bytesUsed)
        if done {
            base = program.base
            if let last = program.lastLogits { logits = last }
            state = .ready
        }
        return done
    }

    /// The next piece of text (possibly empty, while a character's bytes are incomplete), or nil
    /// when the generation has ended (any text held back for stop strings comes before the nil).
    /// Runs whatever the task needs first: the rest of the prefill, the last token's forward pass.
    public func next(_ ws: Workspace) -> String? {
        while true {
            switch state {
            case .prefilling, .swapping: prefillStep(ws)
            case .decoding(let token):
                let (l, f) = tf.decode([token], caches: [cache], workspace: ws)
                accept(l, row: 0, flops: f[0], ws: ws)
            case .ready: if let piece = emit() { return piece }
            case .finished:
                guard !leftover.isEmpty else { return nil }
                defer { leftover = "" }
                return leftover
            }
        }
    }

    /// Stops the task (a client cancelled or went away); the result says `cancelled`.
    public func cancel() {
        if case .finished = state { return }
        finish(.cancelled)
    }

    /// Samples the next token from the logits (state `.ready`) and returns its text, or nil when
    /// the generation ends without one. Afterwards the state is `.decoding(token)` or
    /// `.finished`; once finished, `takeLeftover` has the text held back until the end.
    public func emit() -> String? {
        guard state == .ready else { return nil }
        let index = generated.count
        guard index < request.maxTokens else {
            finish(.maxTokens)
            return nil
        }
        let token: Int32 = logits.withUnsafeBufferPointer { l in
            if let forced {
                forced.observe(index, l)
                return forced.tokens[index]
            }
            return sampler.sample(l.baseAddress!, vocab: l.count, history: history[...])
        }
        let now = DispatchTime.now().uptimeNanoseconds
        picks += 1
        if firstToken == nil {
            firstToken = now
            ttftMs = Double(now - created) / 1e6
        }
        lastToken = now
        if forced == nil && !request.ignoreEOS && tok.isEndOfGeneration(token) {
            finish(.endOfGeneration)
            return nil
        }
        generated.append(token)
        history.append(token)
        let (piece, stopped) = out.append(tok.pieceBytes(token))
        if stopped {
            finish(.stopString)
            leftover = piece
            return nil
        }
        if generated.count == request.maxTokens {
            finish(.maxTokens)
            return piece
        }
        // Room for the token: grow past the planned capacity (chunk swaps made more blocks than
        // planned) up to the backbone's context.
        if cache.count >= cache.capacity {
            let limit = lm.config.contextLength
            guard cache.capacity < limit else {
                finish(.contextFull)
                return piece
            }
            cache.reserve(min(limit, cache.capacity + max(64, (model.vist2?.chunkLength ?? 0) + 1)))
        }
        state = .decoding(token: token)
        return piece
    }

    /// Text held back at the end (for stop strings or an incomplete character), once.
    public func takeLeftover() -> String {
        defer { leftover = "" }
        return leftover
    }

    /// Takes the logits of the token this task was `.decoding` (its row of a batched step's
    /// logits) and the FLOPs of its row. At a chunk boundary the state becomes `.swapping`: the
    /// swap is a step of its own, so a batch is not held up by one member's render and encode.
    public func accept(_ batch: Logits, row: Int, flops f: Int, ws: Workspace) {
        guard case .decoding(let token) = state else { return }
        flops += f
        batch.withRow(row) { r in
            logits.withUnsafeMutableBufferPointer { $0.baseAddress!.update(from: r.baseAddress!, count: min(r.count, $0.count)) }
        }
        peakKV = max(peakKV, cache.bytesUsed)
        state = .ready
        guard let vist = model.vist2, !request.fullText else { return }
        current.append(token)
        if current.count >= vist.chunkLength { state = .swapping }
    }

    /// Chunk boundary: evicts T_cur's text and prefills its image instead. The logits of the
    /// next token were computed from T_cur's last token and are kept.
    func swap(_ vist: VIST2Model, ws: Workspace) {
        let text = tok.decode(current)
        // Generated text that does not fit one canvas becomes several images (short lines fill a
        // canvas's rows long before L tokens), so a swap can need more blocks than planned.
        // (Tokens that decode to no text at all still leave an image: a blank one.)
        let chunks = vist.chunker.chunks(text)
        let pieces = chunks.isEmpty ? [Substring("")] : chunks.map(\.text)
        // The blocks and the next token must fit the backbone's context; if they do not,
        // generation ends here with what it has written (stop reason "context").
        let limit = lm.config.contextLength
        let needed = base + pieces.count * vist.blockSize + 1
        guard needed <= limit else { return finish(.contextFull) }
        if needed > cache.capacity { cache.reserve(min(limit, max(needed + vist.chunkLength, cache.capacity + cache.capacity / 2))) }
        cache.truncate(to: base)
        flops += program.prefillBlocks(pieces, ws: ws)
        program.finishedTokens += current.count
        base = cache.count
        current = []
        swaps += 1
        peakKV = max(peakKV, cache.bytesUsed)
        forced?.onSwap(cache.count)
    }

    func finish(_ reason: StopReason) {
        state = .finished(reason)
        if reason != .stopString && reason != .cancelled { leftover = out.finish() }
    }

    /// The outcome so far (complete once the state is `.finished`).
    public var result: GenerationResult {
        let reason: StopReason
        if case .finished(let r) = state { reason = r } else { reason = .cancelled }
        let decodeNs = firstToken.map { lastToken - $0 } ?? 0
        let steps = max(0, picks - 1)  // forward passes between the first pick and the last
        let p = program
        let prompt = p.promptTokens
        var r = GenerationResult(
            text: out.text, prompt_tokens: prompt, generated_tokens: generated.count, ttft_ms: ttftMs,
            prefill_tokens_per_s: prefillNs > 0 ? Double(prompt) / (Double(prefillNs) / 1e9) : 0,
            decode_tokens_per_s: steps > 0 && decodeNs > 0 ? Double(steps) / (Double(decodeNs) / 1e9) : 0,
            peak_rss_bytes: peakRSSBytes(), stop_reason: reason, token_ids: generated, kv_bytes: peakKV,
            kv_bytes_final: cache.bytesUsed, kv_type: cache.type, flops: flops, prefill_ms: Double(prefillNs) / 1e6,
            decode_ms: Double(decodeNs) / 1e6, compression: nil)
        if let vist = model.vist2, !request.documents.isEmpty || !request.images.isEmpty || swaps > 0 {
            let visual = p.blocks * vist.visualTokens
            r.compression = .init(
                mode: request.fullText ? "full-text" : "vist2", doc_text_tokens: p.docTokens, visual_tokens: visual,
                compression_ratio: visual > 0 ? Double(p.finishedTokens) / Double(visual) : 1, render_ms: Double(p.stats.renderNs) / 1e6,
                vision_ms: Double(p.stats.visionNs) / 1e6, chunks: p.blocks, swaps: swaps, swap_ms: Double(swapNs) / 1e6,
                chunks_encoded: p.stats.encoded,
                chunk_cache_hits: p.stats.chunkHits, prefix_cache_hits: p.stats.prefixHits)
        }
        return r
    }

    /// What a compression task (`prepareCompression`) did.
    public var compressionResult: CompressionResult {
        let chunks = chunking?.chunks ?? []
        let finished = chunks.dropLast()
        let visual = finished.count * (model.vist2?.visualTokens ?? 0)
        let s = program.stats
        return CompressionResult(
            chunks: chunks.count, text_tokens: chunks.map(\.tokens).reduce(0, +), visual_tokens: visual,
            ratio: visual > 0 ? Double(finished.map(\.tokens).reduce(0, +)) / Double(visual) : 0, chunks_encoded: s.encoded,
            chunk_cache_hits: s.chunkHits, prefix_cache_hits: s.prefixHits, render_ms: Double(s.renderNs) / 1e6,
            vision_ms: Double(s.visionNs) / 1e6, elapsed_ms: Double(DispatchTime.now().uptimeNanoseconds - created) / 1e6)
    }

    /// The documents' finished chunks prefilled so far, and how many there are (progress).
    public var documentProgress: (done: Int, total: Int) { program.documentProgress }

    /// Prepares and runs a compression alone (the CLI and tests); `progress(done, total)` after
    /// every step that advanced the documents' blocks, returning false cancels.
    public static func compress(
        _ req: GenerationRequest, model: VIST2Model, progress: (Int, Int) -> Bool = { _, _ in true }
    ) throws(EngineError) -> CompressionResult {
        let task = try prepareCompression(req, model: model)
        let ws = model.language.transformer.makeWorkspace()
        var reported = -1
        while !task.prefillStep(ws) {
            let p = task.documentProgress
            if p.done != reported {
                reported = p.done
                guard progress(p.done, p.total) else { throw .cancelled }
            }
        }
        let p = task.documentProgress
        if p.total > 0 && p.done != reported { _ = progress(p.done, p.total) }
        return task.compressionResult
    }

    /// Runs the whole generation with `ws`, streaming text to `onText` (returning false cancels).
    public func run(_ ws: Workspace, onText: (String) -> Bool = { _ in true }) -> GenerationResult {
        while let piece = next(ws) {
            if !piece.isEmpty && !onText(piece) {
                cancel()
                break
            }
        }
        return result
    }

    /// Prepares and runs `req` alone (the CLI and tests), with a workspace of its own.
    public static func generate(
        _ req: GenerationRequest, model: EngineModel, onText: (String) -> Bool = { _ in true }
    ) throws(EngineError) -> GenerationResult {
        let task = try prepare(req, model: model)
        return task.run(model.language.transformer.makeWorkspace(), onText: onText)
    }

    /// Teacher forcing: feeds `tokens` instead of sampling, through the same prefill, decode and
    /// chunk swaps; `observe(j, logits)` sees the logits that predict tokens[j], and `onSwap`
    /// the number of KV entries right after each swap.
    public static func teacherForce(
        _ req: GenerationRequest, model: VIST2Model, tokens: [Int32], observe: @escaping (Int, UnsafeBufferPointer<Float>) -> Void,
        onSwap: @escaping (Int) -> Void = { _ in }
    ) throws(EngineError) -> GenerationResult {
        var r = req
        r.maxTokens = tokens.count
        r.sampling = .greedy
        r.stop = []
        let task = try GenerationTask(
            r, model: .vist2(model), forced: Forced(tokens: tokens, observe: observe, onSwap: onSwap), compressOnly: false,
            isCancelled: nil)
        return task.run(model.language.transformer.makeWorkspace())
    }
}

/// Turns token bytes into text pieces: emits only complete UTF-8 characters, and holds back any
/// tail that could still become a stop string.
struct StreamingText {
    let stops: [[UInt8]]
    var bytes: [UInt8] = []
    var emitted = 0
    var finalLength: Int? = nil

    init(stops: [[UInt8]]) { self.stops = stops }

    var text: String { String(decoding: bytes[0..<(finalLength ?? bytes.count)], as: UTF8.self) }

    /// Appends a token's bytes; returns the newly safe text and whether a stop string appeared.
    mutating func append(_ piece: [UInt8]) -> (String, Bool) {
        let searchFrom = max(0, bytes.count - (stops.map(\.count).max() ?? 0))
        bytes.append(contentsOf: piece)
        for s in stops {
            if let at = find(s, from: searchFrom) {
                finalLength = at
                let out = String(decoding: bytes[emitted..<at], as: UTF8.self)
                emitted = at
                return (out, true)
            }
        }
        var safe = bytes.count
        // Hold back the longest suffix that is a proper prefix of a stop string.
        for s in stops {
            for n in stride(from: min(s.count - 1, bytes.count), to: 0, by: -1) where bytes.suffix(n).elementsEqual(s.prefix(n)) {
                safe = min(safe, bytes.count - n)
                break
            }
        }
        // Hold back an incomplete UTF-8 sequence at the end.
        safe = completeUTF8Prefix(upTo: safe)
        guard safe > emitted else { return ("", false) }
        let out = String(decoding: bytes[emitted..<safe], as: UTF8.self)
        emitted = safe
        return (out, false)
    }

    /// The rest of the text at the end of generation.
    mutating func finish() -> String {
        let end = finalLength ?? bytes.count
        guard end > emitted else { return "" }
        let out = String(decoding: bytes[emitted..<end], as: UTF8.self)
        emitted = end
        return out
    }

    func find(_ s: [UInt8], from: Int) -> Int? {
        guard s.count <= bytes.count else { return nil }
        var i = max(0, from)
        while i + s.count <= bytes.count {
            if bytes[i] == s[0] && bytes[i..<(i + s.count)].elementsEqual(s) { return i }
            i += 1
        }
        return nil
    }

    func completeUTF8Prefix(upTo end: Int) -> Int {
        // Walk back over at most 3 continuation bytes to the last lead byte.
        var i = end
        var back = 0
        while i > emitted && back < 4 {
            let b = bytes[i - 1]
            if b & 0xC0 == 0x80 {
                i -= 1
                back += 1
                continue
            }
            let need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1
            return back + 1 >= need ? end : i - 1
        }
        return end
    }
}
