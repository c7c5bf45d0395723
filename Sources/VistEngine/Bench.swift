import Foundation
import VistKernels

/// Throughput measured the way llama.cpp's `llama-bench` measures pp/tg:
/// - pp N: one batch of N random tokens from an empty cache, logits for the last token only;
/// - tg N: N single-token forward passes from an empty cache, each producing logits;
/// - one untimed warm-up run of each, then `repetitions` timed runs; the mean of the per-run
///   tokens/s is reported (llama-bench's `avg_ts`), with the standard deviation.
public struct BenchResult: Sendable, Codable {
    public var pp_tokens: Int
    public var tg_tokens: Int
    public var threads: Int
    public var repetitions: Int
    public var pp_tokens_per_s: Double
    public var pp_stddev: Double
    public var tg_tokens_per_s: Double
    public var tg_stddev: Double
    public var peak_rss_bytes: Int
    public var model_bytes: Int
    public var simd: String
}

/// A benchmark in steps: each `step` is one timed forward pass (a pp slice or run, or one tg
/// token), or the bookkeeping between runs. Only the passes are timed, so a driver may run other
/// requests between steps without changing the figures.
public final class BenchTask: @unchecked Sendable {
    let lm: LanguageModel
    public let prompt: Int
    public let generate: Int
    public let repetitions: Int
    let slices: [Range<Int>]
    let ppCache: KVCache
    let tgCache: KVCache
    var rng = Xoshiro256(seed: 1234)
    // Where the run stands: phase 0 = pp, 1 = tg; run 0 is the warm-up.
    var phase = 0
    var run = 0
    var position = 0
    var tokens: [Int32] = []
    var elapsed: UInt64 = 0
    var pp: [Double] = []
    var tg: [Double] = []

    /// With `sliced`, pp runs go in `Transformer.prefillSlices` (as the daemon prefills), else in
    /// one batch (llama-bench's method).
    public init(model lm: LanguageModel, prompt: Int, generate: Int, repetitions: Int, sliced: Bool = false, kvType: KVType = .f32)
        throws(EngineError)
    {
        let config = lm.config
        guard prompt >= 0, generate >= 0, prompt + generate > 0 else { throw .badArgument("-p and -n must be >= 0 and not both 0") }
        guard prompt <= config.contextLength, generate <= config.contextLength else {
            throw .contextOverflow(needed: max(prompt, generate), limit: config.contextLength)
        }
        guard repetitions >= 1, repetitions <= 1000 else { throw .badArgument("repetitions must be in 1...1000") }
        self.lm = lm
        self.prompt = prompt
        self.generate = generate
        self.repetitions = repetitions
        let tf = lm.transformer
        slices = sliced ? tf.prefillSlices(prompt) : [0..<prompt]
        ppCache = tf.makeCache(capacity: max(1, prompt), type: kvType)
        tgCache = tf.makeCache(capacity: max(1, generate), type: kvType)
        phase = prompt > 0 ? 0 : 1
    }

    public var isDone: Bool { phase == 2 }

    func randomTokens(_ n: Int) -> [Int32] { (0..<n).map { _ in Int32(rng.next() % UInt64(lm.config.vocabSize)) } }

    /// Runs one timed pass; true when every run is done.
    @discardableResult
    public func step(_ ws: Workspace) -> Bool {
        let tf = lm.transformer
        switch phase {
        case 0:
            if position == 0 {
                tokens = randomTokens(prompt)
                ppCache.truncate(to: 0)
                elapsed = 0
            }
            let r = slices[position]
            let t0 = DispatchTime.now().uptimeNanoseconds
            _ = tf.forward(tokens[r], cache: ppCache, workspace: ws, logits: r.upperBound == prompt ? .last : .none)
            elapsed += DispatchTime.now().uptimeNanoseconds - t0
            position += 1
            if position == slices.count {
                if run > 0 { pp.append(Double(prompt) / (Double(elapsed) / 1e9)) }
                position = 0
                run += 1
                if run > repetitions {
                    run = 0
                    phase = generate > 0 ? 1 : 2
                }
            }
        case 1:
            if position == 0 {
                tokens = randomTokens(generate)
                tgCache.truncate(to: 0)
                elapsed = 0
            }
            let t0 = DispatchTime.now().uptimeNanoseconds
            _ = tf.decode([tokens[position]], caches: [tgCache], workspace: ws)
            elapsed += DispatchTime.now().uptimeNanoseconds - t0
            position += 1
            if position == generate {
                if run > 0 { tg.append(Double(generate) / (Double(elapsed) / 1e9)) }
                position = 0
                run += 1
                if run > repetitions { phase = 2 }
            }
        default: break
        }
        return isDone
    }

    public var result: BenchResult {
        func stats(_ xs: [Double]) -> (Double, Double) {
            guard !xs.isEmpty else { return (0, 0) }
            let m = xs.reduce(0, +) / Double(xs.count)
            let v = xs.count > 1 ? xs.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(xs.count - 1) : 0
            return (m, v.squareRoot())
        }
        let (ppm, pps) = stats(pp)
        let (tgm, tgs) = stats(tg)
        return BenchResult(
            pp_tokens: prompt, tg_tokens: generate, threads: lm.transformer.pool.size, repetitions: repetitions,
            pp_tokens_per_s: ppm, pp_stddev: pps, tg_tokens_per_s: tgm, tg_stddev: tgs,
            peak_rss_bytes: peakRSSBytes(), model_bytes: lm.weights.weightBytes, simd: VistKernels.simdPath)
    }
}

extension LanguageModel {
    /// Runs a benchmark alone (`BenchTask`, one batch per pp run).
    public func bench(prompt: Int, generate: Int, repetitions: Int, kvType: KVType = .f32) throws(EngineError) -> BenchResult {
        let task = try BenchTask(model: self, prompt: prompt, generate: generate, repetitions: repetitions, kvType: kvType)
        let ws = transformer.makeWorkspace()
        while !task.step(ws) {}
        return task.result
    }
}
