import Foundation
import VistKernels

/// Perplexity exactly as llama.cpp's `llama-perplexity` computes it (its `perplexity()` function):
///
/// - Tokenize the whole file once, adding BOS only if the vocabulary asks for it, without parsing
///   special tokens.
/// - Split the tokens into floor(n / ctx) non-overlapping windows of `ctx` tokens (the tail is
///   dropped); at least 2 windows are required.
/// - Each window starts from an empty KV cache; if the vocabulary adds BOS, the window's first
///   token is replaced by BOS.
/// - Score only the second half: the logits at positions first = ctx/2 ... ctx-2 predict tokens
///   first+1 ... ctx-1, giving ctx - 1 - first scored tokens per window.
/// - perplexity = exp(mean negative log-likelihood over all scored tokens).
public struct PerplexityResult: Sendable, Codable {
    public var perplexity: Double
    public var tokens: Int
    public var windows: Int
    public var scored_tokens: Int
    public var ctx: Int
}

extension LanguageModel {
    /// With `step`, each window runs in forward batches of `Transformer.stepBatch` tokens (else
    /// `maxBatch`) and `step` is called after every batch and while the text is tokenized;
    /// returning false stops the computation with `.cancelled` (the daemon yields to other
    /// clients there).
    public func perplexity(
        text: String, ctx: Int, progress: (Int, Int, Double) -> Void = { _, _, _ in }, step: (() -> Bool)? = nil
    ) throws(EngineError) -> PerplexityResult {
        guard ctx >= 4, ctx <= config.contextLength else {
            throw .badArgument("--ctx must be in 4...\(config.contextLength), got \(ctx)")
        }
        guard let tokens = tokenizer.encode(text, addSpecial: true, parseSpecial: false, step: step) else { throw .cancelled }
        guard tokens.count >= 2 * ctx else {
            throw .tooFewTokens("the file tokenizes to \(tokens.count) tokens; perplexity with --ctx \(ctx) needs at least \(2 * ctx)")
        }
        let windows = tokens.count / ctx
        let first = ctx / 2
        let vocab = config.vocabSize
        let tf = transformer
        let cache = tf.makeCache(capacity: ctx)
        var nll = 0.0
        var count = 0
        for w in 0..<windows {
            var window = Array(tokens[(w * ctx)..<((w + 1) * ctx)])
            if tokenizer.addBOS, let bos = tokenizer.bos { window[0] = bos }
            cache.truncate(to: 0)
            var start = 0
            while start < ctx {
                let end = min(ctx, start + (step == nil ? tf.maxBatch : tf.stepBatch))
                let batch = Array(window[start..<end])
                let from = first - start
                if end - 1 < first {
                    tf.forward(batch, cache: cache, logits: .none)
                } else {
                    tf.forward(batch, cache: cache, logits: .from(max(0, from)))
                    // Row r of the logits is position start + max(0, from) + r.
                    let p0 = start + max(0, from)
                    for pos in p0..<min(end, ctx - 1) {
                        let row = tf.logits + (pos - p0) * vocab
                        let target = Int(window[pos + 1])
                        nll -= Double(row[target]) - Ops.logSumExp(row, n: vocab)
                        count += 1
                    }
                }
                start = end
                guard step?() ?? true else { throw .cancelled }
            }
            progress(w + 1, windows, exp(nll / Double(count)))
        }
        return PerplexityResult(
            perplexity: exp(nll / Double(count)), tokens: tokens.count, windows: windows, scored_tokens: count, ctx: ctx)
    }
}
