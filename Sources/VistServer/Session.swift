import Foundation
import SwiftProtobuf
import VistEngine
import VistProtocol
import VistWire

/// What every connection shares: the loaded model, the engine worker, limits and counters.
public final class ServerContext: @unchecked Sendable {
    public enum Model {
        case vist2(VIST2Model)
        case language(LanguageModel)
    }

    public let model: Model
    public let modelName: String
    public let worker: EngineWorker
    public let maxFrame: Int
    public let maxInFlight: Int
    public let started = Date()
    public static let serverVersion = "vist2d 0.1.0"
    public static let protocolVersion: UInt32 = 1
    let lock = NSLock()
    var clients = 0

    public init(model: Model, modelName: String, queueCapacity: Int, maxFrame: Int = Frame.defaultMaxPayload, maxInFlight: Int = 16) {
        self.model = model
        self.modelName = modelName
        worker = EngineWorker(capacity: queueCapacity)
        self.maxFrame = maxFrame
        self.maxInFlight = maxInFlight
    }

    var language: LanguageModel {
        switch model {
        case .vist2(let m): return m.language
        case .language(let l): return l
        }
    }

    func helloReply() -> Vist2_V1_HelloReply {
        .with {
            $0.protocolVersion = Self.protocolVersion
            $0.serverVersion = Self.serverVersion
            $0.modelName = modelName
            $0.contextLength = UInt32(language.config.contextLength)
            if case .vist2(let m) = model {
                $0.modelFingerprint = m.fingerprint
                $0.chunkLength = UInt32(m.chunkLength)
                $0.chunkRatio = UInt32(m.config.chunk.ratio)
                $0.visualTokens = UInt32(m.visualTokens)
            }
            $0.limits = .with {
                $0.maxFrameBytes = UInt32(maxFrame)
                $0.maxRequestsInFlight = UInt32(maxInFlight)
                $0.queueCapacity = UInt32(worker.capacity)
                $0.maxTokens = UInt32(language.config.contextLength)
            }
            $0.capabilities = ["generate", "status", "cancel"]
        }
    }
}

/// The protocol state of one connection, independent of sockets: bytes in through `receive`,
/// framed replies out through `send`. Called on the connection's event loop; engine jobs send
/// from the worker thread (the `send` closure hops back to the loop).
public final class Session: @unchecked Sendable {
    let context: ServerContext
    let send: @Sendable ([UInt8]) -> Void
    let close: @Sendable () -> Void
    var decoder: FrameDecoder
    var greeted = false
    let lock = NSLock()
    var inFlight: [UInt64: EngineWorker.Job] = [:]
    var closed = false

    public init(context: ServerContext, send: @escaping @Sendable ([UInt8]) -> Void, close: @escaping @Sendable () -> Void) {
        self.context = context
        self.send = send
        self.close = close
        decoder = FrameDecoder(maxPayload: context.maxFrame)
    }

    func reply(_ id: UInt64, final: Bool = true, _ fill: (inout Vist2_V1_ServerMessage) -> Void) {
        var m = Vist2_V1_ServerMessage()
        m.requestID = id
        m.final = final
        fill(&m)
        if let bytes: [UInt8] = try? m.serializedBytes(), let framed = try? Frame.encode(bytes, maxPayload: Frame.hardMaxPayload) {
            send(framed)
        }
    }

    func error(_ id: UInt64, _ code: Vist2_V1_ErrorCode, _ message: String) {
        reply(id) {
            $0.error = .with {
                $0.code = code
                $0.message = message
            }
        }
    }

    /// Bytes from the peer. A framing error is answered once and closes the connection.
    public func receive(_ bytes: [UInt8]) {
        guard !closed else { return }
        let payloads: [[UInt8]]
        do {
            payloads = try decoder.feed(bytes)
        } catch {
            if case .tooLarge = error {
                self.error(0, .frameTooLarge, error.description)
            } else {
                self.error(0, .badRequest, error.description)
            }
            closed = true
            close()
            return
        }
        for p in payloads {
            guard let m = try? Vist2_V1_ClientMessage(serializedBytes: p) else {
                error(0, .badRequest, "the frame does not hold a valid ClientMessage")
                continue
            }
            handle(m)
        }
    }

    /// The connection went away: its requests stop.
    public func disconnected() {
        closed = true
        lock.lock()
        let jobs = Array(inFlight.values)
        lock.unlock()
        for j in jobs { j.cancel() }
    }

