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
        let docIDs = docText.isEmpty ? [] : tok.encode(docText, addSpecial: false)
        let docTokens = docIDs.count
        let flops0 = tf.flops
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
            let chunks = model.chunker.chunks(docText)
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
        func prefillText(_ ids: [Int32], logits: Bool) {
            if !ids.isEmpty { tf.forward(ids, cache: cache, logits: logits ? .last : .none) }
            peakKV = max(peakKV, cache.bytesUsed)
        }
        let startRow = model.visionStart.map { tf.embedding(of: $0) } ?? []
        let endRow = model.visionEnd.map { tf.embedding(of: $0) } ?? []
        func prefillEmbeddings(_ e: [Float], count: Int) {
            let dim = lm.config.dim, v = model.visualTokens
            for b in 0..<count {
                // One block: [vision_start] m visual tokens [vision_end], bidirectional inside.
                tf.forward(
                    embeddings: startRow + e[(b * v * dim)..<((b + 1) * v * dim)] + endRow, cache: cache, causal: false, logits: .none)
            }
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
        prefillText(start, logits: current.isEmpty && finished.isEmpty)
        // The chunker's last chunk is never empty, so with documents T_cur has text and the first
        // generated token is predicted from T_cur's last token.
        prefillBlocks(finished)
        if !req.images.isEmpty {
            let t = DispatchTime.now().uptimeNanoseconds
            let e = model.vision.encode(req.images)
            visionNs += DispatchTime.now().uptimeNanoseconds - t
            prefillEmbeddings(e, count: req.images.count)
        }
        base = cache.count
        prefillText(current, logits: true)
        let prefillNs = DispatchTime.now().uptimeNanoseconds - t0
        let promptTokens = start.count + blocks * m + current.count

        // Decode.
        var sampler = Sampler(g.sampling)
        var swaps = 0
        let d = DecodeLoop.run(
            tokenizer: tok, prompt: start + current, maxTokens: g.maxTokens, stop: g.stop,
            stopAtEOS: forced == nil && !g.ignoreEOS, start: t0,
            pick: { index, history in
                guard let forced else { return sampler.sample(tf.logits, vocab: lm.config.vocabSize, history: history) }
                forced.observe(index, tf.logits)
                return forced.tokens[index]
            },
            step: { next in
                guard cache.count < cache.capacity else { return .contextFull }
                current.append(next)
                tf.forward([next], cache: cache, logits: .last)
                peakKV = max(peakKV, cache.bytesUsed)
                guard !req.fullText && current.count >= L else { return nil }
                // Chunk boundary: evict T_cur's text, prefill its image instead. The logits of the
                // next token were computed above, from T_cur's last token.
                let text = tok.decode(current)
                let saved = Array(UnsafeBufferPointer(start: tf.logits, count: lm.config.vocabSize))
                cache.truncate(to: base)
                // Generated text that does not fit one canvas becomes several images.
                // (Tokens that decode to no text at all still leave an image: a blank one.)
                let pieces = model.chunker.chunks(text)
                prefillBlocks(pieces.isEmpty ? [Substring("")] : pieces.map(\.text))
                finishedTokens += current.count
                base = cache.count
                current = []
                swaps += 1
                forced?.onSwap(cache.count)
                saved.withUnsafeBufferPointer { tf.logits.update(from: $0.baseAddress!, count: saved.count) }
                return cache.count + 1 >= cache.capacity ? .contextFull : nil
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
            flops: tf.flops - flops0 + blocks * model.vision.flopsPerImage,
            render_ms: Double(renderNs) / 1e6, vision_ms: Double(visionNs) / 1e6, prefill_ms: Double(prefillNs) / 1e6,
            decode_ms: Double(d.decodeNs) / 1e6, chunks: blocks, swaps: swaps)
    }
}
