import Foundation
import VistTokenizer

/// What to generate.
public struct GenerationRequest: Sendable {
    public var prompt: String
    /// Wrap the prompt in the model's chat template (ChatML) as one user message.
    public var chat = false
    public var maxTokens = 128
    public var sampling = SamplingParams()
    /// Generation stops before the first occurrence of any of these strings.
    public var stop: [String] = []
    /// Keep generating past end-of-generation tokens (for benchmarks, like llama.cpp's --ignore-eos).
    public var ignoreEOS = false
    /// Called between decode steps (and between visual blocks of a VIST2 prefill), where the
    /// engine's run state is free: the daemon runs other clients' requests there so that they
    /// interleave. Time spent in it is left out of this request's decode speed, and its FLOPs out
    /// of this request's count.
    public var yield: (@Sendable () -> Void)? = nil
    /// Asked with `yield` during the prefill (between sub-batches of `Transformer.stepBatch`
    /// tokens, and while documents are tokenized): true ends the request with `.cancelled`.
    /// During decoding `onText` returning false cancels.
    public var isCancelled: (@Sendable () -> Bool)? = nil

    /// The prefill's pause point, or nil when the caller set neither `yield` nor `isCancelled`
    /// (the prefill then runs in whole batches). Time spent in it is added to `paused`.
    func prefillStep(paused: PauseClock? = nil) -> (() -> Bool)? {
        guard yield != nil || isCancelled != nil else { return nil }
        let (y, c) = (yield, isCancelled)
        return {
            let t = DispatchTime.now().uptimeNanoseconds
            y?()
            paused?.ns += DispatchTime.now().uptimeNanoseconds - t
            return !(c?() ?? false)
        }
    }

    public init(prompt: String) { self.prompt = prompt }

    public func validate() throws(EngineError) {
        try sampling.validate()
        guard maxTokens >= 0, maxTokens <= 1 << 20 else { throw .badArgument("max tokens must be in 0...\(1 << 20), got \(maxTokens)") }
        guard stop.allSatisfy({ !$0.isEmpty }) else { throw .badArgument("stop strings must not be empty") }
    }
}

/// Why generation ended.
public enum StopReason: String, Sendable, Codable {
    case endOfGeneration = "eos"
    case stopString = "stop"
    case maxTokens = "length"
    case contextFull = "context"
    case cancelled
}

/// The outcome and timings of one generation; field names are the `--json` keys.
public struct GenerationResult: Sendable, Codable {
    public var text: String
    public var prompt_tokens: Int
    public var generated_tokens: Int
    public var ttft_ms: Double
    public var prefill_tokens_per_s: Double
    public var decode_tokens_per_s: Double
    public var peak_rss_bytes: Int
    public var stop_reason: StopReason
    public var token_ids: [Int32]
}

/// Runs prefill and decode for one request and streams text as it becomes valid UTF-8.
public struct Generator {
    public let model: LanguageModel

    public init(model: LanguageModel) { self.model = model }

    /// Generates; `onText` receives each new piece of text and returns false to cancel.
    public func generate(_ req: GenerationRequest, onText: (String) -> Bool = { _ in true }) throws(EngineError) -> GenerationResult {
        try req.validate()
        let tok = model.tokenizer
        let promptText = req.chat ? model.chatPrompt(req.prompt) : req.prompt
        // The chat template's markers are control tokens; a plain prompt is plain text.
        var tokens = tok.encode(promptText, addSpecial: true, parseSpecial: req.chat)
        if tokens.isEmpty {
            // An empty prompt starts from BOS (or EOS, which SmolLM2 uses as its document separator).
            guard let start = tok.bos ?? tok.eos else { throw .badArgument("the prompt is empty and the model has no BOS token") }
            tokens = [start]
        }
        let limit = model.config.contextLength
        guard tokens.count < limit else { throw .contextOverflow(needed: tokens.count + 1, limit: limit) }
        let capacity = min(limit, tokens.count + req.maxTokens)
        let cache = model.transformer.makeCache(capacity: capacity)
        var sampler = Sampler(req.sampling)
        let vocab = model.config.vocabSize
        let tf = model.transformer

        let t0 = DispatchTime.now().uptimeNanoseconds
        let paused = PauseClock()
        guard tf.forward(tokens, cache: cache, logits: .last, step: req.prefillStep(paused: paused)) else { throw .cancelled }
        // Other clients' work run in the pauses is not this prefill's time.
        let prefillNs = DispatchTime.now().uptimeNanoseconds - t0 - paused.ns
        let d = DecodeLoop.run(
            tokenizer: tok, prompt: tokens, maxTokens: req.maxTokens, stop: req.stop, stopAtEOS: !req.ignoreEOS, start: t0,
            pause: req.yield, pick: { _, history in sampler.sample(tf.logits, vocab: vocab, history: history) },
            step: { next in
                guard cache.count < cache.capacity else { return .contextFull }
                tf.forward([next], cache: cache, logits: .last)
                return nil
            }, onText: onText)
        // Decode speed counts the forward passes after the first token (tokens 2...n).
        let decodeSteps = max(0, d.generated.count - 1)
        return GenerationResult(
            text: d.text, prompt_tokens: tokens.count, generated_tokens: d.generated.count, ttft_ms: d.ttftMs,
            prefill_tokens_per_s: Double(tokens.count) / (Double(prefillNs) / 1e9),
            decode_tokens_per_s: decodeSteps > 0 ? Double(decodeSteps) / (Double(d.decodeNs) / 1e9) : 0,
            peak_rss_bytes: peakRSSBytes(), stop_reason: d.reason, token_ids: d.generated)
    }
}

