import Foundation
import Testing
import VistEngine

@testable import VistClient
@testable import VistProtocol
@testable import VistServer
@testable import VistWire

/// The error code a client call ends with (nil: it succeeded or failed otherwise).
func errorCode(_ body: () throws -> Void) -> Vist2_V1_ErrorCode? {
    do {
        try body()
        return nil
    } catch VistClient.ClientError.server(let code, _) {
        return code
    } catch { return nil }
}

/// Waits up to `seconds` for `condition`.
func eventually(_ seconds: Double = 30, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return true }
        Thread.sleep(forTimeInterval: 0.02)
    }
    return try condition()
}

/// Every limit of `ServerLimits` (Protocols/PROTOCOL.md, "Limits"): each breach gets its error,
/// and the daemon keeps serving everyone else.
@Suite("vist2d's limits", .serialized)
struct LimitsTests {
    @Test("A Generate listing one document 20,000 times, or more documents than allowed, is refused before anything is read")
    func documentIDsPerRequest() throws {
        let d = try TestDaemon(maxFrame: 1 << 20)
        let c = try VistClient(socketPath: d.path)
        let doc = try c.openDocument(text: smallDoc)
        #expect(errorCode { _ = try c.generate(greedy(Array(repeating: doc.documentID, count: 20_000))) } == .badRequest)
        #expect(errorCode { _ = try c.generate(greedy([doc.documentID, doc.documentID])) } == .badRequest)
        var ids = [doc.documentID]
        for _ in 1..<d.context.limits.maxDocumentsPerRequest { ids.append(try c.openDocument(text: "a\n").documentID) }
        _ = try c.openDocument(text: "b")
        #expect(try c.generate(greedy(ids, tokens: 2)).generatedTokens == 2)
        #expect(errorCode { _ = try c.generate(greedy(ids + [try c.openDocument(text: "c").documentID])) } == .badRequest)
        #expect(try c.status().state == "ready")
    }

    @Test(
        "Document bytes are bounded per document, per connection (DOCUMENT_TOO_LARGE) and over the daemon (BUSY); closing gives them back")
    func documentBytes() throws {
        let d = try TestDaemon(maxFrame: 1 << 20) {
            $0.maxDocumentBytes = 1000
            $0.maxConnectionDocumentBytes = 2500
            $0.maxTotalDocumentBytes = 4000
        }
        let a = try VistClient(socketPath: d.path)
        var b: VistClient? = try VistClient(socketPath: d.path)
        let text = String(repeating: "x", count: 1000)
        #expect(errorCode { _ = try a.openDocument(text: text + "y") } == .documentTooLarge)
        let a1 = try a.openDocument(text: text)
        let a2 = try a.openDocument(text: text)
        #expect(errorCode { _ = try a.openDocument(text: text) } == .documentTooLarge)  // 3000 > 2500 on this connection
        #expect(errorCode { _ = try a.updateDocument(id: a2.documentID, text: text + "y") } == .documentTooLarge)
        _ = try a.updateDocument(id: a2.documentID, text: "short")  // shrinking always works
        _ = try b?.openDocument(text: text)
        _ = try b?.openDocument(text: text)
        // a: 1005, b: 2000; another 1000 would pass the daemon's 4000.
        #expect(errorCode { _ = try a.openDocument(text: text) } == .busy)
        try a.closeDocument(id: a1.documentID)
        _ = try a.openDocument(text: text)
        #expect(d.context.openDocumentBytes == 3005)  // a: 1000 + "short", b: 2000
        // A disconnect gives a connection's bytes back.
        b = nil
        #expect(eventually { d.context.openDocumentBytes == 1005 })
        #expect(try a.status().documentsOpen == 2)
    }

