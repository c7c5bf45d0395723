import Foundation
import Testing

@testable import VistEngine

@Suite("Sampling and streaming")
struct SamplingTests {
    func sample(_ logits: [Float], _ p: SamplingParams, history: [Int32] = [], draws: Int = 1) -> [Int32] {
        var s = Sampler(p)
        return (0..<draws).map { _ in
            logits.withUnsafeBufferPointer { s.sample($0.baseAddress!, vocab: logits.count, history: history[...]) }
        }
    }

    @Test("Greedy picks the argmax; the repetition penalty can move it")
    func greedy() {
        let logits: [Float] = [0.1, 2.0, 1.9, -1]
        #expect(sample(logits, .greedy) == [1])
        var p = SamplingParams.greedy
        p.repetitionPenalty = 1.1
        #expect(sample(logits, p, history: [1]) == [2])  // 2.0 / 1.1 < 1.9
        #expect(
            sample(
                [-1, -0.95],
                {
                    var q = p; q.repetitionPenalty = 2; return q
                }(), history: [1]) == [0])  // negative logits are multiplied
    }

    @Test("The same seed gives the same draws, another seed other draws")
    func seeds() {
        let logits: [Float] = (0..<50).map { Float($0 % 7) * 0.3 }
        var p = SamplingParams()
        p.temperature = 1.5
        p.topK = 0
        p.topP = 1
        p.minP = 0
        p.seed = 42
        let a = sample(logits, p, draws: 200), b = sample(logits, p, draws: 200)
        p.seed = 43
        let c = sample(logits, p, draws: 200)
        #expect(a == b && a != c)
        #expect(Set(a).count > 5)
    }

    @Test("top-k, top-p and min-p keep only the tokens they should")
    func truncation() {
        let logits: [Float] = [5, 4, 3, 0, -2, -5]
        var p = SamplingParams()
        p.temperature = 1
        p.topP = 1
        p.minP = 0
        p.topK = 2
        #expect(Set(sample(logits, p, draws: 300)).isSubset(of: [0, 1]))
        p.topK = 1
        #expect(Set(sample(logits, p, draws: 50)) == [0])
        // top-p: probabilities ~ [.665, .245, .090, ...]; 0.8 keeps the first two.
        p.topK = 0
        p.topP = 0.8
        #expect(Set(sample(logits, p, draws: 300)) == [0, 1])
        // min-p 0.2: keeps tokens with p >= 0.2 * p_max, i.e. the first two.
        p.topP = 1
        p.minP = 0.2
        #expect(Set(sample(logits, p, draws: 300)) == [0, 1])
        // Empirical frequencies follow the distribution at temperature 1.
        p.minP = 0
        p.topK = 0
        let draws = sample(logits, p, draws: 4000)
        let freq0 = Double(draws.filter { $0 == 0 }.count) / 4000
        #expect(abs(freq0 - 0.665) < 0.04)
    }

    @Test("Top-k selection equals a full sort, ties broken by the lower id", arguments: [1, 2, 40, 999, 1000])
    func topKSelection(k: Int) {
        var rng = Xoshiro256(seed: UInt64(k))
        let logits = (0..<1000).map { _ in Float(rng.next() % 50) }  // many ties
        var s = Sampler(SamplingParams())
        s.scratch = logits
        s.selectTopK(k)
        let ref = logits.enumerated().sorted { $0.element > $1.element || ($0.element == $1.element && $0.offset < $1.offset) }.prefix(k)
        #expect(s.candidates.map(\.id) == ref.map { Int32($0.offset) })
    }

    @Test("Out-of-range sampling parameters are rejected with the parameter's name")
    func validation() {
        var p = SamplingParams()
        p.temperature = -1
        #expect(throws: EngineError.self) { try p.validate() }
        p = SamplingParams()
        p.topP = 0
        #expect(throws: EngineError.self) { try p.validate() }
        p = SamplingParams()
        p.minP = 1
        #expect(throws: EngineError.self) { try p.validate() }
        p = SamplingParams()
        p.repetitionPenalty = .nan
        #expect(throws: EngineError.self) { try p.validate() }
    }

    @Test("Streaming text holds back incomplete UTF-8 and possible stop strings")
    func streaming() {
        var s = StreamingText(stops: [Array("STOP".utf8)])
        var out = ""
        let euro = Array("€".utf8)  // 3 bytes
        for piece in [[UInt8](euro[0..<1]), [UInt8](euro[1..<3]), Array("ab".utf8), Array("ST".utf8), Array("O".utf8), Array("x".utf8)] {
            let (t, stopped) = s.append(piece)
            #expect(!stopped)
            out += t
        }
        #expect(out == "€abSTOx")
        var s2 = StreamingText(stops: [Array("STOP".utf8), Array("\n\n".utf8)])
        out = ""
        var stoppedAt = -1
        for (i, piece) in ["Hello", " wor", "ld S", "TOP", " more"].enumerated() {
            let (t, stopped) = s2.append(Array(piece.utf8))
            out += t
            if stopped {
                stoppedAt = i
                break
            }
        }
        #expect(stoppedAt == 3 && out == "Hello world " && s2.text == "Hello world ")
        var s3 = StreamingText(stops: [])
        #expect(s3.append(Array("a".utf8)).0 == "a")
        #expect(s3.append([0xF0, 0x9F]).0 == "")
        #expect(s3.append([0x98, 0x80]).0 == "😀")
        #expect(s3.finish() == "")
    }

    @Test("Generation stops at stop strings, EOS and max tokens, and can be cancelled")
    func generation() throws {
        try SharedModel.with { m in
            let g = Generator(model: m)
            var req = GenerationRequest(prompt: "1, 2, 3, 4, 5,")
            req.sampling = .greedy
            req.maxTokens = 40
            req.stop = [" 9"]
            let r = try g.generate(req)
            #expect(r.stop_reason == .stopString)
            #expect(r.text.hasPrefix(" 6, 7, 8,") && !r.text.contains("9"))
            req.stop = []
            req.maxTokens = 5
            let r2 = try g.generate(req)
            #expect(r2.stop_reason == .maxTokens && r2.generated_tokens == 5)
            var pieces = 0
            req.maxTokens = 30
            let r3 = try g.generate(req) { _ in
                pieces += 1
                return pieces < 3
            }
            #expect(r3.stop_reason == .cancelled && r3.generated_tokens <= 4)
            var chat = GenerationRequest(prompt: "Say hello.")
            chat.chat = true
            chat.sampling = .greedy
            chat.maxTokens = 200
            let r4 = try g.generate(chat)
            #expect(r4.stop_reason == .endOfGeneration && !r4.text.contains("<|im_end|>"))
            req.maxTokens = -1
            #expect(throws: EngineError.self) { try g.generate(req) }
        }
    }
}

