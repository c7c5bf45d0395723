import Foundation
import Testing
import VistCache
import VistEngine

@testable import VistClient
@testable import VistProtocol
@testable import VistServer
@testable import VistWire

/// An in-process daemon on a temporary socket, serving the tiny VIST2 model of the engine tests.
final class TestDaemon {
    let dir: URL
    let cacheDir: URL
    let server: UnixServer
    let logs = LogLines()
    var path: String { server.socketPath }
    var context: ServerContext { server.context }

    static let modelDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("VistEngineTests/Fixtures/tiny-vist2")

    /// `cacheDir`: reuse another daemon's cache directory (a restart); `model`: another model.
    init(
        queue: Int = 8, maxFrame: Int = 1 << 16, cacheDir: URL? = nil, cacheBudget: Int = 1 << 30, peers: PeerPolicy = .sameUser,
        maxPendingOutput: Int = 64 << 20, model: VIST2Model? = nil, limits configure: (inout ServerContext.Limits) -> Void = { _ in }
    ) throws {
        dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2d-\(UUID().uuidString.prefix(8))")
        self.cacheDir = cacheDir ?? dir.appendingPathComponent("cache")
        let model = try model ?? VIST2Model(directory: Self.modelDir, threads: 1)
        let logs = self.logs
        let store = try CacheStore(
            directory: self.cacheDir, budget: cacheBudget,
            identity: .init(fingerprint: model.fingerprintBytes, renderConfig: model.renderConfigHash), log: { logs.add($0) })
        var limits = ServerContext.Limits()
        limits.queueCapacity = queue
        limits.maxFrame = maxFrame
        limits.maxPendingOutput = maxPendingOutput
        configure(&limits)
        let ctx = ServerContext(model: .vist2(model), modelName: "tiny", limits: limits, cache: store, peers: peers, log: { logs.add($0) })
        server = UnixServer(context: ctx, socketPath: dir.appendingPathComponent("vist2.sock").path)
        try server.start()
    }

    func stop() { server.stop() }

    deinit {
        server.stop()
        try? FileManager.default.removeItem(at: dir)
    }
}

final class LogLines: @unchecked Sendable {
    let lock = NSLock()
    var lines: [String] = []
    func add(_ s: String) {
        lock.lock()
        lines.append(s)
        lock.unlock()
    }
    var all: [String] {
        lock.lock()
        defer { lock.unlock() }
        return lines
    }
}

func generateRequest(_ text: String, tokens: UInt32) -> Vist2_V1_GenerateRequest {
    .with {
        $0.instruction = text
        $0.maxTokens = tokens
        $0.sampling = .with {
            $0.temperature = 0
            $0.topP = 1
        }
    }
}

