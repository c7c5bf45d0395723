import Foundation

/// Sampling parameters. The order of operations follows llama.cpp's default sampler chain:
/// repetition penalty, top-k, top-p, min-p, temperature, then a draw from the distribution.
/// `temperature <= 0` is greedy decoding (argmax after the penalty).
public struct SamplingParams: Sendable, Codable, Equatable {
    public var temperature: Float = 0.8
    public var topK: Int = 40
    public var topP: Float = 0.95
    public var minP: Float = 0.05
    public var repetitionPenalty: Float = 1.0
    /// How many of the most recent tokens the repetition penalty looks at.
    public var repetitionWindow: Int = 64
    public var seed: UInt64 = 0

    public init() {}

    public static var greedy: SamplingParams {
        var p = SamplingParams()
        p.temperature = 0
        return p
    }

    /// Checks ranges, naming the parameter at fault.
    public func validate() throws(EngineError) {
        guard temperature.isFinite, temperature >= 0 else { throw .badArgument("temperature must be >= 0, got \(temperature)") }
        guard topK >= 0 else { throw .badArgument("top-k must be >= 0 (0 disables it), got \(topK)") }
        guard topP.isFinite, topP > 0, topP <= 1 else { throw .badArgument("top-p must be in (0, 1], got \(topP)") }
        guard minP.isFinite, minP >= 0, minP < 1 else { throw .badArgument("min-p must be in [0, 1), got \(minP)") }
        guard repetitionPenalty.isFinite, repetitionPenalty > 0 else {
            throw .badArgument("repetition penalty must be > 0, got \(repetitionPenalty)")
        }
        guard repetitionWindow >= 0 else { throw .badArgument("repetition window must be >= 0") }
    }
}

/// xoshiro256** seeded through splitmix64: a small, fast, reproducible generator, so the same
/// seed gives the same text on every machine.
public struct Xoshiro256: RandomNumberGenerator, Sendable {
    var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var z = seed
        func splitmix() -> UInt64 {
            z &+= 0x9E37_79B9_7F4A_7C15
            var r = z
            r = (r ^ (r >> 30)) &* 0xBF58_476D_1CE4_E5B9
            r = (r ^ (r >> 27)) &* 0x94D0_49BB_1331_11EB
            return r ^ (r >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }

    /// Uniform in [0, 1).
    public mutating func nextFloat() -> Double { Double(next() >> 11) * 0x1.0p-53 }
}

public struct Sampler: Sendable {
    public let params: SamplingParams
    var rng: Xoshiro256
    /// The logits after the repetition penalty (vocab).
    var scratch: [Float] = []
    /// Surviving candidates, best first.
    var candidates: [(id: Int32, logit: Float)] = []

    public init(_ params: SamplingParams) {
        self.params = params
        rng = Xoshiro256(seed: params.seed)
    }

    /// Picks the next token from `logits` (vocab floats); `history` feeds the repetition penalty.
    /// Allocation-free after the first call, and O(vocab) for top-k (a k-element heap, no sort of
    /// the vocabulary), so sampling costs far less than a decode step.
    public mutating func sample(_ logits: UnsafePointer<Float>, vocab: Int, history: ArraySlice<Int32>) -> Int32 {
        let p = params
        if scratch.count != vocab { scratch = [Float](repeating: 0, count: vocab) }
        scratch.withUnsafeMutableBufferPointer { $0.baseAddress!.update(from: logits, count: vocab) }
        if p.repetitionPenalty != 1, p.repetitionWindow > 0 {
            // llama.cpp's penalty: divide positive logits, multiply negative ones, once per distinct token.
            var seen = Set<Int32>()
            for id in history.suffix(p.repetitionWindow) where id >= 0 && Int(id) < vocab && seen.insert(id).inserted {
                let l = scratch[Int(id)]
                scratch[Int(id)] = l > 0 ? l / p.repetitionPenalty : l * p.repetitionPenalty
            }
        }
        if p.temperature <= 0 {
            return scratch.withUnsafeBufferPointer { b in
                var best = 0
                for i in 1..<vocab where b[i] > b[best] { best = i }
                return Int32(best)
            }
        }
        selectTopK(p.topK > 0 ? min(p.topK, vocab) : vocab)

        // Softmax at temperature 1 for top-p and min-p (llama.cpp applies temperature last).
        let maxLogit = candidates[0].logit
        var keep = candidates.count
        if p.topP < 1 || p.minP > 0 {
            var total = 0.0
            for c in candidates { total += exp(Double(c.logit - maxLogit)) }
            if p.topP < 1 {
                var cum = 0.0
                for (i, c) in candidates.enumerated() {
                    cum += exp(Double(c.logit - maxLogit)) / total
                    if cum >= Double(p.topP) {
                        keep = i + 1
                        break
                    }
                }
            }
            if p.minP > 0 {
                // p_i >= minP * p_max  <=>  logit_i - max >= log(minP)
                let threshold = log(Double(p.minP))
                var n = 0
                while n < keep && Double(candidates[n].logit - maxLogit) >= threshold { n += 1 }
                keep = max(1, n)
            }
        }
        // Temperature on the survivors, then draw.
        var total = 0.0
        for i in 0..<keep { total += exp(Double(candidates[i].logit - maxLogit) / Double(p.temperature)) }
        var r = rng.nextFloat() * total
        for i in 0..<keep {
            r -= exp(Double(candidates[i].logit - maxLogit) / Double(p.temperature))
            if r < 0 { return candidates[i].id }
        }
        return candidates[keep - 1].id
    }

    /// The k best (id, logit) of `scratch` into `candidates`, best first; ties by lower id.
    mutating func selectTopK(_ k: Int) {
        candidates.removeAll(keepingCapacity: true)
        scratch.withUnsafeBufferPointer { b in
            if k >= b.count {
                for i in 0..<b.count { candidates.append((Int32(i), b[i])) }
            } else {
                // Min-heap of the k best seen so far; its root is the worst of them.
                func worse(_ a: (id: Int32, logit: Float), _ c: (id: Int32, logit: Float)) -> Bool {
                    a.logit < c.logit || (a.logit == c.logit && a.id > c.id)
                }
                for i in 0..<b.count {
                    let item = (id: Int32(i), logit: b[i])
                    if candidates.count < k {
                        candidates.append(item)
                        var c = candidates.count - 1
                        while c > 0, worse(candidates[c], candidates[(c - 1) / 2]) {
                            candidates.swapAt(c, (c - 1) / 2)
                            c = (c - 1) / 2
                        }
                    } else if worse(candidates[0], item) {
                        candidates[0] = item
                        var c = 0
                        while true {
                            let l = 2 * c + 1, r = l + 1
                            var m = c
                            if l < k, worse(candidates[l], candidates[m]) { m = l }
                            if r < k, worse(candidates[r], candidates[m]) { m = r }
                            if m == c { break }
                            candidates.swapAt(c, m)
                            c = m
                        }
                    }
                }
            }
        }
        candidates.sort { $0.logit > $1.logit || ($0.logit == $1.logit && $0.id < $1.id) }
    }
}