@Suite("Long work in steps", .serialized)
struct StepTests {
    @Test("A forward pass with a step runs in stepBatch sub-batches, calls it between them, and stops when it says so")
    func forwardInSteps() throws {
        try SharedModel.with { m in
            let tf = m.transformer
            #expect(tf.stepBatch == 64)  // SmolLM2-135M: ~16 GFLOP of layer work
            let ids = (0..<200).map { Int32(100 + $0 * 7) }
            let plain = tf.makeCache(capacity: 256)
            tf.forward(ids, cache: plain, logits: .last)
            let want = Array(UnsafeBufferPointer(start: tf.logits, count: m.config.vocabSize))
            let stepped = tf.makeCache(capacity: 256)
            var steps: [Int] = []
            #expect(
                tf.forward(
                    ids, cache: stepped, logits: .last,
                    step: {
                        steps.append(stepped.count)
                        return true
                    }))
            #expect(steps == [64, 128])  // between sub-batches, never after the last (the 8-token tail joins the third)
            let got = Array(UnsafeBufferPointer(start: tf.logits, count: m.config.vocabSize))
            let diff = zip(want, got).map { abs($0 - $1) }.max() ?? 1
            #expect(diff < 0.05, "max logit difference \(diff)")
            #expect(want.indices.max { want[$0] < want[$1] } == got.indices.max { got[$0] < got[$1] })
            let stopped = tf.makeCache(capacity: 256)
            #expect(!tf.forward(ids, cache: stopped, logits: .last, step: { false }))
            #expect(stopped.count == 64)
        }
    }

    @Test("Generation checks for cancellation during a long prefill; perplexity and bench stop at their steps")
    func cancelledPrefill() throws {
        try SharedModel.with { m in
            var req = GenerationRequest(prompt: String(repeating: "Tell me a story about a cat. ", count: 60))  // ~420 tokens
            let asked = Counter()
            req.isCancelled = { asked.bump() >= 2 }
            func isCancelled(_ f: () throws -> Void) -> Bool {
                do { try f() } catch { if case EngineError.cancelled = error { return true } }
                return false
            }
            #expect(isCancelled { _ = try Generator(model: m).generate(req) })
            #expect(asked.value == 2)
            let text = String(repeating: "The quick brown fox jumps over the lazy dog. ", count: 200)
            #expect(isCancelled { _ = try m.perplexity(text: text, ctx: 128, step: { false }) })
            #expect(isCancelled { _ = try m.bench(prompt: 256, generate: 0, repetitions: 1, step: { false }) })
        }
    }
}

final class Counter: @unchecked Sendable {
    let lock = NSLock()
    var value = 0
    func bump() -> Int {
        lock.lock()
        defer { lock.unlock() }
        value += 1
        return value
    }
}