@Suite("vist2d over a real Unix socket", .serialized)
struct ServerTests {
    @Test("Handshake, status, and a streamed generation whose deltas add up to the result")
    func basics() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path, clientName: "test")
        #expect(c.hello.protocolVersion == 1 && c.hello.visualTokens == 8 && c.hello.chunkLength == 32)
        #expect(c.hello.modelFingerprint.count == 64 && c.hello.limits.maxFrameBytes == 1 << 16)
        #expect(try c.status().state == "ready")
        var streamed = ""
        let r = try c.generate(generateRequest("Once upon a time", tokens: 40)) { streamed += $0 }
        #expect(r.generatedTokens == 40 && r.text == streamed && !streamed.isEmpty)
        #expect(r.swaps >= 1)
        // The socket is private to its owner.
        let attrs = try FileManager.default.attributesOfItem(atPath: d.path)
        #expect((attrs[.posixPermissions] as? Int) == 0o600)
    }

    @Test("Requests before the handshake, unknown bodies and duplicate daemons get clear errors")
    func protocolErrors() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        var m = Vist2_V1_ClientMessage()
        m.requestID = 5
        try c.send(m)  // empty body
        let r = try c.receive()
        #expect(r.requestID == 5 && r.final && r.error.code == .unknownRequest)
        // A second daemon on the same socket refuses to start.
        let other = UnixServer(context: d.server.context, socketPath: d.path)
        #expect(throws: UnixServer.StartError.self) { try other.start() }
    }

    @Test("Garbage and oversized frames close that connection only; other clients are still served")
    func badInput() throws {
        let d = try TestDaemon(maxFrame: 1024)
        let good = try VistClient(socketPath: d.path)
        let bad = try VistClient(socketPath: d.path)
        try bad.sendRaw(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        let r = try bad.receive()
        #expect(r.error.code == .badRequest)
        #expect(throws: VistClient.ClientError.self) { _ = try bad.receive() }  // closed
        let big = try VistClient(socketPath: d.path)
        try big.sendRaw([0x56, 0x32, 1, 0, 0x7f, 0xff, 0xff, 0xff])
        #expect(try big.receive().error.code == .frameTooLarge)
        #expect(try good.status().state == "ready")
    }

    @Test("Past the queue bound a request is answered BUSY at once")
    func busy() throws {
        let d = try TestDaemon(queue: 1)
        let c = try VistClient(socketPath: d.path)
        // Three long generations on one connection: one runs, one waits, the third is refused.
        for id in [UInt64(1), 2, 3] {
            var m = Vist2_V1_ClientMessage()
            m.requestID = id
            m.generate = generateRequest("Busy", tokens: 400)
            try c.send(m)
        }
        var busy = 0
        var finals = 0
        while finals < 3 {
            let r = try c.receive()
            if r.final {
                finals += 1
                if r.error.code == .busy { busy += 1 }
            }
        }
        #expect(busy >= 1)
    }

    @Test("Cancel stops a generation within a step; disconnecting cancels too")
    func cancel() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        var m = Vist2_V1_ClientMessage()
        m.requestID = 9
        m.generate = generateRequest("Cancel me", tokens: 2000)
        var cancel = Vist2_V1_ClientMessage()
        cancel.requestID = 10
        cancel.cancel = .with { $0.targetRequestID = 9 }
        /// Reads until request 9 ends and request 10 is acknowledged; returns the deltas of 9.
        func awaitCancelled() throws -> Int {
            var gotAck = false, cancelled = false, deltas = 0
            while !(gotAck && cancelled) {
                let r = try c.receive()
                if r.requestID == 10 { gotAck = r.body == .ack(Vist2_V1_Ack()) }
                if r.requestID == 9 {
                    if r.final { cancelled = r.error.code == .cancelled } else { deltas += 1 }
                }
            }
            return deltas
        }
        // Generate and Cancel in one write: the Cancel is handled on the event loop right after
        // the Generate, while the request is still being prepared (or at the engine's next
        // turn at the latest), so it stops before or within its first few tokens, however fast
        // the tiny model writes.
        let payloads: [[UInt8]] = [try m.serializedBytes(), try cancel.serializedBytes()]
        try c.sendRaw(try payloads.flatMap { try Frame.encode($0) })
        #expect(try awaitCancelled() < 100)
        // Cancelled mid-stream: it ends CANCELLED, acknowledged, long before its 2000-token budget.
        m.requestID = 9
        try c.send(m)
        let first = try c.receive()
        #expect(first.requestID == 9 && !first.final)
        try c.send(cancel)
        #expect(try awaitCancelled() < 1999)
        // A cancel for an unknown request.
        cancel.requestID = 11
        cancel.cancel.targetRequestID = 12345
        try c.send(cancel)
        #expect(try c.receive().error.code == .notFound)
        // Disconnect mid-generation, then another client gets served promptly.
        do {
            let gone = try VistClient(socketPath: d.path)
            var g = Vist2_V1_ClientMessage()
            g.requestID = 1
            g.generate = generateRequest("Abandoned", tokens: 2000)
            try gone.send(g)
            _ = try gone.receive()
        }
        let t0 = Date()
        #expect(try VistClient(socketPath: d.path).generate(generateRequest("Next", tokens: 5)).generatedTokens == 5)
        #expect(Date().timeIntervalSince(t0) < 30)
    }

    @Test("A client with no daemon gets a message naming the socket")
    func noDaemon() {
        do {
            _ = try VistClient(socketPath: "/tmp/no-such-vist2/vist2.sock")
            Issue.record("connected to nothing")
        } catch {
            #expect("\(error)".contains("/tmp/no-such-vist2/vist2.sock"))
        }
    }
}
