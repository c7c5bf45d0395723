import Foundation
import VistClient
import VistProtocol

#if canImport(Glibc)
    import Glibc
#endif

/// The editor-facing transport (docs/BRIDGE.md): JSON lines in, JSON lines out, one daemon
/// connection held for the whole session.
///
/// Threads: the caller's thread reads requests (`run`) and sends them; one connection thread
/// reads the daemon's replies, turns them into events and, when the daemon goes away, fails what
/// was in flight, reconnects and reopens the documents. The documents' texts live here, so a
/// daemon restart costs an editor nothing: the bridge opens them again on the new daemon (whose
/// persistent cache still holds their chunks) under the same handles.
public final class Bridge: @unchecked Sendable {
    /// A document as the client knows it: a handle of the bridge's, stable across reconnects.
    struct Document {
        var path: String
        /// The text the client last sent; what a reconnect opens.
        var text: String
        /// The daemon's id on the current connection (nil while disconnected, or while its open is
        /// in flight).
        var daemonID: String?
        var opening = false
    }

    /// A request in flight on the daemon, by wire id.
    struct InFlight {
        enum Kind {
            case open(handle: String)
            /// `previous`: the text the daemon holds if this update fails; `sent`: this one's.
            case update(handle: String, previous: String, sent: String)
            case close(handle: String)
            case compress
            case generate
            case cancel
            case status
            case cacheStats
        }
        var id: JSONValue
        var kind: Kind
    }

    let socketPath: String
    let clientName: String
    let output: Int32
    let maxLineBytes: Int
    /// Longest wait between two connection attempts while the daemon is away.
    let maxRetryInterval: Double

    let state = NSCondition()
    let sendLock = NSLock()
    let outLock = NSLock()
    // Guarded by `state`.
    var client: VistClient?
    var hello: Vist2_V1_HelloReply?
    var documents: [String: Document] = [:]
    var nextHandle = 1
    var inFlight: [UInt64: InFlight] = [:]
    var wireIDs: [JSONValue: UInt64] = [:]
    var nextWireID: UInt64 = 1
    /// Final events taken out of `inFlight` and not yet written (so that the end of input waits
    /// for them too).
    var finishing = 0
    /// Why the last connection attempt failed (the daemon_down message at start).
    var lastConnectError = ""
    /// When a request last went to the daemon (the keepalive's clock).
    var lastSent = Date()

    public init(
        socketPath: String, clientName: String = "vist2ctl-bridge", output: Int32 = 1, maxLineBytes: Int = 32 << 20,
        maxRetryInterval: Double = 1.0
    ) {
        self.socketPath = socketPath
        self.clientName = clientName
        self.output = output
        self.maxLineBytes = maxLineBytes
        self.maxRetryInterval = maxRetryInterval
    }

    // MARK: - the session

    /// Connects (or reports the daemon down and keeps trying), then serves request lines from
    /// `input` until it ends. Returns when the input has ended and the requests in flight have
    /// finished; the daemon closes the connection's documents when this process exits.
    public func run(input: Int32 = 0) {
        signal(SIGPIPE, SIG_IGN)
        _ = connect()
        let thread = Thread { [self] in connectionLoop() }
        thread.stackSize = 1 << 20
        thread.start()
        let keepalive = Thread { [self] in keepaliveLoop() }
        keepalive.stackSize = 256 << 10
        keepalive.start()
        var reader = LineReader(fd: input, maxLine: maxLineBytes)
        while let line = reader.next() {
            switch line {
            case .tooLong(let n):
                emit([
                    "event": "error", "final": true,
                    "error": errorObject("bad_request", "a request line of \(n)+ bytes is over the limit of \(maxLineBytes)"),
                ])
            case .line(let bytes):
                if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
                handle(line: bytes)
            }
        }
        // The requests already sent finish first (`printf ... | vist2ctl bridge` gets its
        // answers); a client that wants to stop them cancels them, or ends the process.
        state.lock()
        while !inFlight.isEmpty || finishing > 0 { state.wait() }
        state.unlock()
    }

