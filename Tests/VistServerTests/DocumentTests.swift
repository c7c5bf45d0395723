import Foundation
import Testing
import VistCache
import VistEngine

@testable import VistClient
@testable import VistProtocol
@testable import VistServer
@testable import VistWire

/// A document that fits the tiny model's 512-position context compressed (L = 32, m = 8).
let smallDoc: String = {
    let text = try! String(contentsOfFile: "/usr/share/common-licenses/Apache-2.0", encoding: .utf8)
    return String(
        text.utf8.prefix(1000).split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).dropLast().map {
            String(decoding: $0, as: UTF8.self)
        }.joined(separator: "\n"))
}()

/// The same text with one line in the middle changed.
func editedDoc(_ text: String) -> String {
    var lines = text.components(separatedBy: "\n")
    var i = lines.count / 2
    while lines[i].trimmingCharacters(in: .whitespaces).isEmpty { i += 1 }
    lines[i] += " (edited)"
    return lines.joined(separator: "\n")
}

func greedy(_ docIDs: [String], tokens: UInt32 = 12) -> Vist2_V1_GenerateRequest {
    var g = generateRequest("", tokens: tokens)
    g.documentIds = docIDs
    return g
}

@Suite("Documents, compression and the persistent caches", .serialized)
struct DocumentTests {
    @Test("Compress streams progress and fills the cache; generating over the document then starts from it, with the same text as no cache")
    func compressThenGenerate() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        let doc = try c.openDocument(text: smallDoc, path: "apache.txt")
        #expect(doc.documentID.count == 17 && doc.bytes == UInt64(smallDoc.utf8.count) && doc.path == "apache.txt")
        var progress: [UInt32] = []
        let cold = try c.compress(documentID: doc.documentID) { progress.append($0.chunksDone) }
        let finished = cold.chunks - 1
        #expect(cold.chunks > 10 && cold.visualTokens == finished * 8)
        #expect(cold.chunksRendered == finished && cold.chunkCacheHits == 0 && cold.prefixCacheHits == 0)
        #expect(progress == Array(1...finished))
        #expect(cold.ratio > 2)
        let warm = try c.compress(documentID: doc.documentID)
        #expect(warm.chunksRendered == 0 && warm.prefixCacheHits == finished)
        // A generation over the document reads every finished block from the prefix cache, and
        // says the same as the engine without any cache.
        let r = try c.generate(greedy([doc.documentID]))
        #expect(r.prefixCacheHits == finished && r.chunksEncoded == 0 && r.chunks == finished)
        let model = try VIST2Model(directory: TestDaemon.modelDir, threads: 1)
        var req = GenerationRequest(prompt: "", documents: [smallDoc])
        req.maxTokens = 12
        req.sampling = .greedy
        let fresh = try GenerationTask.generate(req, model: .vist2(model))
        #expect(r.text == fresh.text && Int(r.generatedTokens) == fresh.generated_tokens)
        // Another instruction is another prefix (visual blocks attend to it): chunk-cache hits only.
        var other = greedy([doc.documentID])
        other.instruction = "Summarize:"
        let r2 = try c.generate(other)
        #expect(r2.prefixCacheHits == 0 && r2.chunkCacheHits == finished && r2.chunksEncoded == 0)
        // Status and metrics see it.
        #expect(try c.status().documentsOpen == 1)
        let metrics = try c.metrics()
        #expect(metrics.contains("vist2_cache_hits_total{level=\"prefix\"} \(2 * finished)"))
        #expect(metrics.contains("vist2_requests_total{type=\"compress\"} 2"))
        try c.closeDocument(id: doc.documentID)
        #expect(try c.status().documentsOpen == 0)
        #expect(throws: VistClient.ClientError.self) { try c.compress(documentID: doc.documentID) }
    }

    @Test("After a restart the cache is warm; a one-line edit re-encodes only the chunks it touches")
    func restartAndEdit() throws {
        // A cache directory of its own: the first daemon's temporary directory goes with it.
        let cacheDir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2c-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: cacheDir) }
        var d: TestDaemon? = try TestDaemon(cacheDir: cacheDir)
        var c = try VistClient(socketPath: d!.path)
        var doc = try c.openDocument(text: smallDoc)
        let cold = try c.compress(documentID: doc.documentID)
        let finished = cold.chunks - 1
        d!.stop()
        d = nil
        let d2 = try TestDaemon(cacheDir: cacheDir)
        c = try VistClient(socketPath: d2.path)
        doc = try c.openDocument(text: smallDoc)
        let warm = try c.compress(documentID: doc.documentID)
        #expect(warm.prefixCacheHits == finished && warm.chunksRendered == 0)
        // Edit one line: the chunks before it come from the prefix cache, the touched chunk is
        // rendered and encoded again, the ones after it keep their aligner outputs (chunk cache)
        // but are prefilled again (their KV depends on what precedes them).
        _ = try c.updateDocument(id: doc.documentID, text: editedDoc(smallDoc))
        let edited = try c.compress(documentID: doc.documentID)
        #expect(edited.chunksRendered >= 1 && edited.chunksRendered <= 2)
        #expect(edited.prefixCacheHits >= 1 && edited.prefixCacheHits < finished)
        #expect(edited.prefixCacheHits + edited.chunkCacheHits + edited.chunksRendered == edited.chunks - 1)
    }

    /// (The chunker's own tests show the stateless rule rippling further; this one checks that
    /// the daemon keeps each document's chunking and that every request over it agrees.)
    @Test("A history of one-line edits: each compress re-renders at most two chunks, and render and generate see the same chunks")
    func editHistory() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        var text = smallDoc
        let doc = try c.openDocument(text: text)
        _ = try c.compress(documentID: doc.documentID)
        for k in 0..<40 {
            var lines = text.components(separatedBy: "\n")
            let i = (k * 7 + 3) % lines.count
            switch k % 3 {
            case 0: lines[i] += " edited"
            case 1: lines.insert("an inserted line", at: i)
            default: lines.remove(at: i)
            }
            let edited = lines.joined(separator: "\n")
            _ = try c.updateDocument(id: doc.documentID, text: edited)
            let r = try c.compress(documentID: doc.documentID)
            #expect(r.chunksRendered <= 2, "edit \(k): \(r.chunksRendered) chunks rendered")
            #expect(r.prefixCacheHits + r.chunkCacheHits + r.chunksRendered == r.chunks - 1)
            text = edited
        }
        // Render and generate see the same chunks as compress: a generation reads every block
        // from the prefix cache.
        let r = try c.render(documentID: doc.documentID) { _ in }
        let g = try c.generate(greedy([doc.documentID]))
        #expect(g.chunksEncoded == 0 && g.prefixCacheHits == r.chunks - 1 && g.chunks == r.chunks - 1)
    }

    @Test("A damaged entry is a miss, logged and recomputed; the answer does not change")
    func damagedEntry() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        let doc = try c.openDocument(text: smallDoc)
        _ = try c.compress(documentID: doc.documentID)
        let before = try c.generate(greedy([doc.documentID]))
        // Flip one byte in the middle of every prefix entry's payload and truncate one chunk entry.
        let prefixDir = d.cacheDir.appendingPathComponent("prefix")
        let files = try FileManager.default.contentsOfDirectory(atPath: prefixDir.path)
        for f in files {
            let u = prefixDir.appendingPathComponent(f)
            var data = try Data(contentsOf: u)
            data[data.count / 2] ^= 0xFF
            try data.write(to: u)
        }
        let chunkDir = d.cacheDir.appendingPathComponent("chunk")
        let first = try FileManager.default.contentsOfDirectory(atPath: chunkDir.path).sorted()[0]
        let u = chunkDir.appendingPathComponent(first)
        try Data(try Data(contentsOf: u).prefix(200)).write(to: u)
        let after = try c.generate(greedy([doc.documentID]))
        #expect(after.text == before.text)
        #expect(after.prefixCacheHits == 0 && after.chunksEncoded == 1)
        // The first block's entry is found damaged; the chain stops there (later blocks depend on
        // it), so the rest are recomputed and rewritten without being read. Plus the chunk entry.
        let stats = try c.cacheStats()
        #expect(stats.rejectedDamaged == 2)
        #expect(d.logs.all.filter { $0.contains("checksum mismatch") }.count == 1)
        #expect(d.logs.all.filter { $0.contains("bytes, header says") || $0.contains("truncated") }.count == 1)
        // Rewritten: the next request hits again.
        #expect(try c.generate(greedy([doc.documentID])).prefixCacheHits == before.chunks)
    }

    @Test("An entry made by another model is never served")
    func foreignEntry() throws {
        // The same tiny model with a different config.json byte: another fingerprint.
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2m-\(UUID().uuidString.prefix(8))")
        try FileManager.default.copyItem(at: TestDaemon.modelDir, to: dir)
        defer { try? FileManager.default.removeItem(at: dir) }
        let cfg = dir.appendingPathComponent("config.json")
        try (String(contentsOf: cfg, encoding: .utf8) + "\n").write(to: cfg, atomically: true, encoding: .utf8)
        let a = try TestDaemon()
        let ca = try VistClient(socketPath: a.path)
        _ = try ca.compress(documentID: try ca.openDocument(text: smallDoc).documentID)
        let other = try VIST2Model(directory: dir, threads: 1)
        a.stop()  // one daemon per cache directory (its lock)
        let b = try TestDaemon(cacheDir: a.cacheDir, model: other)
        #expect(other.fingerprint != (try VIST2Model(directory: TestDaemon.modelDir, threads: 1)).fingerprint)
        // Plant model A's entries under the names model B looks up.
        let chunks = other.chunker.chunks(smallDoc).dropLast()
        let aFiles = try FileManager.default.contentsOfDirectory(atPath: a.cacheDir.appendingPathComponent("chunk").path)
        for (i, ch) in chunks.enumerated() where i < aFiles.count {
            let src = a.cacheDir.appendingPathComponent("chunk/\(aFiles[i])").path
            let name = CacheStore.hex(CacheStore.storageKey(other.chunkKey(ch.text), .init(uid: UInt32(getuid()))))
            let dst = b.cacheDir.appendingPathComponent("chunk/\(name).v2c").path
            try? FileManager.default.removeItem(atPath: dst)
            try FileManager.default.copyItem(atPath: src, toPath: dst)
        }
        let cb = try VistClient(socketPath: b.path)
        let r = try cb.compress(documentID: try cb.openDocument(text: smallDoc).documentID)
        #expect(r.chunkCacheHits == 0 && r.prefixCacheHits == 0 && r.chunksRendered == r.chunks - 1)
        #expect(b.logs.all.contains { $0.contains("made by another model") })
        #expect(try cb.cacheStats().rejectedDamaged >= 1)
    }

    @Test("Render streams one PNG per chunk")
    func render() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        let doc = try c.openDocument(text: smallDoc)
        var pngs: [Data] = []
        let r = try c.render(documentID: doc.documentID) { pngs.append($0.png) }
        #expect(r.chunks == UInt32(pngs.count) && pngs.count > 10)
        #expect(pngs.allSatisfy { $0.prefix(8) == Data([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) })
    }

    @Test("Cache ls, rm and stats")
    func cacheCommands() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        _ = try c.compress(documentID: try c.openDocument(text: smallDoc).documentID)
        let entries = try c.cacheList()
        #expect(entries.contains { $0.level == "chunk" } && entries.contains { $0.level == "prefix" })
        #expect(try c.cacheList(limit: 3).count == 3)
        #expect(try c.cacheEvict(keys: [entries[0].key]).removed == 1)
        #expect(try c.cacheList().count == entries.count - 1)
        #expect(throws: VistClient.ClientError.self) { try c.cacheEvict(keys: ["not-hex"]) }
        #expect(try c.cacheEvict(keys: [], all: true).removed == UInt32(entries.count - 1))
        #expect(try c.cacheStats().entries == 0)
    }

    @Test("Absurd field values and unknown documents get errors; the daemon keeps serving")
    func absurdFields() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        let code = errorCode
        #expect(code { _ = try c.generate(generateRequest("x", tokens: .max)) } == .badRequest)
        var g = generateRequest("x", tokens: 4)
        g.stop = Array(repeating: "s", count: 1000)
        #expect(code { _ = try c.generate(g) } == .badRequest)
        g = generateRequest("x", tokens: 4)
        g.sampling.temperature = -5
        #expect(code { _ = try c.generate(g) } == .badRequest)
        g.sampling.temperature = .nan
        #expect(code { _ = try c.generate(g) } == .badRequest)
        #expect(code { _ = try c.generate(greedy(["nope"])) } == .unknownDocument)
        #expect(code { _ = try c.compress(documentID: "") } == .unknownDocument)
        #expect(code { _ = try c.updateDocument(id: "nope", text: "x") } == .unknownDocument)
        #expect(code { _ = try c.openDocument(text: "x", path: String(repeating: "p", count: 5000)) } == .badRequest)
        // A document the context cannot hold even compressed.
        let huge = try c.openDocument(text: String(repeating: smallDoc + "\n", count: 6))
        #expect(code { _ = try c.compress(documentID: huge.documentID) } == .contextOverflow)
        #expect(code { _ = try c.generate(greedy([huge.documentID])) } == .contextOverflow)
        // Per-connection document limit.
        for _ in 0..<(d.context.limits.maxDocuments - 1) { _ = try c.openDocument(text: "a") }
        #expect(code { _ = try c.openDocument(text: "a") } == .tooManyRequests)
        #expect(try c.status().state == "ready")
        #expect(try c.generate(generateRequest("still here", tokens: 3)).generatedTokens == 3)
    }

    @Test("A client that stops reading is dropped; the others are served")
    func stopsReading() throws {
        let d = try TestDaemon(maxFrame: 1 << 20, maxPendingOutput: 256 << 10)
        let slow = try VistClient(socketPath: d.path)
        let big = try slow.openDocument(text: String(repeating: smallDoc + "\n", count: 160))
        var m = Vist2_V1_ClientMessage()
        m.requestID = 99
        m.render = .with { $0.documentID = big.documentID }
        try slow.send(m)  // and never read the PNGs
        let deadline = Date().addingTimeInterval(60)
        while !d.logs.all.contains(where: { $0.contains("unread") }) && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        #expect(d.logs.all.contains { $0.contains("unread") })
        let other = try VistClient(socketPath: d.path)
        #expect(try other.generate(generateRequest("served", tokens: 3)).generatedTokens == 3)
    }

    @Test("Peers whose uid and groups are not allowed are refused at the handshake")
    func peerCredentials() throws {
        let d = try TestDaemon(peers: PeerPolicy(users: [], groups: []))
        do {
            _ = try VistClient(socketPath: d.path)
            Issue.record("a disallowed peer was served")
        } catch VistClient.ClientError.server(let code, let message) {
            #expect(code == .permissionDenied && message.contains("\(getuid())"))
        }
        let byGroup = try TestDaemon(peers: PeerPolicy(users: [], groups: [getgid()]))
        #expect(try VistClient(socketPath: byGroup.path).status().state == "ready")
    }
}

