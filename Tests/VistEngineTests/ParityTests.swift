import Foundation
import Testing

@testable import VistEngine
@testable import VistKernels

/// Log-probabilities (natural log) of one logits row.
func logProbs(_ row: UnsafePointer<Float>, vocab: Int) -> (lse: Double, argmax: Int) {
    var best = 0
    for i in 0..<vocab where row[i] > row[best] { best = i }
    return (Ops.logSumExp(row, n: vocab), best)
}

/// Parity on SmolLM2-135M-Instruct Q4_1 (fixtures from scripts/make_golden.py), against two
/// independent implementations:
///
/// - the exact float64 numpy forward pass of scripts/reference_llama.py. With f32 activations
///   (the sgemm path) the engine must match it to 5e-3 nats;
/// - llama.cpp (llama-cpp-python 0.3.36). llama.cpp quantizes activations to 8 bits in its
///   Q4_1/Q8_0 products; measured against the exact reference that costs it up to 0.44 nats on
///   the top-20 log-probs of these prompts and flips the argmax at some uncertain positions. Our
///   products quantize activations the same way (decoding always; prefill too where the SIMD
///   kernels run). So we require of our f32-activation path, against llama.cpp, the same top-1
///   token, its log-prob within 0.05 and the top-20 within 0.5 nats; of our 8-bit paths
///   (prefill and decode), against the exact reference, the same top-1 and the top-20 within
///   llama.cpp's 0.5; and greedy text equal to llama.cpp's until the first near-tie, and
///   perplexity within 1% of its.
@Suite("Model parity with the exact reference and llama.cpp", .serialized)
struct ParityTests {
    @Test("With f32 activations the logits equal the exact float64 reference")
    func exactReference() throws {
        let golden = try ModelGolden.load()
        try SharedModel.with { m in
            let vocab = m.config.vocabSize
            let ws = m.transformer.makeWorkspace(exactActivations: true)  // every product through dequantized tiles and sgemm
            for p in golden.prompts {
                let label = p.text.prefix(30).debugDescription
                let cache = m.transformer.makeCache(capacity: p.ids.count)
                let logits = m.transformer.forward(p.ids, cache: cache, workspace: ws, logits: .all).logits
                for t in 0..<p.ids.count {
                    let row = logits.row(t)
                    let (lse, argmax) = logProbs(row, vocab: vocab)
                    #expect(Int32(argmax) == p.reference.argmax_per_position[t], "argmax at \(t) for \(label)")
                    if t + 1 < p.ids.count {
                        let lp = Double(row[Int(p.ids[t + 1])]) - lse
                        #expect(abs(lp - p.reference.next_token_logprobs[t]) < 5e-3, "next-token log-prob at \(t) for \(label)")
                    }
                }
                let last = logits.last
                let (lse, _) = logProbs(last, vocab: vocab)
                for (id, ref) in zip(p.reference.top_ids, p.reference.top_logprobs) {
                    #expect(abs(Double(last[Int(id)]) - lse - ref) < 5e-3, "token \(id) for \(label)")
                }
            }
        }
    }

    @Test("Prompt logits with f32 activations agree with llama.cpp within its activation-quantization error")
    func llamaCpp() throws {
        let golden = try ModelGolden.load()
        try SharedModel.with { m in
            let vocab = m.config.vocabSize
            let ws = m.transformer.makeWorkspace(exactActivations: true)
            for p in golden.prompts {
                let label = p.text.prefix(30).debugDescription
                #expect(m.tokenizer.encode(p.text, parseSpecial: true) == p.ids)
                let cache = m.transformer.makeCache(capacity: p.ids.count)
                let logits = m.transformer.forward(p.ids, cache: cache, workspace: ws, logits: .all).logits
                var agree = 0
                for t in 0..<p.ids.count where logProbs(logits.row(t), vocab: vocab).argmax == p.argmax_per_position[t] {
                    agree += 1
                }
                #expect(3 * agree >= 2 * p.ids.count, "argmax agreement \(agree)/\(p.ids.count) for \(label)")
                let last = logits.last
                let (lse, argmax) = logProbs(last, vocab: vocab)
                #expect(Int32(argmax) == p.top_ids[0], "top-1 for \(label)")
                #expect(abs(Double(last[argmax]) - lse - p.top_logprobs[0]) < 0.05, "top-1 log-prob for \(label)")
                for (id, lp) in zip(p.top_ids, p.top_logprobs) {
                    #expect(abs(Double(last[Int(id)]) - lse - lp) < 0.5, "token \(id) for \(label)")
                }
            }
        }
    }

