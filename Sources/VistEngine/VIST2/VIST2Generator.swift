import Foundation
import VistKernels
import VistRender
import VistTokenizer

/// A generation over documents, compressed (VIST2) or in full-text mode.
public struct VIST2Request: Sendable {
    public var generation: GenerationRequest
    /// Documents given as context, concatenated with a newline between them.
    public var documents: [String] = []
    /// Read the whole text with the backbone alone (the baseline VIST2 is compared against).
    public var fullText = false
    /// Finished chunks given only as their images (normalised pixels, as `GrayImage.normalized()`
    /// gives), in order; `documents` then hold just the current chunk's text. The engine never
    /// sees the text of these chunks.
    public var images: [[Float]] = []
    /// The persistent block cache to read and fill (the daemon's), if any.
    public var cache: VIST2BlockCache? = nil
    /// Called after each finished chunk of the documents is in the KV cache (done, total);
    /// returning false cancels the request.
    public var progress: (@Sendable (Int, Int) -> Bool)? = nil
    /// How an earlier version of these documents was chunked (the daemon keeps it per open
    /// document): the chunks an edit leaves alone are kept (`Chunker.chunking(_:reusing:step:)`).
    public var previousChunking: Chunking? = nil
    /// Called with the documents' chunking once it is made (compressed mode only).
    public var onChunking: (@Sendable (Chunking) -> Void)? = nil

    public init(generation: GenerationRequest, documents: [String] = [], fullText: Bool = false) {
        self.generation = generation
        self.documents = documents
        self.fullText = fullText
    }
}

/// The result of `vist2ctl generate --json` with documents: `GenerationResult`'s fields plus the
/// compression and cost figures.
public struct VIST2Result: Sendable, Codable {
    public var text: String
    public var prompt_tokens: Int
    public var generated_tokens: Int
    public var ttft_ms: Double
    public var prefill_tokens_per_s: Double
    public var decode_tokens_per_s: Double
    public var peak_rss_bytes: Int
    public var stop_reason: StopReason
    public var mode: String
    /// Tokens of the documents' text.
    public var doc_text_tokens: Int
    /// Visual tokens in the cache at the end (finished chunks x m).
    public var visual_tokens: Int
    /// Text tokens now represented by visual tokens / visual tokens.
    public var compression_ratio: Double
    /// Peak and final KV cache bytes (f32 keys and values).
    public var kv_bytes: Int
    public var kv_bytes_final: Int
    /// FLOPs of the request, counted analytically (backbone + vision encoder + aligner).
    public var flops: Int
    public var render_ms: Double
    public var vision_ms: Double
    public var prefill_ms: Double
    public var decode_ms: Double
    /// Finished chunks seen as images (from the documents and from generation).
    public var chunks: Int
    /// Chunk-boundary swaps during generation.
    public var swaps: Int
    /// Of the documents' finished chunks: rendered and encoded now, aligner outputs from the
    /// chunk cache, visual blocks whose KV came from the prefix cache.
    public var chunks_encoded: Int = 0
    public var chunk_cache_hits: Int = 0
    public var prefix_cache_hits: Int = 0
}

/// What `VIST2Generator.compress` reports.
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

/// Runs VIST2 inference as VIST2.md section 4 describes:
///
/// 1. Prefill: the instruction as text; the documents cut by the chunker; every chunk but the last
///    rendered, encoded (E then M) and prefilled as a visual block (bidirectional inside the
///    block); the last chunk stays text (T_cur).
/// 2. Decode T_cur's tokens; they see the instruction, every visual block and T_cur's prefix.
/// 3. When T_cur reaches L tokens: its last token's forward pass has already produced the logits
///    of the next token; then T_cur is detokenized, its L text entries are evicted from the KV
///    cache, it is rendered and encoded, its m visual tokens are prefilled at the positions the
///    text had started at, and decoding continues in a new empty chunk.
///
/// Because the cache always holds [instruction, V1 ... Vk, T_cur] in that order, cache index and
/// the compressed position of VIST2.md section 3 coincide: visual token k of chunk i sits at
/// P + i*m + k and text token t of the current chunk i at P + i*m + t. No text of a finished chunk
/// is ever in the cache.
public struct VIST2Generator {
    public let model: VIST2Model

    public init(model: VIST2Model) { self.model = model }

