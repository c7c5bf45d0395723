import Foundation
import VistKernels
import VistTokenizer

/// How faithfully a VIST2 model reads its own sketch images (docs/MODEL.md section 7), on any text.
public struct VIST2Evaluation: Sendable, Codable, Equatable {
    /// 1 - (edit distance / reference length) over all evaluated chunks, in Unicode scalars, of
    /// the greedy transcription of each chunk from its visual block alone (after the model's
    /// `ocr_prompt`), decoding as many tokens as the chunk has. Clipped at 0.
    public var ocr_char_accuracy: Double
    /// Perplexity of chunk j given nothing.
    public var ppl_none: Double
    /// ... given the full text of the `context_chunks` chunks before it.
    public var ppl_text: Double
    /// ... given only the visual blocks of those chunks.
    public var ppl_visual: Double
    /// (ppl_none - ppl_visual) / (ppl_none - ppl_text); nil when ppl_text is not below ppl_none
    /// or the text has fewer than two chunks.
    public var retention: Double?
    /// Chunks of the text (the model's chunker).
    public var chunks: Int
    /// Chunks transcribed for the OCR number.
    public var ocr_chunks: Int
    /// (context, chunk) pairs scored for the perplexities, and their scored tokens.
    public var pairs: Int
    public var scored_tokens: Int
    public var context_chunks: Int
    /// Each chunk's greedy transcription, when asked for (`keepTranscriptions`).
    public var transcriptions: [String]?

    enum CodingKeys: String, CodingKey {
        case ocr_char_accuracy, ppl_none, ppl_text, ppl_visual, retention, chunks, ocr_chunks, pairs, scored_tokens, context_chunks
        case transcriptions
    }

    /// Every key is always present; a retention that cannot be computed is null.
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(ocr_char_accuracy, forKey: .ocr_char_accuracy)
        try c.encode(ppl_none, forKey: .ppl_none)
        try c.encode(ppl_text, forKey: .ppl_text)
        try c.encode(ppl_visual, forKey: .ppl_visual)
        if let r = retention { try c.encode(r, forKey: .retention) } else { try c.encodeNil(forKey: .retention) }
        try c.encode(chunks, forKey: .chunks)
        try c.encode(ocr_chunks, forKey: .ocr_chunks)
        try c.encode(pairs, forKey: .pairs)
        try c.encode(scored_tokens, forKey: .scored_tokens)
        try c.encode(context_chunks, forKey: .context_chunks)
        try c.encodeIfPresent(transcriptions, forKey: .transcriptions)
    }
}

/// The measurements behind `vist2ctl eval`.
///
/// Conventions (the same as the training code's, Training/train.py):
/// - OCR: the sequence is `[ocr_prompt] V_i`, and the chunk's first token is predicted at the
///   block's last visual token; decoding is greedy for exactly the chunk's token count.
/// - Retention: for every chunk j >= 1, the context is the up to `contextChunks` chunks before
///   it. The three conditions score the same tokens: all of chunk j's tokens but the first,
///   whose predictor differs in kind between the conditions (nothing at all without context).
///   No instruction.
public struct VIST2Evaluator {
    public let model: VIST2Model

    public init(model: VIST2Model) { self.model = model }