    /// One connection attempt with the handshake; on success the documents are opened again on
    /// the new connection before it is published, so no request can see a half-restored state.
    func connect() -> VistClient? {
        let c: VistClient
        do { c = try VistClient(socketPath: socketPath, clientName: clientName) } catch {
            state.lock()
            lastConnectError = "\(error)"
            state.unlock()
            return nil
        }
        state.lock()
        var lost: [(String, String, String)] = []
        var reopened = 0
        for handle in documents.keys.sorted() {
            guard var d = documents[handle] else { continue }
            do {
                d.daemonID = try c.openDocument(text: d.text, path: d.path).documentID
                d.opening = false
                documents[handle] = d
                reopened += 1
            } catch VistClient.ClientError.server(let code, let message) {
                documents[handle] = nil
                lost.append((handle, errorCodeName(code), message))
            } catch {
                // The daemon went away again during the reopening; the next attempt starts over.
                for h in documents.keys { documents[h]?.daemonID = nil }
                state.unlock()
                return nil
            }
        }
        client = c
        hello = c.hello
        lastSent = Date()
        state.broadcast()
        state.unlock()
        for (handle, code, message) in lost {
            emit(["event": "document_lost", "document": .string(handle), "error": errorObject(code, message)])
        }
        var up = helloFields(c.hello)
        up["event"] = "daemon_up"
        up["reopened"] = .uint(reopened)
        emit(up)
        return c
    }

    /// The connection thread: reads replies until the daemon goes away, then fails what was in
    /// flight, reports it, and tries again with a growing pause (up to `maxRetryInterval`).
    func connectionLoop() {
        state.lock()
        let first = client
        let lastConnectError = lastConnectError
        state.unlock()
        var current = first
        var reported = first == nil
        if first == nil { emit(["event": "daemon_down", "message": .string(lastConnectError)]) }
        var pause = 0.05
        while true {
            guard let c = current else {
                Thread.sleep(forTimeInterval: pause)
                pause = min(pause * 2, maxRetryInterval)
                current = connect()
                if current != nil {
                    reported = false
                    pause = 0.05
                }
                continue
            }
            let why: String
            do {
                while true { dispatch(try c.receive()) }
            } catch {
                why = "\(error)"
            }
            disconnected(why)
            current = nil
            if !reported {
                emit(["event": "daemon_down", "message": .string(why)])
                reported = true
            }
        }
    }

    /// The daemon closes a connection that stays silent past its idle timeout; an editor's
    /// bridge may sit unused for hours with its documents open. A status request (its reply
    /// ignored: no request waits for that wire id) every third of the timeout keeps it open.
    func keepaliveLoop() {
        while true {
            state.lock()
            let timeoutMs = hello?.limits.idleTimeoutMs ?? 0
            let due = timeoutMs > 0 && Date().timeIntervalSince(lastSent) >= Double(timeoutMs) / 3000
            let c = due ? client : nil
            var wire: UInt64 = 0
            if c != nil {
                wire = nextWireID
                nextWireID += 1
                lastSent = Date()
            }
            state.unlock()
            if let c {
                var m = Vist2_V1_ClientMessage()
                m.requestID = wire
                m.status = .init()
                sendLock.lock()
                try? c.send(m)
                sendLock.unlock()
            }
            // Often enough for the shortest timeout the daemon takes (1 s).
            Thread.sleep(forTimeInterval: timeoutMs > 0 ? min(Double(timeoutMs) / 6000, 60) : 1)
        }
    }

    /// The daemon went away: documents wait to be opened again (an open, update or close in
    /// flight is answered as done offline), every other request in flight ends with
    /// CONNECTION_CLOSED.
    func disconnected(_ why: String) {
        state.lock()
        client = nil
        for h in documents.keys {
            documents[h]?.daemonID = nil
            documents[h]?.opening = false
        }
        let events = inFlight.keys.sorted().compactMap { wire -> [String: JSONValue]? in
            guard let f = inFlight[wire] else { return nil }
            return offline(f.id, f.kind)
                ?? [
                    "id": f.id, "event": "error", "final": true, "error": errorObject("connection_closed", "the daemon went away (\(why))"),
                ]
        }
        inFlight = [:]
        wireIDs = [:]
        finishing += 1
        state.broadcast()
        state.unlock()
        for e in events { emit(e) }
        finished()
    }