    func handle(_ m: Vist2_V1_ClientMessage) {
        let id = m.requestID
        guard greeted else {
            guard case .hello(let h) = m.body else {
                error(id, .handshakeRequired, "send Hello first")
                return
            }
            guard h.protocolVersion == ServerContext.protocolVersion else {
                error(
                    id, .unsupportedVersion, "this server speaks protocol \(ServerContext.protocolVersion), the client \(h.protocolVersion)"
                )
                closed = true
                close()
                return
            }
            greeted = true
            reply(id) { $0.hello = context.helloReply() }
            return
        }
        switch m.body {
        case .hello:
            error(id, .badRequest, "the handshake is already done")
        case .status:
            reply(id) {
                $0.status = .with {
                    $0.state = "ready"
                    $0.queueLength = UInt32(context.worker.queueLength)
                    $0.modelName = context.modelName
                    $0.uptimeSeconds = UInt64(Date().timeIntervalSince(context.started))
                    if case .vist2(let vm) = context.model { $0.modelFingerprint = vm.fingerprint }
                }
            }
        case .cancel(let c):
            lock.lock()
            let job = inFlight[c.targetRequestID]
            lock.unlock()
            guard let job else {
                error(id, .notFound, "no request \(c.targetRequestID) in flight on this connection")
                return
            }
            job.cancel()
            reply(id) { $0.ack = Vist2_V1_Ack() }
        case .generate(let g):
            generate(id, g)
        case .none:
            error(id, .unknownRequest, "empty or unknown request body")
        default:
            error(id, .unknownRequest, "this server does not implement that request yet")
        }
    }

    /// The fields both generators report.
    static func common(
        _ text: String, _ prompt: Int, _ generated: Int, _ ttft: Double, _ prefill: Double, _ decode: Double, _ reason: StopReason
    ) -> Vist2_V1_GenerateResult {
        .with {
            $0.text = text
            $0.promptTokens = UInt32(clamping: prompt)
            $0.generatedTokens = UInt32(clamping: generated)
            $0.ttftMs = ttft
            $0.prefillTokensPerS = prefill
            $0.decodeTokensPerS = decode
            $0.stopReason = reason.rawValue
        }
    }

    func generate(_ id: UInt64, _ g: Vist2_V1_GenerateRequest) {
        lock.lock()
        let duplicate = inFlight[id] != nil
        let count = inFlight.count
        lock.unlock()
        guard !duplicate else { return error(id, .duplicateRequestID, "request \(id) is already in flight") }
        guard count < context.maxInFlight else {
            return error(id, .tooManyRequests, "at most \(context.maxInFlight) requests in flight per connection")
        }
        guard g.documentIds.isEmpty else { return error(id, .unknownDocument, "documents are not served yet") }
        var req = GenerationRequest(prompt: g.instruction)
        req.chat = g.chat
        req.maxTokens = Int(g.maxTokens == 0 ? 128 : g.maxTokens)
        req.stop = g.stop
        if g.hasSampling {
            req.sampling.temperature = g.sampling.temperature
            req.sampling.topK = Int(g.sampling.topK)
            req.sampling.topP = g.sampling.topP == 0 ? 1 : g.sampling.topP
            req.sampling.minP = g.sampling.minP
            req.sampling.repetitionPenalty = g.sampling.repetitionPenalty == 0 ? 1 : g.sampling.repetitionPenalty
            req.sampling.seed = g.sampling.seed
        }
        do { try req.validate() } catch { return self.error(id, .badRequest, error.description) }
        let ctx = context
        let job = EngineWorker.Job(owner: ObjectIdentifier(self)) { [self] job in
            // The request leaves the in-flight table before its final reply goes out, so the
            // client may reuse the id as soon as it has read that reply.
            func end(_ final: () -> Void) {
                lock.lock()
                inFlight[id] = nil
                lock.unlock()
                final()
            }
            if job.isCancelled { return end { error(id, .cancelled, "cancelled before it started") } }
            let onText: (String) -> Bool = { piece in
                self.reply(id, final: false) { $0.textDelta = .with { $0.text = piece } }
                return !job.isCancelled
            }
            do {
                var result: Vist2_V1_GenerateResult
                switch ctx.model {
                case .vist2(let m):
                    let r = try VIST2Generator(model: m).generate(VIST2Request(generation: req), onText: onText)
                    result = Self.common(
                        r.text, r.prompt_tokens, r.generated_tokens, r.ttft_ms, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.stop_reason
                    )
                    result.kvBytes = UInt64(r.kv_bytes)
                    result.kvBytesFinal = UInt64(r.kv_bytes_final)
                    result.flops = UInt64(r.flops)
                    result.chunks = UInt32(r.chunks)
                    result.swaps = UInt32(r.swaps)
                case .language(let lm):
                    let r = try Generator(model: lm).generate(req, onText: onText)
                    result = Self.common(
                        r.text, r.prompt_tokens, r.generated_tokens, r.ttft_ms, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.stop_reason
                    )
                }
                let reason = result.stopReason
                if reason == StopReason.cancelled.rawValue || job.isCancelled {
                    end { error(id, .cancelled, "cancelled") }
                } else {
                    end { reply(id) { $0.generateResult = result } }
                }
            } catch let e as EngineError {
                let code: Vist2_V1_ErrorCode
                if case .contextOverflow = e { code = .contextOverflow } else { code = .badRequest }
                end { error(id, code, e.description) }
            } catch {
                let message = "\(error)"
                end { self.error(id, .internal, message) }
            }
        }
        lock.lock()
        inFlight[id] = job
        lock.unlock()
        guard ctx.worker.submit(job) else {
            lock.lock()
            inFlight[id] = nil
            lock.unlock()
            return error(id, .busy, "the server's queue is full (\(ctx.worker.capacity) waiting); retry later")
        }
    }
}