    @Test("Past the connection limit a client gets BUSY and is closed; a freed slot is served again")
    func connectionLimit() throws {
        let d = try TestDaemon { $0.maxConnections = 3 }
        var held = try (0..<3).map { _ in try VistClient(socketPath: d.path) }
        do {
            _ = try VistClient(socketPath: d.path)
            Issue.record("a fourth connection was served")
        } catch VistClient.ClientError.server(let code, _) {
            #expect(code == .busy)
        }
        held.removeLast()
        #expect(try eventually { (try? VistClient(socketPath: d.path).status().state) == "ready" })
        #expect(try held[0].metrics().contains("vist2_connections_refused_total 1"))
    }

    @Test("No Hello in time, a frame left half-sent, and an idle connection are each closed with TIMEOUT")
    func timeouts() throws {
        let d = try TestDaemon {
            $0.handshakeTimeout = .milliseconds(300)
            $0.frameTimeout = .milliseconds(300)
            $0.idleTimeout = .milliseconds(1000)
            $0.timerTick = .milliseconds(50)
        }
        /// Connects without the client library's handshake.
        func raw() throws -> Int32 {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in d.path.utf8.enumerated() { p[i] = b } }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            #expect(rc == 0)
            return fd
        }
        /// Reads until EOF and returns the error of the last frame.
        func closedWith(_ fd: Int32) -> Vist2_V1_Error? {
            var bytes: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = read(fd, &buf, buf.count)
                if n <= 0 { break }
                bytes += buf[0..<n]
            }
            close(fd)
            var dec = FrameDecoder()
            guard let p = try? dec.feed(bytes).last, let m = try? Vist2_V1_ServerMessage(serializedBytes: p) else { return nil }
            return m.error
        }
        let silent = try raw()
        let t0 = Date()
        #expect(closedWith(silent)?.code == .timeout)
        let stalled = try raw()
        let hello = try Frame.encode(
            try Vist2_V1_ClientMessage.with { $0.hello = .with { $0.protocolVersion = 1 } }.serializedBytes())
        // Hello and the next frame's header in one write: the header is parsed with the Hello,
        // and the connection is mid-frame with no bytes buffered.
        let header: [UInt8] = [0x56, 0x32, 1, 0, 0, 0, 0x10, 0]
        _ = (hello + header).withUnsafeBytes { write(stalled, $0.baseAddress, $0.count) }
        let frame = closedWith(stalled)
        #expect(frame?.code == .timeout && frame?.message.contains("frame") == true, "\(String(describing: frame))")
        #expect(Date().timeIntervalSince(t0) < 5)
        // An idle client: its next request finds the connection gone.
        let idle = try VistClient(socketPath: d.path)
        Thread.sleep(forTimeInterval: 1.6)
        #expect(throws: (any Error).self) { _ = try idle.status() }
        // A client that keeps talking, or waits for a long request, is not idle.
        let busy = try VistClient(socketPath: d.path)
        for _ in 0..<6 {
            Thread.sleep(forTimeInterval: 0.25)
            #expect(try busy.status().state == "ready")
        }
        #expect(try busy.metrics().contains("vist2_timeouts_total 3"))
    }

    @Test("Perplexity and bench stop at the next step when cancelled")
    func longWorkIsCancellable() throws {
        let d = try TestDaemon(maxFrame: 4 << 20)
        let c = try VistClient(socketPath: d.path)
        let doc = try c.openDocument(text: String(repeating: smallDoc + "\n", count: 3 << 20 / (smallDoc.utf8.count + 1)))
        for (id, body) in [
            (
                UInt64(1),
                Vist2_V1_ClientMessage.OneOf_Body.perplexity(
                    .with {
                        $0.documentID = doc.documentID; $0.ctx = 16
                    })
            ),
            (
                2,
                .bench(
                    .with {
                        $0.promptTokens = 256; $0.generatedTokens = 400; $0.repetitions = 1000
                    })
            ),
        ] {
            var m = Vist2_V1_ClientMessage()
            m.requestID = id
            m.body = body
            try c.send(m)
            // Cancel once it is running: after perplexity's first progress, or a moment into bench.
            if id == 1 { #expect(try c.receive().perplexityProgress.windowsDone == 1) } else { Thread.sleep(forTimeInterval: 0.3) }
            try c.send(
                .with {
                    $0.requestID = 100 + id; $0.cancel = .with { $0.targetRequestID = id }
                })
            let t0 = Date()
            var final: Vist2_V1_ServerMessage? = nil
            while final == nil {
                let r = try c.receive()
                if r.requestID == id && r.final { final = r }
            }
            #expect(final?.error.code == .cancelled)
            #expect(Date().timeIntervalSince(t0) < 10)
        }
    }

    @Test("SIGTERM's drain waits for running work up to its deadline, then cancels it: every request gets its final reply")
    func drainDeadline() throws {
        let d = try TestDaemon { $0.drainTimeout = .milliseconds(300) }
        let c = try VistClient(socketPath: d.path)
        // Two long benches (minutes each on the tiny model): one runs, one waits.
        for id in [UInt64(1), 2] {
            try c.send(
                .with {
                    $0.requestID = id;
                    $0.bench = .with {
                        $0.generatedTokens = 400; $0.repetitions = 1000
                    }
                })
        }
        Thread.sleep(forTimeInterval: 0.2)
        let t0 = Date()
        let server = d.server
        let stopped = DispatchSemaphore(value: 0)
        let stopper = Thread {
            server.stop()
            stopped.signal()
        }
        stopper.start()
        var finals: [UInt64: Vist2_V1_ErrorCode] = [:]
        while finals.count < 2 {
            let r = try c.receive()
            if r.final { finals[r.requestID] = r.error.code }
        }
        #expect(finals == [1: .cancelled, 2: .cancelled])
        // The finals can reach the client before stop() has logged the drain's outcome.
        #expect(stopped.wait(timeout: .now() + 20) == .success)
        #expect(Date().timeIntervalSince(t0) < 20)
        #expect(d.logs.all.contains { $0.contains("drain: cancelled 2") })
    }

    @Test("Tokenizing megabytes runs beside the engine: a short request of another client finishes first, and a cancel stops it")
    func longTokenizeBesideAndCancels() throws {
        let d = try TestDaemon(maxFrame: 16 << 20)
        let a = try VistClient(socketPath: d.path), b = try VistClient(socketPath: d.path)
        let text = String(repeating: "lorem ipsum dolor sit amet\n", count: 110_000)  // 3 MB: ~45 pieces
        func tokenize(_ c: VistClient, _ id: UInt64, _ t: String) throws {
            try c.send(
                .with {
                    $0.requestID = id
                    $0.tokenize = .with { $0.text = t }
                })
        }
        @Sendable func final(_ c: VistClient, _ id: UInt64) throws -> Vist2_V1_ServerMessage {
            while true {
                let r = try c.receive()
                if r.requestID == id && r.final { return r }
            }
        }
        // Even with the engine busy (a job of the test's own holds it), text work goes on.
        let release = DispatchSemaphore(value: 0)
        #expect(d.context.worker.submit(EngineWorker.Job { _ in release.wait() }))
        defer { release.signal() }
        try tokenize(a, 1, text)
        try tokenize(b, 1, "hi")
        let order = LogLines()
        nonisolated(unsafe) let bClient = b
        let other = Thread {
            if (try? final(bClient, 1))?.tokenizeResult.ids.isEmpty == false { order.add("b") }
        }
        other.start()
        let long = try final(a, 1)
        order.add("a")
        #expect(long.tokenizeResult.ids.count >= 600_000)
        #expect(try eventually { order.all.count == 2 })
        #expect(order.all == ["b", "a"])

        // Cancelled while it runs: it stops between pieces.
        try tokenize(a, 2, text)
        try a.send(
            .with {
                $0.requestID = 3; $0.cancel = .with { $0.targetRequestID = 2 }
            })
        #expect(try final(a, 2).error.code == .cancelled)
    }

    @Test("An engine that makes no progress shows as stalled in Status and the metrics; progress clears it")
    func stalledEngine() throws {
        let d = try TestDaemon { $0.stallTimeout = .milliseconds(200) }
        let c = try VistClient(socketPath: d.path)
        let release = DispatchSemaphore(value: 0)
        let job = EngineWorker.Job { _ in release.wait() }  // stuck, no heartbeats
        #expect(d.context.worker.submit(job))
        #expect(try eventually { try c.status().state == "stalled" })
        #expect(try c.status().engineStalledSeconds > 0.2)
        #expect(try c.metrics().contains("# TYPE vist2_engine_stalled_seconds gauge"))
        release.signal()
        #expect(try eventually { try c.status().state == "ready" })
        #expect(try c.status().engineStalledSeconds == 0)
    }

    @Test("HelloReply announces every limit")
    func helloAnnouncesLimits() throws {
        let d = try TestDaemon { $0.maxConnections = 7 }
        let l = try VistClient(socketPath: d.path).hello.limits
        let want = d.context.limits
        #expect(l.maxConnections == 7 && l.maxDocumentsPerRequest == UInt32(want.maxDocumentsPerRequest))
        #expect(l.maxDocumentBytes == UInt64(want.maxDocumentBytes) && l.maxTotalDocumentBytes == UInt64(want.maxTotalDocumentBytes))
        #expect(l.handshakeTimeoutMs == 10_000 && l.idleTimeoutMs == 3_600_000 && l.maxTokens == 65536)
    }
}