    /// The answer to a document request made (or cut off) while the daemon is away, with `state`
    /// held: the bridge holds the text and opens it on the daemon when it is back. Nil for the
    /// requests that need the daemon.
    func offline(_ id: JSONValue, _ kind: InFlight.Kind) -> [String: JSONValue]? {
        switch kind {
        case .open(let handle), .update(let handle, _, _):
            documents[handle]?.opening = false
            guard let d = documents[handle] else { return nil }
            return documentEvent(id, handle, bytes: d.text.utf8.count, chunks: 0, synced: false)
        case .close(let handle):
            return ["id": id, "event": "closed", "final": true, "document": .string(handle)]
        default:
            return nil
        }
    }

    // MARK: - requests

    func handle(line: [UInt8]) {
        let (id, parsed) = BridgeRequest.parse(line)
        let req: BridgeRequest
        switch parsed {
        case .success(let r): req = r
        case .failure(let e): return fail(id, e)
        }
        state.lock()
        let duplicate = wireIDs[id] != nil
        state.unlock()
        // Only this thread adds ids, so the answer holds until the request is sent.
        guard !duplicate else {
            return fail(
                id,
                BridgeError(
                    code: "duplicate_request_id", message: "request \(String(decoding: id.line(), as: UTF8.self)) is already in flight"))
        }
        do {
            switch req.op {
            case "open": try open(id, req)
            case "update": try update(id, req)
            case "close": try close(id, req)
            case "compress": try compress(id, req)
            case "generate": try generate(id, req)
            case "cancel": try cancel(id, req)
            case "status": try send(id, .status) { $0.status = .init() }
            case "cache_stats": try send(id, .cacheStats) { $0.cacheStats = .init() }
            case "documents": listDocuments(id)
            case nil: throw BridgeError.bad("'op' is missing")
            case let op?:
                throw BridgeError(
                    code: "unknown_request",
                    message:
                        "unknown op '\(op.prefix(64))' (open, update, close, compress, generate, cancel, status, cache_stats, documents)")
            }
        } catch let e as BridgeError {
            fail(id, e)
        } catch {
            fail(id, BridgeError(code: "internal", message: "\(error)"))
        }
    }

    /// The limits the daemon announced, or its defaults before the first connection.
    func documentLimits() -> (perDocument: Int, documents: Int, total: Int) {
        guard let l = hello?.limits else { return (4 << 20, 256, 64 << 20) }
        return (Int(clamping: l.maxDocumentBytes), Int(l.maxDocuments), Int(clamping: l.maxConnectionDocumentBytes))
    }

    func open(_ id: JSONValue, _ r: BridgeRequest) throws {
        guard let text = try r.string("text") else { throw BridgeError.bad("open needs 'text'") }
        let path = try r.string("path") ?? ""
        let chosen = try r.string("document")
        state.lock()
        let limits = documentLimits()
        let held = documents.values.reduce(0) { $0 + $1.text.utf8.count }
        guard text.utf8.count <= limits.perDocument else {
            state.unlock()
            throw BridgeError(
                code: "document_too_large", message: "the document has \(text.utf8.count) bytes; at most \(limits.perDocument) are accepted"
            )
        }
        guard documents.count < limits.documents, held + text.utf8.count <= limits.total else {
            state.unlock()
            throw BridgeError(code: "document_too_large", message: "this session holds too many documents or bytes (close some)")
        }
        // The client's own name for it (an editor names a buffer's document before the answer
        // arrives), or one of the bridge's.
        var handle: String
        if let chosen {
            guard !chosen.isEmpty, chosen.utf8.count <= 256 else {
                state.unlock()
                throw BridgeError.bad("'document' must be 1 to 256 bytes")
            }
            guard documents[chosen] == nil else {
                state.unlock()
                throw BridgeError.bad("a document '\(chosen.prefix(64))' is already open in this bridge")
            }
            handle = chosen
        } else {
            repeat {
                handle = "doc\(nextHandle)"
                nextHandle += 1
            } while documents[handle] != nil
        }
        // Kept here whatever happens to the daemon; `send` answers offline when it is away.
        documents[handle] = Document(path: path, text: text, daemonID: nil, opening: true)
        state.unlock()
        try send(id, .open(handle: handle)) {
            $0.openDocument = .with {
                $0.text = text
                $0.path = path
            }
        }
    }

