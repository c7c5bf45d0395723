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
///
/// One difference, on purpose: the products keep f32 activations (`MatmulScratch.exactActivations`,
/// the path equal to the float64 reference), where llama.cpp and the engine's generation quantize
/// them to 8 bits. An evaluation measures the model and the KV cache type, not the rounding of a
/// fast path: 8-bit activations re-draw their rounding on any change and move the result by up
/// to ~0.3% (an f16 cache against f32: 0.26% with them, 0.007% without).
public struct PerplexityResult: Sendable, Codable {
    public var perplexity: Double
    public var tokens: Int
    public var windows: Int
    public var scored_tokens: Int
    public var ctx: Int
}

/// A perplexity computation in steps: `init` tokenizes (text work, any thread), each `step` runs
/// one forward slice of a window (`Transformer.prefillSlices` with `sliced`, else whole batches).
public final class PerplexityTask: @unchecked Sendable {
    let lm: LanguageModel
    let tokens: [Int32]
    public let ctx: Int
    public let windows: Int
    let cache: KVCache
    let slices: [Range<Int>]
    var window = 0
    var slice = 0
    var nll = 0.0
    var count = 0

    public init(
        model lm: LanguageModel, text: String, ctx: Int, sliced: Bool = false, kvType: KVType = .f32, isCancelled: (() -> Bool)? = nil
    ) throws(EngineError) {
        guard ctx >= 4, ctx <= lm.config.contextLength else {
            throw .badArgument("--ctx must be in 4...\(lm.config.contextLength), got \(ctx)")
        }
        let step: (() -> Bool)? = isCancelled.map { c in { !c() } }
        guard let tokens = lm.tokenizer.encode(text, addSpecial: true, parseSpecial: false, step: step) else { throw .cancelled }
        guard tokens.count >= 2 * ctx else {
            throw .tooFewTokens("the file tokenizes to \(tokens.count) tokens; perplexity with --ctx \(ctx) needs at least \(2 * ctx)")
        }
        self.lm = lm
        self.tokens = tokens
        self.ctx = ctx
        windows = tokens.count / ctx
        let tf = lm.transformer
        cache = tf.makeCache(capacity: ctx, type: kvType)
        if sliced {
            slices = tf.prefillSlices(ctx)
        } else {
            slices = stride(from: 0, to: ctx, by: tf.maxBatch).map { $0..<min(ctx, $0 + tf.maxBatch) }
        }
    }

    public var isDone: Bool { window == windows }
    /// Windows finished, and the perplexity over them.
    public var progress: (windows: Int, perplexity: Double) { (window, count > 0 ? exp(nll / Double(count)) : 0) }

    /// Runs one slice; true when every window is scored.
    @discardableResult
    public func step(_ ws: Workspace) -> Bool {
        guard window < windows else { return true }
        let saved = ws.matmul.exactActivations
        ws.matmul.exactActivations = true
        defer { ws.matmul.exactActivations = saved }
        let tf = lm.transformer, vocab = lm.config.vocabSize
        var ids = Array(tokens[(window * ctx)..<((window + 1) * ctx)])
        if lm.tokenizer.addBOS, let bos = lm.tokenizer.bos { ids[0] = bos }
        if slice == 0 { cache.truncate(to: 0) }
        let r = slices[slice]
        let first = ctx / 2
        if r.upperBound - 1 < first {
            _ = tf.forward(ids[r], cache: cache, workspace: ws, logits: .none)
        } else {
            let from = max(0, first - r.lowerBound)
            let pass = tf.forward(ids[r], cache: cache, workspace: ws, logits: .from(from))
            // Row i of the logits is position r.lowerBound + from + i.
            let p0 = r.lowerBound + from
            for pos in p0..<min(r.upperBound, ctx - 1) {
                pass.logits.withRow(pos - p0) { row in
                    nll -= Double(row[Int(ids[pos + 1])]) - Ops.logSumExp(row.baseAddress!, n: vocab)
                }
                count += 1
            }
        }
        slice += 1
        if slice == slices.count {
            slice = 0
            window += 1
        }
        return window == windows
    }

    public var result: PerplexityResult {
        PerplexityResult(perplexity: progress.perplexity, tokens: tokens.count, windows: windows, scored_tokens: count, ctx: ctx)
    }
}

extension LanguageModel {
    /// Perplexity over `text` with windows of `ctx` tokens, run alone; `progress(windows done,
    /// total, perplexity so far)` after every window.
    public func perplexity(
        text: String, ctx: Int, kvType: KVType = .f32, progress: (Int, Int, Double) -> Void = { _, _, _ in }
    ) throws(EngineError) -> PerplexityResult {
        let task = try PerplexityTask(model: self, text: text, ctx: ctx, kvType: kvType)
        let ws = transformer.makeWorkspace()
        var reported = 0
        while !task.isDone {
            task.step(ws)
            let p = task.progress
            if p.windows != reported {
                reported = p.windows
                progress(p.windows, task.windows, p.perplexity)
            }
        }
        return task.result
    }
}