@Suite struct WorkerFairnessTests {
    @Test("A worker released before its thread first runs ends quietly; a drained one can be released")
    func releasedEarly() {
        // Before the fix, the thread read an unowned reference to a released worker: a crash
        // (seen once in CI). Workers dropped at once race their threads' start.
        for _ in 0..<40 {
            _ = EngineWorker(capacity: 1)
        }
        let w = EngineWorker(capacity: 1)
        let done = DispatchSemaphore(value: 0)
        #expect(w.submit(EngineWorker.Job(owner: ObjectIdentifier(w)) { _ in done.signal() }))
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(w.drain(deadline: .seconds(10)) == 0)
    }

    @Test("Clients take turns: a client with many queued requests does not go first with all of them")
    func roundRobin() {
        let w = EngineWorker(capacity: 16)
        let order = LogLines()
        let gate = DispatchSemaphore(value: 0)
        let a = NSObject(), b = NSObject(), c = NSObject()
        let blocker = EngineWorker.Job(owner: ObjectIdentifier(a)) { _ in gate.wait() }
        #expect(w.submit(blocker))
        Thread.sleep(forTimeInterval: 0.1)  // the blocker is running
        for (owner, name) in [(a, "a1"), (a, "a2"), (a, "a3"), (b, "b1"), (b, "b2"), (c, "c1")] {
            #expect(w.submit(EngineWorker.Job(owner: ObjectIdentifier(owner)) { _ in order.add(name) }))
        }
        gate.signal()
        w.drain(deadline: .seconds(60))
        // a was served last (the blocker), so b and c go first, then turns alternate.
        #expect(order.all == ["b1", "c1", "a1", "b2", "a2", "a3"])
    }
}