@Suite("The socket path and the peers", .serialized)
struct SocketPathTests {
    @Test("A file that is not a socket is never removed; a second daemon on a path is refused by its lock even before it binds")
    func stalePathsAndLocks() throws {
        let d = try TestDaemon()
        let dir = d.dir.appendingPathComponent("other")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let file = dir.appendingPathComponent("vist2.sock").path
        try Data("precious".utf8).write(to: URL(fileURLWithPath: file))
        do {
            try UnixServer(context: d.context, socketPath: file).start()
            Issue.record("a daemon started over a regular file")
        } catch { #expect("\(error)".contains("not a socket")) }
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "precious")
        // The lock: a second server on the live daemon's path fails on the lock, and the live
        // socket stays in place and served.
        do {
            try UnixServer(context: d.context, socketPath: d.path).start()
            Issue.record("two daemons on one socket")
        } catch { #expect("\(error)".contains(".lock")) }
        #expect(try VistClient(socketPath: d.path).status().state == "ready")
        // A stale socket (its daemon gone without cleaning up) is replaced.
        let stale = dir.appendingPathComponent("stale.sock").path
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in stale.utf8.enumerated() { p[i] = b } }
        _ = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        let fresh = UnixServer(context: d.context, socketPath: stale)
        try fresh.start()
        fresh.stop()
    }