    public func generate(_ req: VIST2Request, onText: (String) -> Bool = { _ in true }) throws(EngineError) -> VIST2Result {
        try run(req, forced: nil, onText: onText)
    }

    /// Teacher forcing: feeds `tokens` instead of sampling, through the same prefill, decode and
    /// chunk swaps; `observe(j, logits)` sees the logits that predict tokens[j], and `onSwap`
    /// the number of KV entries right after each swap.
    public func teacherForce(
        _ req: VIST2Request, tokens: [Int32], observe: @escaping (Int, UnsafePointer<Float>) -> Void,
        onSwap: @escaping (Int) -> Void = { _ in }
    ) throws(EngineError) -> VIST2Result {
        var r = req
        r.generation.maxTokens = tokens.count
        r.generation.sampling = .greedy
        r.generation.stop = []
        return try run(r, forced: Forced(tokens: tokens, observe: observe, onSwap: onSwap), onText: { _ in true })
    }

    struct Forced {
        let tokens: [Int32]
        let observe: (Int, UnsafePointer<Float>) -> Void
        let onSwap: (Int) -> Void
    }

    func run(_ req: VIST2Request, forced: Forced?, onText: (String) -> Bool) throws(EngineError) -> VIST2Result {
        let g = req.generation
        try g.validate()
        let lm = model.language, tok = lm.tokenizer, tf = lm.transformer
        let L = model.chunkLength, m = model.blockSize  // positions per finished chunk (visual tokens + boundary tokens)
        let limit = lm.config.contextLength
        let instruction = g.chat ? lm.chatPrompt(g.prompt) : g.prompt
        let instrTokens = tok.encode(instruction, addSpecial: true, parseSpecial: g.chat)
        let docText = req.documents.joined(separator: "\n")
        let flops0 = tf.flops
        var foreignFlops = 0  // of other requests run in `yield`
        let pause: (() -> Void)? = g.yield.map { y in
            {
                let f0 = tf.flops
                y()
                foreignFlops += tf.flops - f0
            }
        }
        // Long work (tokenizing and chunking the documents, prefilling long text) pauses with the
        // request's `yield` and checks its cancellation between pieces.
        let isCancelled = g.isCancelled
        let textStep: (() -> Bool)? =
            pause == nil && isCancelled == nil
            ? nil
            : {
                pause?()
                return !(isCancelled?() ?? false)
            }
        guard let docIDs = docText.isEmpty ? [] : tok.encode(docText, addSpecial: false, step: textStep) else { throw .cancelled }
        let docTokens = docIDs.count
        var renderNs: UInt64 = 0, visionNs: UInt64 = 0
        let t0 = DispatchTime.now().uptimeNanoseconds

        // Cache plan and prefill.
        var finished: [Substring] = []
        var finishedTokens = 0  // text tokens of the chunks now seen only as images
        var current: [Int32] = []
        let cache: KVCache
        var blocks = 0
        var peakKV = 0
        if req.fullText {
            current = docIDs
            let need = instrTokens.count + current.count + g.maxTokens
            guard instrTokens.count + current.count < limit else { throw .contextOverflow(needed: need, limit: limit) }
            cache = tf.makeCache(capacity: min(limit, need))
        } else if !req.images.isEmpty {
            let pixels = model.config.vision.imageHeight * model.config.vision.imageWidth
            guard req.images.allSatisfy({ $0.count == pixels }) else {
                throw .badArgument("chunk images must have \(model.config.vision.imageWidth)x\(model.config.vision.imageHeight) pixels")
            }
            current = docIDs
            guard current.count <= L else { throw .badArgument("the current chunk has \(current.count) tokens, more than L = \(L)") }
            // The first generated token is predicted from the current chunk's last token, which must come after the images.
            guard !current.isEmpty else { throw .badArgument("chunk images need the current chunk's text after them") }
            let imageCount: Int = req.images.count
            let maxBlocks: Int = imageCount + g.maxTokens / max(1, L) + 2
            let need: Int = instrTokens.count + maxBlocks * m + L + 1
            let prefilled: Int = instrTokens.count + imageCount * m + current.count
            guard prefilled < limit else { throw .contextOverflow(needed: prefilled + 1, limit: limit) }
            cache = tf.makeCache(capacity: min(limit, need))
        } else {
            guard let chunking = model.chunker.chunking(docText, reusing: req.previousChunking, step: textStep) else { throw .cancelled }
            req.onChunking?(chunking)
            let chunks = chunking.chunks
            finished = chunks.dropLast().map(\.text)
            finishedTokens = chunks.dropLast().map(\.tokens).reduce(0, +)
            current = chunks.last.map { tok.encode(String($0.text), addSpecial: false) } ?? []
            // Room for the instruction, the blocks the documents and the generation can produce, and one live chunk.
            let maxBlocks = finished.count + (current.count + g.maxTokens) / max(1, L) + 1
            let need = instrTokens.count + maxBlocks * m + L + 1
            guard instrTokens.count + finished.count * m + current.count < limit else {
                throw .contextOverflow(needed: instrTokens.count + finished.count * m + current.count + 1, limit: limit)
            }
            cache = tf.makeCache(capacity: min(limit, need))
        }
        var base = 0  // cache entries before T_cur
        func prefillText(_ ids: [Int32], logits: Bool) throws(EngineError) {
            if !ids.isEmpty {
                guard tf.forward(ids, cache: cache, logits: logits ? .last : .none, step: textStep) else { throw .cancelled }
            }
            peakKV = max(peakKV, cache.bytesUsed)
        }
        func prefillEmbeddings(_ e: [Float], count: Int) {
            let dim = lm.config.dim, v = model.visualTokens
            for b in 0..<count { prefillBlock(e[(b * v * dim)..<((b + 1) * v * dim)], kv: cache) }
            blocks += count
            peakKV = max(peakKV, cache.bytesUsed)
        }
        func prefillBlocks(_ texts: [Substring]) {
            guard !texts.isEmpty else { return }
            let (e, r, v) = model.encodeChunks(texts)
            renderNs += r
            visionNs += v
            prefillEmbeddings(e, count: texts.count)
        }
        var start = instrTokens
        if start.isEmpty && current.isEmpty {
            guard let s = tok.bos ?? tok.eos else {
                throw .badArgument("the prompt and documents are empty and the model has no BOS token")
            }
            start = [s]
        }
        try prefillText(start, logits: current.isEmpty && finished.isEmpty)
        // The chunker's last chunk is never empty, so with documents T_cur has text and the first
        // generated token is predicted from T_cur's last token.
        var docStats = BlockStats()
        guard
            prefillDocumentBlocks(
                finished, root: model.prefixRoot(start), kv: cache, cache: req.cache, stats: &docStats,
                progress: { done, total in
                    pause?()
                    return req.progress?(done, total) ?? true
                })
        else {
            throw .cancelled
        }
        blocks += finished.count
        renderNs += docStats.renderNs
        visionNs += docStats.visionNs
        peakKV = max(peakKV, cache.bytesUsed)
        if !req.images.isEmpty {
            let t = DispatchTime.now().uptimeNanoseconds
            let e = model.vision.encode(req.images)
            visionNs += DispatchTime.now().uptimeNanoseconds - t
            prefillEmbeddings(e, count: req.images.count)
        }
        base = cache.count
        try prefillText(current, logits: true)
        let prefillNs = DispatchTime.now().uptimeNanoseconds - t0
        let promptTokens = start.count + blocks * m + current.count

        // Decode.
        var sampler = Sampler(g.sampling)
        var swaps = 0
        let d = DecodeLoop.run(
            tokenizer: tok, prompt: start + current, maxTokens: g.maxTokens, stop: g.stop,
            stopAtEOS: forced == nil && !g.ignoreEOS, start: t0, pause: pause,
            pick: { index, history in
                guard let forced else { return sampler.sample(tf.logits, vocab: lm.config.vocabSize, history: history) }
                forced.observe(index, tf.logits)
                return forced.tokens[index]
            },
            step: { next in
                if cache.count >= cache.capacity {
                    // Planned room is used up (swaps made more blocks than planned): grow, up to
                    // the backbone's context.
                    guard cache.capacity < limit else { return .contextFull }
                    cache.reserve(min(limit, cache.capacity + L + 1))
                }
                current.append(next)
                tf.forward([next], cache: cache, logits: .last)
                peakKV = max(peakKV, cache.bytesUsed)
                guard !req.fullText && current.count >= L else { return nil }
                // Chunk boundary: evict T_cur's text, prefill its image instead. The logits of the
                // next token were computed above, from T_cur's last token.
                let text = tok.decode(current)
                // Generated text that does not fit one canvas becomes several images (short
                // lines fill a canvas's rows long before L tokens), so a swap can need more
                // blocks than planned. (Tokens that decode to no text at all still leave an
                // image: a blank one.)
                let chunks = model.chunker.chunks(text)
                let pieces = chunks.isEmpty ? [Substring("")] : chunks.map(\.text)
                // The blocks and the next token must fit the backbone's context; if they do not,
                // generation ends here with what it has written (stop reason "context").
                let needed = base + pieces.count * m + 1
                guard needed <= limit else { return .contextFull }
                if needed > cache.capacity { cache.reserve(min(limit, max(needed + L, cache.capacity + cache.capacity / 2))) }
                let saved = Array(UnsafeBufferPointer(start: tf.logits, count: lm.config.vocabSize))
                cache.truncate(to: base)
                prefillBlocks(pieces)
                finishedTokens += current.count
                base = cache.count
                current = []
                swaps += 1
                forced?.onSwap(cache.count)
                saved.withUnsafeBufferPointer { tf.logits.update(from: $0.baseAddress!, count: saved.count) }
                return nil
            }, onText: onText)
        let steps = max(0, d.generated.count - 1)
        let visual = blocks * model.visualTokens
        return VIST2Result(
            text: d.text, prompt_tokens: promptTokens, generated_tokens: d.generated.count, ttft_ms: d.ttftMs,
            prefill_tokens_per_s: Double(promptTokens) / (Double(prefillNs) / 1e9),
            decode_tokens_per_s: steps > 0 ? Double(steps) / (Double(d.decodeNs) / 1e9) : 0,
            peak_rss_bytes: peakRSSBytes(), stop_reason: d.reason, mode: req.fullText ? "full-text" : "vist2",
            doc_text_tokens: docTokens, visual_tokens: visual,
            compression_ratio: visual > 0 ? Double(finishedTokens) / Double(visual) : 1,
            kv_bytes: peakKV, kv_bytes_final: cache.bytesUsed,
            flops: tf.flops - flops0 - foreignFlops + blocks * model.vision.flopsPerImage,
            render_ms: Double(renderNs) / 1e6, vision_ms: Double(visionNs) / 1e6, prefill_ms: Double(prefillNs) / 1e6,
            decode_ms: Double(d.decodeNs) / 1e6, chunks: blocks, swaps: swaps, chunks_encoded: docStats.encoded,
            chunk_cache_hits: docStats.chunkHits, prefix_cache_hits: docStats.prefixHits)
    }