@Suite("Interleaving on the one engine", .serialized)
struct InterleavingTests {
    @Test("A short request from another client runs between the steps of a long generation")
    func shortRequestOvertakesLongGeneration() throws {
        let d = try TestDaemon()
        let long = try VistClient(socketPath: d.path)
        var m = Vist2_V1_ClientMessage()
        m.requestID = 1
        m.generate = generateRequest("A long story", tokens: 60_000)  // runs until the context is full
        try long.send(m)
        let first = try long.receive()
        #expect(first.requestID == 1 && !first.final)
        // While it streams, another client's generation completes.
        let short = try VistClient(socketPath: d.path)
        let r = try short.generate(generateRequest("Quick", tokens: 4))
        #expect(r.generatedTokens == 4)
        // (That the short one ran between the long one's steps, rather than after it, is checked
        // deterministically on the worker below; here both must complete correctly.)
        var longFinal: Vist2_V1_ServerMessage? = nil
        var deltasAfter = 0
        while longFinal == nil {
            let x = try long.receive()
            if x.final { longFinal = x } else { deltasAfter += 1 }
        }
        #expect(deltasAfter >= 0)
        #expect(longFinal?.generateResult.stopReason == "context")
    }
}

@Suite("Hostile input", .serialized)
struct FuzzTests {
    final class Sink: @unchecked Sendable {
        let lock = NSLock()
        var frames = 0
        var closed = false
        func add(_ b: [UInt8]) {
            lock.lock()
            frames += 1
            lock.unlock()
        }
    }