    func update(_ id: JSONValue, _ r: BridgeRequest) throws {
        guard let handle = try r.string("document") else { throw BridgeError.bad("update needs 'document'") }
        guard let text = try r.string("text") else { throw BridgeError.bad("update needs 'text'") }
        state.lock()
        let daemonID = waitForOpen(handle)
        guard let doc = documents[handle] else {
            state.unlock()
            throw unknownDocument(handle)
        }
        let limits = documentLimits()
        guard text.utf8.count <= limits.perDocument else {
            state.unlock()
            throw BridgeError(
                code: "document_too_large", message: "the document has \(text.utf8.count) bytes; at most \(limits.perDocument) are accepted"
            )
        }
        documents[handle]?.text = text
        guard let daemonID else {
            state.unlock()
            return emit(documentEvent(id, handle, bytes: text.utf8.count, chunks: 0, synced: false))
        }
        state.unlock()
        try send(id, .update(handle: handle, previous: doc.text, sent: text)) {
            $0.updateDocument = .with {
                $0.documentID = daemonID
                $0.text = text
            }
        }
    }

    func close(_ id: JSONValue, _ r: BridgeRequest) throws {
        guard let handle = try r.string("document") else { throw BridgeError.bad("close needs 'document'") }
        state.lock()
        let daemonID = waitForOpen(handle)
        guard documents.removeValue(forKey: handle) != nil else {
            state.unlock()
            throw unknownDocument(handle)
        }
        state.unlock()
        guard let daemonID else { return emit(["id": id, "event": "closed", "final": true, "document": .string(handle)]) }
        try send(id, .close(handle: handle)) { $0.closeDocument = .with { $0.documentID = daemonID } }
    }

    func compress(_ id: JSONValue, _ r: BridgeRequest) throws {
        guard let handle = try r.string("document") else { throw BridgeError.bad("compress needs 'document'") }
        let instruction = try r.string("instruction") ?? "", chat = try r.bool("chat") ?? false, shared = try r.bool("shared") ?? false
        let daemonID = try daemonIDs([handle])[0]
        try send(id, .compress) {
            $0.compress = .with {
                $0.documentID = daemonID
                $0.instruction = instruction
                $0.chat = chat
                $0.shared = shared
            }
        }
    }

    func generate(_ id: JSONValue, _ r: BridgeRequest) throws {
        var g = Vist2_V1_GenerateRequest()
        g.instruction = try r.string("prompt") ?? ""
        g.chat = try r.bool("chat") ?? false
        let fullText = try r.bool("full_text") ?? false
        g.fullText = fullText
        g.shared = try r.bool("shared") ?? false
        g.maxTokens = try r.uint32("max_tokens") ?? 128
        g.stop = try r.strings("stop") ?? []
        // The same defaults as `vist2ctl generate`; the daemon checks the ranges.
        g.sampling = .with {
            $0.temperature = 0.8
            $0.topK = 40
            $0.topP = 0.95
            $0.minP = 0.05
            $0.repetitionPenalty = 1
        }
        if let v = try r.number("temperature") { g.sampling.temperature = v }
        if let v = try r.uint32("top_k") { g.sampling.topK = v }
        if let v = try r.number("top_p") { g.sampling.topP = v }
        if let v = try r.number("min_p") { g.sampling.minP = v }
        if let v = try r.number("repeat_penalty") { g.sampling.repetitionPenalty = v }
        if let v = try r.integer("seed", 0...Int64.max) { g.sampling.seed = UInt64(v) }
        g.documentIds = try daemonIDs(try r.strings("documents") ?? [])
        try send(id, .generate) { $0.generate = g }
    }

    func cancel(_ id: JSONValue, _ r: BridgeRequest) throws {
        guard let target = r.fields["target"], target != .null else {
            throw BridgeError.bad("cancel needs 'target' (the id of the request to stop)")
        }
        state.lock()
        let wire = wireIDs[target]
        state.unlock()
        guard let wire else {
            throw BridgeError(code: "not_found", message: "no request \(String(decoding: target.line(), as: UTF8.self)) is in flight")
        }
        try send(id, .cancel) { $0.cancel = .with { $0.targetRequestID = wire } }
    }

    func listDocuments(_ id: JSONValue) {
        state.lock()
        let list: [JSONValue] = documents.keys.sorted().compactMap { h in
            guard let d = documents[h] else { return nil }
            return .object([
                "document": .string(h), "path": .string(d.path), "bytes": .uint(d.text.utf8.count), "synced": .bool(d.daemonID != nil),
            ])
        }
        state.unlock()
        emit(["id": id, "event": "documents", "final": true, "documents": .array(list)])
    }