    /// One visual block: [vision_start] m visual tokens [vision_end], bidirectional inside (or
    /// causal, with the config's `block_attention` "causal").
    /// With `logits: .last`, the block's last row predicts the token after it.
    func prefillBlock(_ e: ArraySlice<Float>, kv: KVCache, logits: LogitRows = .none) {
        let tf = model.language.transformer
        let startRow = model.visionStart.map { tf.embedding(of: $0) } ?? []
        let endRow = model.visionEnd.map { tf.embedding(of: $0) } ?? []
        tf.forward(embeddings: startRow + e + endRow, cache: kv, causal: model.config.causalBlocks, logits: logits)
    }

    /// Prefills the documents' finished chunks as visual blocks after the entries already in
    /// `kv` (whose content `root` names), doing as little work as the cache allows: the longest
    /// run of blocks whose KV is in the prefix cache is copied in; for the rest, aligner outputs
    /// come from the chunk cache or are rendered and encoded (in batches), each block is
    /// prefilled, and both levels are filled. The KV entries are the same either way (a cached
    /// entry is the stored result of the same computation). Returns false when `progress` asks
    /// to stop.
    func prefillDocumentBlocks(
        _ texts: [Substring], root: [UInt8], kv: KVCache, cache: VIST2BlockCache?, stats: inout BlockStats,
        progress: (Int, Int) -> Bool
    ) -> Bool {
        let n = texts.count
        guard n > 0 else { return true }
        let dim = model.language.config.dim, m = model.visualTokens, blockSize = model.blockSize
        let chunkKeys = cache == nil ? [] : texts.map { model.chunkKey($0) }
        var chain = root
        var i = 0
        if let cache {
            while i < n {
                let key = model.prefixKey(chain, chunkKeys[i])
                guard let rows = cache.blockKV(key: key), kv.append(rows: rows, count: blockSize) else { break }
                chain = key
                stats.prefixHits += 1
                i += 1
                guard progress(i, n) else { return false }
            }
        }
        let batch = 8
        while i < n {
            let end = min(n, i + batch)
            var outputs = [ArraySlice<Float>?](repeating: nil, count: end - i)
            if let cache {
                for j in i..<end {
                    if let e = cache.alignerOutput(key: chunkKeys[j]), e.count == m * dim {
                        outputs[j - i] = e[...]
                        stats.chunkHits += 1
                    }
                }
            }
            let missing = (i..<end).filter { outputs[$0 - i] == nil }
            if !missing.isEmpty {
                let (e, r, v) = model.encodeChunks(missing.map { texts[$0] })
                stats.renderNs += r
                stats.visionNs += v
                stats.encoded += missing.count
                for (b, j) in missing.enumerated() {
                    let slice = e[(b * m * dim)..<((b + 1) * m * dim)]
                    outputs[j - i] = slice
                    cache?.storeAlignerOutput(key: chunkKeys[j], slice)
                }
            }
            for j in i..<end {
                let at = kv.count
                prefillBlock(outputs[j - i]!, kv: kv)
                if let cache {
                    chain = model.prefixKey(chain, chunkKeys[j])
                    cache.storeBlockKV(key: chain, kv.rows(from: at, count: blockSize))
                }
                guard progress(j + 1, n) else { return false }
            }
            i = end
        }
        return true
    }

