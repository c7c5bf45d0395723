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

extension LanguageModel {
    /// With `step`, prompts are processed in sub-batches of `Transformer.stepBatch` tokens (as
    /// the daemon prefills) and `step` is called between them, after every pass and after every
    /// generated token; returning false stops with `.cancelled` (the daemon yields to other
    /// clients there; the time spent in `step` is left out of the measurement).
    public func bench(prompt: Int, generate: Int, repetitions: Int, step: (() -> Bool)? = nil) throws(EngineError) -> BenchResult {
        guard prompt >= 0, generate >= 0, prompt + generate > 0 else { throw .badArgument("-p and -n must be >= 0 and not both 0") }
        guard prompt <= config.contextLength, generate <= config.contextLength else {
            throw .contextOverflow(needed: max(prompt, generate), limit: config.contextLength)
        }
        guard repetitions >= 1, repetitions <= 1000 else { throw .badArgument("repetitions must be in 1...1000") }
        let tf = transformer
        var rng = Xoshiro256(seed: 1234)
        func randomTokens(_ n: Int) -> [Int32] { (0..<n).map { _ in Int32(rng.next() % UInt64(config.vocabSize)) } }
        func stats(_ xs: [Double]) -> (Double, Double) {
            let m = xs.reduce(0, +) / Double(xs.count)
            let v = xs.count > 1 ? xs.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(xs.count - 1) : 0
            return (m, v.squareRoot())
        }
        var pp: [Double] = []
        if prompt > 0 {
            let cache = tf.makeCache(capacity: prompt)
            for r in 0...repetitions {
                let toks = randomTokens(prompt)
                cache.truncate(to: 0)
                // Sub-batches with `step` between them, as the daemon prefills; time spent in
                // `step` (other clients' work) is left out of the measurement.
                let paused = PauseClock()
                let t0 = DispatchTime.now().uptimeNanoseconds
                let done = tf.forward(
                    toks, cache: cache, logits: .last,
                    step: step.map { s in
                        {
                            let t = DispatchTime.now().uptimeNanoseconds
                            defer { paused.ns += DispatchTime.now().uptimeNanoseconds - t }
                            return s()
                        }
                    })
                guard done else { throw .cancelled }
                let dt = Double(DispatchTime.now().uptimeNanoseconds - t0 - paused.ns) / 1e9
                if r > 0 { pp.append(Double(prompt) / dt) }
                guard step?() ?? true else { throw .cancelled }
            }
        }
        var tg: [Double] = []
        if generate > 0 {
            let cache = tf.makeCache(capacity: generate)
            for r in 0...repetitions {
                let toks = randomTokens(generate)
                cache.truncate(to: 0)
                // Time spent in `step` (other clients' work) is left out of the measurement.
                var elapsed: UInt64 = 0
                for t in toks {
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    tf.forward([t], cache: cache, logits: .last)
                    elapsed += DispatchTime.now().uptimeNanoseconds - t0
                    guard step?() ?? true else { throw .cancelled }
                }
                let dt = Double(elapsed) / 1e9
                if r > 0 { tg.append(Double(generate) / dt) }
            }
        }
        let (ppm, pps) = pp.isEmpty ? (0, 0) : stats(pp)
        let (tgm, tgs) = tg.isEmpty ? (0, 0) : stats(tg)
        return BenchResult(
            pp_tokens: prompt, tg_tokens: generate, threads: tf.pool.size, repetitions: repetitions,
            pp_tokens_per_s: ppm, pp_stddev: pps, tg_tokens_per_s: tgm, tg_stddev: tgs,
            peak_rss_bytes: peakRSSBytes(), model_bytes: weights.weightBytes, simd: VistKernels.simdPath)
    }
}