    /// Waits (with `state` held) while the handle's open is in flight on the daemon, so that a
    /// request right after an open names the daemon's id; returns that id (nil if not open there).
    func waitForOpen(_ handle: String) -> String? {
        while documents[handle]?.opening == true { state.wait() }
        return documents[handle]?.daemonID
    }

    func daemonIDs(_ handles: [String]) throws -> [String] {
        state.lock()
        defer { state.unlock() }
        var ids: [String] = []
        for h in handles {
            let daemonID = waitForOpen(h)
            guard documents[h] != nil else { throw unknownDocument(h) }
            guard let daemonID else { throw unavailable() }
            ids.append(daemonID)
        }
        return ids
    }

    func unknownDocument(_ handle: String) -> BridgeError {
        BridgeError(code: "unknown_document", message: "no document '\(handle.prefix(64))' is open in this bridge")
    }

    func unavailable() -> BridgeError {
        BridgeError(
            code: "daemon_unavailable",
            message: "the vist2 daemon at \(socketPath) is not reachable; the bridge keeps trying and reports daemon_up when it is back")
    }

    /// Registers the request as in flight under a fresh wire id and sends it.
    func send(_ id: JSONValue, _ kind: InFlight.Kind, _ fill: (inout Vist2_V1_ClientMessage) -> Void) throws {
        state.lock()
        guard let c = client else {
            // Document requests are kept for the daemon's return; the rest need it now.
            let local = offline(id, kind)
            state.unlock()
            guard let local else { throw unavailable() }
            return emit(local)
        }
        let wire = nextWireID
        nextWireID += 1
        inFlight[wire] = InFlight(id: id, kind: kind)
        wireIDs[id] = wire
        lastSent = Date()
        state.unlock()
        var m = Vist2_V1_ClientMessage()
        m.requestID = wire
        fill(&m)
        sendLock.lock()
        defer { sendLock.unlock() }
        // A failed write means the daemon is gone; the connection thread sees it too and fails
        // this request with everything else in flight.
        try? c.send(m)
    }

    // MARK: - replies

    /// One reply from the daemon, as events.
    func dispatch(_ m: Vist2_V1_ServerMessage) {
        state.lock()
        guard let f = inFlight[m.requestID] else {
            state.unlock()
            return  // a request id of 0 (a TIMEOUT) or one already failed
        }
        if m.final {
            inFlight[m.requestID] = nil
            wireIDs[f.id] = nil
            finishing += 1
        }
        // Written after the lock is released; the end of input waits for it.
        defer { if m.final { finished() } }
        var event: [String: JSONValue] = ["id": f.id]
        if m.final { event["final"] = true }
        if case .error(let e) = m.body {
            switch f.kind {
            case .open(let handle): documents[handle] = nil
            case .update(let handle, let previous, let sent):
                // Unless a later update replaced it already: the daemon keeps what it had.
                if documents[handle]?.text == sent { documents[handle]?.text = previous }
            default: break
            }
            state.broadcast()
            state.unlock()
            event["event"] = "error"
            event["error"] = errorObject(errorCodeName(e.code), e.message)
            return emit(event)
        }
        switch (f.kind, m.body) {
        case (.open(let handle), .document(let d)):
            documents[handle]?.daemonID = d.documentID
            documents[handle]?.opening = false
            event.merge(documentEvent(f.id, handle, bytes: Int(d.bytes), chunks: Int(d.chunks), synced: true)) { $1 }
        case (.update(let handle, _, _), .document(let d)):
            event.merge(documentEvent(f.id, handle, bytes: Int(d.bytes), chunks: Int(d.chunks), synced: true)) { $1 }
        case (.close(let handle), .ack):
            event["event"] = "closed"
            event["document"] = .string(handle)
        case (.compress, .compressProgress(let p)):
            event["event"] = "progress"
            event["chunks_done"] = .uint(p.chunksDone)
            event["chunks_total"] = .uint(p.chunksTotal)
        case (.compress, .compressResult(let r)):
            event.merge(compressResultFields(r)) { $1 }
            event["event"] = "compressed"
        case (.generate, .textDelta(let d)):
            event["event"] = "delta"
            event["text"] = .string(d.text)
        case (.generate, .generateResult(let r)):
            event.merge(generateResultFields(r)) { $1 }
            event["event"] = "done"
        case (.cancel, .ack):
            event["event"] = "ack"
        case (.status, .status(let s)):
            event.merge(statusFields(s, hello: hello)) { $1 }
            event["documents"] = .uint(documents.count)
            event["event"] = "status"
        case (.cacheStats, .cacheStats(let s)):
            event.merge(cacheStatsFields(s)) { $1 }
            event["event"] = "cache_stats"
        default:
            if !m.final {
                state.unlock()
                return  // a progress reply of a kind this bridge does not report
            }
            event["event"] = "error"
            event["error"] = errorObject("protocol", "the daemon answered with an unexpected reply")
        }
        state.broadcast()
        state.unlock()
        emit(event)
    }