    @Test("The prefill and decode paths (8-bit activations) stay within llama.cpp's error of the exact reference")
    func quantizedPaths() throws {
        let golden = try ModelGolden.load()
        try SharedModel.with { m in
            let vocab = m.config.vocabSize
            for p in golden.prompts {
                let ws = m.transformer.makeWorkspace()
                // The prompt at once (the engine's prefill), and token by token (decoding): every
                // product through the integer kernels.
                let prefilled = Array(
                    m.transformer.forward(p.ids, cache: m.transformer.makeCache(capacity: p.ids.count), workspace: ws, logits: .last)
                        .logits.last)
                let cache = m.transformer.makeCache(capacity: p.ids.count)
                var decoded: [Float] = []
                for id in p.ids { decoded = Array(m.transformer.decode([id], caches: [cache], workspace: ws).logits.row(0)) }
                for (path, logits) in [("prefill", prefilled), ("decode", decoded)] {
                    let (lse, argmax) = logProbs(logits, vocab: vocab)
                    #expect(Int32(argmax) == p.reference.top_ids[0], "\(path)")
                    for (id, ref) in zip(p.reference.top_ids, p.reference.top_logprobs) {
                        #expect(
                            abs(Double(logits[Int(id)]) - lse - ref) < 0.5,
                            "\(path): token \(id) for \(p.text.prefix(30).debugDescription)")
                    }
                }
            }
        }
    }

    @Test("Greedy continuations equal llama.cpp's up to the first near-tie")
    func greedy() throws {
        let golden = try ModelGolden.load()
        try SharedModel.with { m in
            for p in golden.prompts {
                let label = p.text.prefix(30).debugDescription
                let cache = m.transformer.makeCache(capacity: p.ids.count + p.greedy.count + 1)
                let ws = m.transformer.makeWorkspace()
                var logits = Array(m.transformer.forward(p.ids, cache: cache, workspace: ws, logits: .last).logits.last)
                var sampler = Sampler(.greedy)
                var matched = 0
                for expected in p.greedy {
                    let next = sampler.sample(logits, vocab: m.config.vocabSize, history: [])
                    if next != expected {
                        // Allowed only at a near-tie of the model itself: with f32 activations (the
                        // path that equals the float64 reference) the two tokens are within 0.25 of
                        // each other, and the decode path's 8-bit activations (which llama.cpp's
                        // also has, with its own rounding) moved our gap by no more than their error.
                        let gap = logits[Int(next)] - logits[Int(expected)]
                        let ids = p.ids + p.greedy[0..<matched]
                        let exact = Array(
                            m.transformer.forward(
                                ids, cache: m.transformer.makeCache(capacity: ids.count),
                                workspace: m.transformer.makeWorkspace(exactActivations: true), logits: .last
                            ).logits.last)
                        let exactGap = exact[Int(next)] - exact[Int(expected)]
                        #expect(
                            abs(exactGap) < 0.25 && gap < 1.0,
                            "greedy diverged at token \(matched) with a logit gap of \(gap) (\(exactGap) with f32 activations) for \(label)"
                        )
                        break
                    }
                    matched += 1
                    logits = Array(m.transformer.decode([next], caches: [cache], workspace: ws).logits.row(0))
                }
                #expect(matched >= min(4, p.greedy.count), "only \(matched) greedy tokens matched for \(label)")
            }
        }
    }

    @Test("Perplexity is within 1% of llama-perplexity on the same file and context")
    func perplexity() throws {
        let golden = try ModelGolden.load()
        let ref = try #require(golden.perplexity, "the fixture has no llama-perplexity result")
        let text = try String(contentsOfFile: ref.file, encoding: .utf8)
        let r = try SharedModel.with { try $0.perplexity(text: text, ctx: ref.ctx) }
        let rel = abs(r.perplexity - ref.llama_perplexity) / ref.llama_perplexity
        print("perplexity: vist2 \(r.perplexity), llama.cpp \(ref.llama_perplexity), \(rel * 100)%")
        #expect(rel < 0.01, "vist2 \(r.perplexity) vs llama.cpp \(ref.llama_perplexity) (\(rel * 100)%)")
    }
}
