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
    var candidates: [(id: Int32, logit: Float)] = []

    public init(_ params: SamplingParams) {
        self.params = params
        rng = Xoshiro256(seed: params.seed)
    }

    /// Picks the next token from `logits` (vocab floats); `history` feeds the repetition penalty.
    public mutating func sample(_ logits: UnsafePointer<Float>, vocab: Int, history: ArraySlice<Int32>) -> Int32 {
        let p = params
        var penalized: [Int32: Float] = [:]
        if p.repetitionPenalty != 1, p.repetitionWindow > 0 {
            // llama.cpp's penalty: divide positive logits, multiply negative ones, once per distinct token.
            for id in history.suffix(p.repetitionWindow) where penalized[id] == nil && id >= 0 && Int(id) < vocab {
                let l = logits[Int(id)]
                penalized[id] = l > 0 ? l / p.repetitionPenalty : l * p.repetitionPenalty
            }
        }
        @inline(__always) func logit(_ i: Int) -> Float { penalized[Int32(i)] ?? logits[i] }

        if p.temperature <= 0 {
            var best = 0
            var bestValue = -Float.infinity
            for i in 0..<vocab {
                let l = logit(i)
                if l > bestValue {
                    bestValue = l
                    best = i
                }
            }
            return Int32(best)
        }

        // Top-k (0 = all), sorted by logit, descending.
        candidates.removeAll(keepingCapacity: true)
        for i in 0..<vocab { candidates.append((Int32(i), logit(i))) }
        let k = p.topK > 0 ? min(p.topK, vocab) : vocab
        if k < vocab {
            candidates.sort { $0.logit > $1.logit }
            candidates.removeSubrange(k...)
        } else {
            candidates.sort { $0.logit > $1.logit }
        }
        // Softmax at temperature 1 for top-p and min-p (llama.cpp applies temperature last).
        let maxLogit = candidates[0].logit
        var probs = candidates.map { exp(Double($0.logit - maxLogit)) }
        var total = probs.reduce(0, +)
        var keep = probs.count
        if p.topP < 1 {
            var cum = 0.0
            for (i, pr) in probs.enumerated() {
                cum += pr / total
                if cum >= Double(p.topP) {
                    keep = i + 1
                    break
                }
            }
        }
        if p.minP > 0 {
            let threshold = Double(p.minP) * probs[0]
            var n = 0
            while n < keep && probs[n] >= threshold { n += 1 }
            keep = max(1, n)
        }
        // Temperature on the survivors, then draw.
        probs = (0..<keep).map { exp(Double(candidates[$0].logit - maxLogit) / Double(p.temperature)) }
        total = probs.reduce(0, +)
        var r = rng.nextFloat() * total
        for i in 0..<keep {
            r -= probs[i]
            if r < 0 { return candidates[i].id }
        }
        return candidates[keep - 1].id
    }
}