    /// A final event taken out of `inFlight` has been written.
    func finished() {
        state.lock()
        finishing -= 1
        state.broadcast()
        state.unlock()
    }

    func documentEvent(_ id: JSONValue, _ handle: String, bytes: Int, chunks: Int, synced: Bool) -> [String: JSONValue] {
        [
            "id": id, "event": "document", "final": true, "document": .string(handle), "bytes": .uint(bytes), "chunks": .uint(chunks),
            "synced": .bool(synced),
        ]
    }

    func helloFields(_ h: Vist2_V1_HelloReply) -> [String: JSONValue] {
        [
            "protocol_version": .uint(h.protocolVersion), "server_version": .string(h.serverVersion), "model": .string(h.modelName),
            "model_fingerprint": .string(h.modelFingerprint), "chunk_length": .uint(h.chunkLength),
            "visual_tokens": .uint(h.visualTokens), "context_length": .uint(h.contextLength),
            "max_document_bytes": .uint(h.limits.maxDocumentBytes), "capabilities": .array(h.capabilities.map { .string($0) }),
        ]
    }

    // MARK: - output

    func errorObject(_ code: String, _ message: String) -> JSONValue {
        .object(["code": .string(code), "message": .string(message)])
    }

    func fail(_ id: JSONValue, _ e: BridgeError) {
        emit(["id": id, "event": "error", "final": true, "error": errorObject(e.code, e.message)])
    }

    /// Writes one event line; a client that stopped reading (its end of the pipe closed) ends the
    /// bridge, since no one is left to serve.
    func emit(_ fields: [String: JSONValue]) {
        var bytes = [UInt8](JSONValue.object(fields).line())
        bytes.append(0x0A)
        outLock.lock()
        defer { outLock.unlock() }
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { write(output, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                exit(0)
            }
            off += n
        }
    }
}

/// Reads lines from a file descriptor, refusing (and skipping) any longer than `maxLine`.
struct LineReader {
    enum Item {
        case line([UInt8])
        case tooLong(Int)
    }

    let fd: Int32
    let maxLine: Int
    var buffer: [UInt8] = []
    var start = 0
    var skipping = false
    var eof = false

    init(fd: Int32, maxLine: Int) {
        self.fd = fd
        self.maxLine = maxLine
    }

    mutating func next() -> Item? {
        var scanFrom = start
        while true {
            if let nl = buffer[scanFrom...].firstIndex(of: 0x0A) {
                let line = Array(buffer[start..<nl])
                start = nl + 1
                if skipping {
                    skipping = false
                    scanFrom = start
                    continue
                }
                return .line(line)
            }
            if buffer.count - start > maxLine {
                let n = buffer.count - start
                buffer.removeAll(keepingCapacity: true)
                start = 0
                scanFrom = 0
                if !skipping {
                    skipping = true
                    return .tooLong(n)
                }
            }
            if eof {
                guard start < buffer.count, !skipping else { return nil }
                let line = Array(buffer[start...])
                start = buffer.count
                return .line(line)
            }
            if start > 0 && start == buffer.count {
                buffer.removeAll(keepingCapacity: true)
                start = 0
            } else if start > (1 << 20) {
                buffer.removeFirst(start)
                start = 0
            }
            scanFrom = buffer.count
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                eof = true
            } else if n == 0 {
                eof = true
            } else {
                buffer.append(contentsOf: chunk[0..<n])
            }
        }
    }
}