/// The token loop both generators share: pick the next token, stop at end-of-generation, a stop
/// string, cancellation by the caller, or the token budget; stream text as it becomes valid
/// UTF-8; otherwise let `step` run the token through the model (it may end the loop, e.g. when
/// the cache is full).
enum DecodeLoop {
    struct Outcome {
        var generated: [Int32]
        var text: String
        var reason: StopReason
        var ttftMs: Double
        var decodeNs: UInt64
    }

    /// `pick(index, history)` chooses token `index` of the generation; `history` is the prompt
    /// plus what was generated so far. `start` is when the request began (for the TTFT).
    static func run(
        tokenizer tok: Tokenizer, prompt: [Int32], maxTokens: Int, stop: [String], stopAtEOS: Bool, start: UInt64,
        pause: (() -> Void)? = nil, pick: (Int, ArraySlice<Int32>) -> Int32, step: (Int32) -> StopReason?,
        onText: (String) -> Bool
    ) -> Outcome {
        var pausedNs: UInt64 = 0
        var history = prompt
        var generated: [Int32] = []
        var out = StreamingText(stops: stop.map { Array($0.utf8) })
        var reason = StopReason.maxTokens
        var ttft = 0.0
        var decodeStart = DispatchTime.now().uptimeNanoseconds
        while generated.count < maxTokens {
            let next = pick(generated.count, history[...])
            if generated.isEmpty {
                ttft = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
                decodeStart = DispatchTime.now().uptimeNanoseconds
            }
            if stopAtEOS && tok.isEndOfGeneration(next) {
                reason = .endOfGeneration
                break
            }
            generated.append(next)
            history.append(next)
            let (piece, stopped) = out.append(tok.pieceBytes(next))
            if !piece.isEmpty && !onText(piece) {
                reason = .cancelled
                break
            }
            if stopped {
                reason = .stopString
                break
            }
            if generated.count == maxTokens { break }
            if let pause {
                let t = DispatchTime.now().uptimeNanoseconds
                pause()
                pausedNs += DispatchTime.now().uptimeNanoseconds - t
            }
            if let r = step(next) {
                reason = r
                break
            }
        }
        if reason != .stopString && reason != .cancelled {
            let rest = out.finish()
            if !rest.isEmpty { _ = onText(rest) }
        }
        return Outcome(
            generated: generated, text: out.text, reason: reason, ttftMs: ttft,
            decodeNs: DispatchTime.now().uptimeNanoseconds - decodeStart - pausedNs)
    }
}

/// Turns token bytes into text pieces: emits only complete UTF-8 characters, and holds back any
/// tail that could still become a stop string.
struct StreamingText {
    let stops: [[UInt8]]
    var bytes: [UInt8] = []
    var emitted = 0
    var finalLength: Int? = nil

    init(stops: [[UInt8]]) { self.stops = stops }

    var text: String { String(decoding: bytes[0..<(finalLength ?? bytes.count)], as: UTF8.self) }

    /// Appends a token's bytes; returns the newly safe text and whether a stop string appeared.
    mutating func append(_ piece: [UInt8]) -> (String, Bool) {
        let searchFrom = max(0, bytes.count - (stops.map(\.count).max() ?? 0))
        bytes.append(contentsOf: piece)
        for s in stops {
            if let at = find(s, from: searchFrom) {
                finalLength = at
                let out = String(decoding: bytes[emitted..<at], as: UTF8.self)
                emitted = at
                return (out, true)
            }
        }
        var safe = bytes.count
        // Hold back the longest suffix that is a proper prefix of a stop string.
        for s in stops {
            for n in stride(from: min(s.count - 1, bytes.count), to: 0, by: -1) where bytes.suffix(n).elementsEqual(s.prefix(n)) {
                safe = min(safe, bytes.count - n)
                break
            }
        }
        // Hold back an incomplete UTF-8 sequence at the end.
        safe = completeUTF8Prefix(upTo: safe)
        guard safe > emitted else { return ("", false) }
        let out = String(decoding: bytes[emitted..<safe], as: UTF8.self)
        emitted = safe
        return (out, false)
    }

    /// The rest of the text at the end of generation.
    mutating func finish() -> String {
        let end = finalLength ?? bytes.count
        guard end > emitted else { return "" }
        let out = String(decoding: bytes[emitted..<end], as: UTF8.self)
        emitted = end
        return out
    }

    func find(_ s: [UInt8], from: Int) -> Int? {
        guard s.count <= bytes.count else { return nil }
        var i = max(0, from)
        while i + s.count <= bytes.count {
            if bytes[i] == s[0] && bytes[i..<(i + s.count)].elementsEqual(s) { return i }
            i += 1
        }
        return nil
    }

    func completeUTF8Prefix(upTo end: Int) -> Int {
        // Walk back over at most 3 continuation bytes to the last lead byte.
        var i = end
        var back = 0
        while i > emitted && back < 4 {
            let b = bytes[i - 1]
            if b & 0xC0 == 0x80 {
                i -= 1
                back += 1
                continue
            }
            let need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1
            return back + 1 >= need ? end : i - 1
        }
        return end
    }
}

/// Time spent in pauses (other clients' work) during a measured phase.
final class PauseClock {
    var ns: UInt64 = 0
}