    @Test("Random bytes, random frames and random messages with absurd fields never crash a session; the daemon keeps serving")
    func randomInput() throws {
        let d = try TestDaemon(maxFrame: 4096)
        var rng = SystemRandomNumberGenerator()
        func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) } }
        func randomMessage() -> Vist2_V1_ClientMessage {
            var m = Vist2_V1_ClientMessage()
            m.requestID = UInt64.random(in: 0...5, using: &rng)
            let s = String(decoding: bytes(Int.random(in: 0...40, using: &rng)).map { $0 & 0x7F }, as: UTF8.self)
            switch Int.random(in: 0...9, using: &rng) {
            case 0: m.hello = .with { $0.protocolVersion = UInt32.random(in: 0...3, using: &rng) }
            case 1:
                m.openDocument = .with {
                    $0.text = s; $0.path = s
                }
            case 2:
                m.updateDocument = .with {
                    $0.documentID = s; $0.text = s
                }
            case 3:
                m.compress = .with {
                    $0.documentID = s; $0.instruction = s
                }
            case 4:
                m.generate = .with {
                    $0.instruction = s
                    $0.maxTokens = [0, 1, 3, .max][Int.random(in: 0...3, using: &rng)]
                    $0.documentIds = [s]
                    $0.sampling = .with {
                        $0.temperature = [Float.nan, -1, 0, 1e30][Int.random(in: 0...3, using: &rng)]
                        $0.topK = UInt32.random(in: 0...UInt32.max, using: &rng)
                        $0.topP = Float.random(in: -2...2, using: &rng)
                    }
                }
            case 5: m.render = .with { $0.documentID = s }
            case 6: m.cancel = .with { $0.targetRequestID = UInt64.random(in: 0...UInt64.max, using: &rng) }
            case 7: m.cacheEvict = .with { $0.keys = [s] }
            case 8: m.cacheList = .with { $0.limit = UInt32.random(in: 0...UInt32.max, using: &rng) }
            default: break
            }
            return m
        }
        for round in 0..<300 {
            let sink = Sink()
            let session = Session(context: d.context, send: { sink.add($0) }, close: { sink.closed = true })
            if round % 2 == 0 {
                // Raw garbage, possibly a valid-looking header with a lying length.
                session.receive(bytes(Int.random(in: 1...64, using: &rng)))
                let n = UInt32.random(in: 0...100_000, using: &rng)
                let header: [UInt8] = [0x56, 0x32, 1, 0, UInt8(n >> 24), UInt8((n >> 16) & 0xFF), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)]
                session.receive(header + bytes(Int.random(in: 0...64, using: &rng)))
            } else {
                var hello = Vist2_V1_ClientMessage()
                hello.hello = .with { $0.protocolVersion = 1 }
                var stream = try Frame.encode(try hello.serializedBytes())
                for _ in 0..<20 {
                    if Bool.random(using: &rng) {
                        stream += try Frame.encode(try randomMessage().serializedBytes())
                    } else {
                        stream += try Frame.encode(bytes(Int.random(in: 0...200, using: &rng)))  // not protobuf
                    }
                }
                // Delivered in random splits, sometimes cut short.
                var i = 0
                let end = Bool.random(using: &rng) ? stream.count : Int.random(in: 0...stream.count, using: &rng)
                while i < end {
                    let n = min(end - i, Int.random(in: 1...97, using: &rng))
                    session.receive(Array(stream[i..<(i + n)]))
                    i += n
                }
            }
            session.disconnected()
            d.context.worker.cancelAll(owner: ObjectIdentifier(session))
        }
        let c = try VistClient(socketPath: d.path)
        #expect(try c.status().state == "ready")
        #expect(try c.generate(generateRequest("after the storm", tokens: 3)).generatedTokens == 3)
    }
}