    /// Gets documents ready for generation without generating: everything a generation over
    /// them with this instruction would prefill before its first text token (the instruction,
    /// then every finished chunk as a visual block), through the cache, so that the generation
    /// that follows (or any after a restart) finds it there.
    ///
    /// `step` is called while the documents are chunked and the instruction is prefilled
    /// (returning false cancels); `progress` after every block. `previous` is how an earlier
    /// version of these documents was chunked, `onChunking` receives how they are chunked now.
    public func compress(
        documents: [String], instruction: String = "", chat: Bool = false, cache: VIST2BlockCache?,
        reusing previous: Chunking? = nil, onChunking: ((Chunking) -> Void)? = nil,
        step: (() -> Bool)? = nil, progress: (Int, Int) -> Bool = { _, _ in true }
    ) throws(EngineError) -> CompressionResult {
        let t0 = DispatchTime.now().uptimeNanoseconds
        let lm = model.language, tok = lm.tokenizer
        let text = documents.joined(separator: "\n")
        let prompt = chat ? lm.chatPrompt(instruction) : instruction
        let start = tok.encode(prompt, addSpecial: true, parseSpecial: chat)
        guard let chunking = model.chunker.chunking(text, reusing: previous, step: step) else { throw .cancelled }
        onChunking?(chunking)
        let chunks = chunking.chunks
        let finished = chunks.dropLast().map(\.text)
        let m = model.blockSize
        let need = start.count + finished.count * m + 1
        guard need <= lm.config.contextLength else { throw .contextOverflow(needed: need, limit: lm.config.contextLength) }
        let kv = lm.transformer.makeCache(capacity: need)
        if !start.isEmpty { guard lm.transformer.forward(start, cache: kv, logits: .none, step: step) else { throw .cancelled } }
        var stats = BlockStats()
        guard prefillDocumentBlocks(finished, root: model.prefixRoot(start), kv: kv, cache: cache, stats: &stats, progress: progress)
        else { throw .cancelled }
        let finishedTokens = chunks.dropLast().map(\.tokens).reduce(0, +)
        let visual = finished.count * model.visualTokens
        return CompressionResult(
            chunks: chunks.count, text_tokens: chunks.map(\.tokens).reduce(0, +), visual_tokens: visual,
            ratio: visual > 0 ? Double(finishedTokens) / Double(visual) : 0, chunks_encoded: stats.encoded,
            chunk_cache_hits: stats.chunkHits, prefix_cache_hits: stats.prefixHits, render_ms: Double(stats.renderNs) / 1e6,
            vision_ms: Double(stats.visionNs) / 1e6, elapsed_ms: Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6)
    }
}