    /// `progress(done, total)` after each unit of work (a transcribed chunk or a scored pair);
    /// returning false stops with `EngineError.cancelled`. `keepTranscriptions` returns each
    /// chunk's transcription too.
    public func evaluate(
        text: String, contextChunks: Int = 4, maxChunks: Int = 0, keepTranscriptions: Bool = false,
        progress: (Int, Int) -> Bool = { _, _ in true }
    ) throws(EngineError) -> VIST2Evaluation {
        guard (1...64).contains(contextChunks) else { throw .badArgument("context chunks must be in 1...64, got \(contextChunks)") }
        guard maxChunks >= 0 else { throw .badArgument("max chunks must be >= 0") }
        let lm = model.language, tok = lm.tokenizer, tf = lm.transformer
        var chunks = model.chunker.chunks(text)
        guard !chunks.isEmpty else { throw .tooFewTokens("the text is empty: nothing to evaluate") }
        if maxChunks > 0 && chunks.count > maxChunks { chunks = Array(chunks.prefix(maxChunks)) }
        let ids = chunks.map { tok.encode(String($0.text), addSpecial: false) }
        let m = model.blockSize, v = model.visualTokens, dim = lm.config.dim
        let limit = lm.config.contextLength
        let prompt = tok.encode(model.config.ocrPrompt ?? "", addSpecial: false)
        let ws = tf.makeWorkspace()

        // The visual tokens of every chunk, encoded in batches of 8; a block is prefilled (with
        // its boundary tokens, if the model has them) by VIST2Model.prefillBlock, as generation does.
        var blocks: [ArraySlice<Float>] = []
        for s in stride(from: 0, to: chunks.count, by: 8) {
            let e = model.encodeChunks(chunks[s..<min(chunks.count, s + 8)].map(\.text)).embeddings
            for b in 0..<(e.count / (v * dim)) { blocks.append(e[(b * v * dim)..<((b + 1) * v * dim)]) }
        }
        let total = chunks.count + max(0, chunks.count - 1)
        var done = 0
        func step() throws(EngineError) {
            done += 1
            if !progress(done, total) { throw .cancelled }
        }

        // OCR.
        var distance = 0, reference = 0
        var transcriptions: [String] = []
        for (i, c) in chunks.enumerated() {
            let n = ids[i].count
            guard prompt.count + m + n <= limit else { throw .contextOverflow(needed: prompt.count + m + n, limit: limit) }
            let cache = tf.makeCache(capacity: prompt.count + m + n + 1)
            if !prompt.isEmpty { _ = tf.forward(prompt, cache: cache, workspace: ws, logits: .none) }
            var logits = Array(model.prefillBlock(blocks[i], kv: cache, ws: ws, logits: .last).logits.last)
            var greedy = Sampler(.greedy)
            var out: [Int32] = []
            for k in 0..<n {
                let t = greedy.sample(logits, vocab: lm.config.vocabSize, history: [])
                out.append(t)
                if k + 1 < n { logits = Array(tf.decode([t], caches: [cache], workspace: ws).logits.row(0)) }
            }
            let want = Array(c.text.unicodeScalars)
            let decoded = tok.decode(out)
            if keepTranscriptions { transcriptions.append(decoded) }
            let got = Array(decoded.unicodeScalars)
            distance += editDistance(want, got)
            reference += want.count
            try step()
        }

        // Retention: the same tokens of chunk j under three contexts.
        var nll = (none: 0.0, text: 0.0, visual: 0.0)
        var scored = 0, pairs = 0
        for j in 1..<max(1, chunks.count) {
            let target = ids[j]
            guard target.count <= tf.maxBatch else {
                throw .badArgument("chunk \(j) has \(target.count) tokens, more than one batch (\(tf.maxBatch)) of this engine")
            }
            guard target.count >= 2 else {
                try step()
                continue
            }
            let first = max(0, j - contextChunks)
            let contextText = Array(ids[first..<j].joined())
            let need = max(contextText.count, (j - first) * m) + target.count
            guard need <= limit else { throw .contextOverflow(needed: need, limit: limit) }
            func score(_ prefill: (KVCache) -> Void) -> Double {
                let cache = tf.makeCache(capacity: need + 1)
                prefill(cache)
                let logits = tf.forward(target, cache: cache, workspace: ws, logits: .all).logits
                var s = 0.0
                // Row r predicts target[r + 1].
                let vocab = lm.config.vocabSize
                for r in 0..<(target.count - 1) {
                    logits.withRow(r) { row in s -= Double(row[Int(target[r + 1])]) - Ops.logSumExp(row.baseAddress!, n: vocab) }
                }
                return s
            }
            nll.none += score { _ in }
            nll.text += score { cache in _ = tf.forward(contextText, cache: cache, workspace: ws, logits: .none) }
            nll.visual += score { cache in
                for b in first..<j { _ = model.prefillBlock(blocks[b], kv: cache, ws: ws) }
            }
            scored += target.count - 1
            pairs += 1
            try step()
        }
        let ppl =
            scored > 0 ? (exp(nll.none / Double(scored)), exp(nll.text / Double(scored)), exp(nll.visual / Double(scored))) : (0, 0, 0)
        let retention: Double? = scored > 0 && ppl.0 > ppl.1 ? (ppl.0 - ppl.2) / (ppl.0 - ppl.1) : nil
        return VIST2Evaluation(
            ocr_char_accuracy: reference > 0 ? max(0, 1 - Double(distance) / Double(reference)) : 0,
            ppl_none: ppl.0, ppl_text: ppl.1, ppl_visual: ppl.2, retention: retention, chunks: chunks.count, ocr_chunks: chunks.count,
            pairs: pairs, scored_tokens: scored, context_chunks: contextChunks, transcriptions: keepTranscriptions ? transcriptions : nil)
    }
}

/// Levenshtein distance (insertions, deletions, substitutions of one element each).
func editDistance<T: Equatable>(_ a: [T], _ b: [T]) -> Int {
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var prev = Array(0...b.count)
    var cur = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        cur[0] = i
        for j in 1...b.count {
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
        }
        swap(&prev, &cur)
    }
    return prev[b.count]
}
