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
            let model = EngineModel.language(m)
            func generate(_ r: GenerationRequest, onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
                try GenerationTask.generate(r, model: model, onText: onText)
            }
            var req = GenerationRequest(prompt: "1, 2, 3, 4, 5,")
            req.sampling = .greedy
            req.maxTokens = 40
            req.stop = [" 9"]
            let r = try generate(req)
            #expect(r.stop_reason == .stopString)
            #expect(r.text.hasPrefix(" 6, 7, 8,") && !r.text.contains("9"))
            req.stop = []
            req.maxTokens = 5
            let r2 = try generate(req)
            #expect(r2.stop_reason == .maxTokens && r2.generated_tokens == 5)
            var pieces = 0
            req.maxTokens = 30
            let r3 = try generate(req) { _ in
                pieces += 1
                return pieces < 3
            }
            #expect(r3.stop_reason == .cancelled && r3.generated_tokens <= 4)
            var chat = GenerationRequest(prompt: "Say hello.")
            chat.chat = true
            chat.sampling = .greedy
            chat.maxTokens = 200
            let r4 = try generate(chat)
            #expect(r4.stop_reason == .endOfGeneration && !r4.text.contains("<|im_end|>"))
            req.maxTokens = -1
            #expect(throws: EngineError.self) { try generate(req) }
        }
    }
}

@Suite("Long work in steps", .serialized)
struct StepTests {
    @Test("A prefill in steps runs in stepBatch slices (a short tail joins the last) and gives the one-batch logits")
    func forwardInSteps() throws {
        try SharedModel.with { m in
            let tf = m.transformer
            #expect(tf.stepBatch == 64)  // SmolLM2-135M: ~16 GFLOP of layer work
            #expect(tf.prefillSlices(200) == [0..<64, 64..<128, 128..<200])  // the 8-token tail joins the third
            #expect(tf.prefillSlices(64) == [0..<64])
            #expect(tf.prefillSlices(0).isEmpty)
            let ids = (0..<200).map { Int32(100 + $0 * 7) }
            let ws = tf.makeWorkspace()
            let plain = tf.makeCache(capacity: 256)
            let want = Array(tf.forward(ids, cache: plain, workspace: ws, logits: .last).logits.last)
            let stepped = tf.makeCache(capacity: 256)
            var got: [Float] = []
            for r in tf.prefillSlices(ids.count) {
                let pass = tf.forward(ids[r], cache: stepped, workspace: ws, logits: r.upperBound == ids.count ? .last : .none)
                #expect(stepped.count == r.upperBound)
                if r.upperBound == ids.count { got = Array(pass.logits.last) }
            }
            let diff = zip(want, got).map { abs($0 - $1) }.max() ?? 1
            #expect(diff < 0.05, "max logit difference \(diff)")
            #expect(want.indices.max { want[$0] < want[$1] } == got.indices.max { got[$0] < got[$1] })
        }
    }

    @Test("A generation prefills in bounded steps and can be cancelled between them; perplexity and bench run in steps")
    func prefillSteps() throws {
        try SharedModel.with { m in
            let ws = m.transformer.makeWorkspace()
            let req = GenerationRequest(prompt: String(repeating: "Tell me a story about a cat. ", count: 60))  // ~420 tokens
            let task = try GenerationTask.prepare(req, model: .language(m))
            let slices = m.transformer.prefillSlices(task.cache.capacity - req.maxTokens)
            var steps = 0
            while !task.prefillStep(ws) {
                steps += 1
                #expect(task.cache.count == slices[steps - 1].upperBound)
                #expect(task.state == .prefilling)
            }
            #expect(steps + 1 == slices.count && task.state == .ready)
            let cancelled = try GenerationTask.prepare(req, model: .language(m))
            cancelled.prefillStep(ws)
            cancelled.cancel()
            #expect(cancelled.state == .finished(.cancelled) && cancelled.next(ws) == nil)
            #expect(cancelled.result.stop_reason == .cancelled && cancelled.cache.count == 64)

            let text = String(repeating: "The quick brown fox jumps over the lazy dog. ", count: 200)
            let ppl = try PerplexityTask(model: m, text: text, ctx: 128, sliced: true)
            var pplSteps = 0
            while !ppl.step(ws) { pplSteps += 1 }
            #expect(pplSteps + 1 == ppl.windows * 2)  // two 64-token slices per 128-token window
            let whole = try m.perplexity(text: text, ctx: 128)
            #expect(abs(whole.perplexity - ppl.result.perplexity) / whole.perplexity < 1e-3)
            let bench = try BenchTask(model: m, prompt: 256, generate: 4, repetitions: 1, sliced: true)
            var benchSteps = 0
            while !bench.step(ws) { benchSteps += 1 }
            #expect(benchSteps + 1 == 2 * 4 + 2 * 4)  // (warm-up + 1 run) x (4 pp slices, then 4 tg tokens)
            #expect(bench.result.pp_tokens_per_s > 0 && bench.result.tg_tokens_per_s > 0)
        }
    }
}