    @Test("Supplementary groups come from the connection's credentials (SO_PEERGROUPS), not the user database")
    func peerGroupsFromTheKernel() throws {
        let policy = PeerPolicy(users: [], groups: [4242])
        #expect(policy.allows(uid: 9999, gid: 1, supplementary: [7, 4242]))
        #expect(!policy.allows(uid: 9999, gid: 1, supplementary: [7]))
        #expect(policy.allows(uid: 9999, gid: 4242, supplementary: []))
        // A connection made while this process holds a supplementary group that the user
        // database does not give it (possible as root): the daemon sees it on the connection.
        guard getuid() == 0 else { return }
        var n = getgroups(0, nil)
        var saved = [gid_t](repeating: 0, count: Int(max(n, 1)))
        n = getgroups(n, &saved)
        let d = try TestDaemon(peers: PeerPolicy(users: [], groups: [4242]))
        var probe: [gid_t] = [4242]
        #expect(setgroups(1, &probe) == 0)
        let client = Result { try VistClient(socketPath: d.path) }
        #expect(setgroups(Int(max(n, 0)), &saved) == 0)
        #expect(try client.get().status().state == "ready")
        // Without the group: refused (root is allowed only as the daemon's own user or root,
        // which this policy does not list).
        #expect(throws: (any Error).self) { _ = try VistClient(socketPath: d.path) }
    }
}
