import Dispatch
import Foundation
import SwiftProtobuf
import VistCache
import VistEngine
import VistProtocol
import VistRender
import VistWire

/// The protocol state of one connection, independent of sockets: bytes in through `receive`,
/// framed replies out through `send`. It owns the connection protocol only: framing, the
/// handshake, timeouts, the in-flight table, cancellation and replies. What each request does
/// lives in its handler (`Handlers`, looked up by message kind), which calls back into the
/// session to register the request, reply, and end it.
///
/// Called on the connection's event loop; engine and text work reply from their threads (the
/// `send` closure hops back to the loop). Documents belong to the connection that opened them
/// and are closed with it; what they cost to compress lives on in the shared persistent cache.
public final class Session: @unchecked Sendable {
    struct Document {
        var path: String
        var text: String
        var chunks = 0
        /// How the last compress, generate or render over this document alone chunked it
        /// (possibly an earlier version of `text`): the next one keeps the chunks an update
        /// left alone, so a one-line edit re-renders at most two chunks. It holds the text it
        /// was made from, so an updated document may keep up to twice its size in memory.
        var chunking: Chunking? = nil
    }

    let context: ServerContext
    let send: @Sendable ([UInt8]) -> Void
    let close: @Sendable () -> Void
    var decoder: FrameDecoder
    var greeted = false
    let lock = NSLock()
    var inFlight: [UInt64: EngineWorker.Job] = [:]
    var documents: [String: Document] = [:]
    /// Bytes of the text of this connection's open documents (`limits.maxConnectionDocumentBytes`).
    var documentBytes = 0
    var closed = false
    /// Uptime (ns) when the connection opened, when it last sent a byte, and when the frame now
    /// being received began (nil between frames): the handshake, idle and frame timeouts.
    let openedAt = DispatchTime.now().uptimeNanoseconds
    var lastReceived = DispatchTime.now().uptimeNanoseconds
    var frameStartedAt: UInt64? = nil
    var limits: ServerLimits { context.limits }
    /// The peer's uid (SO_PEERCRED, set by the server before anything is received): whose cache
    /// entries its requests use and which it may list and evict. The daemon's own uid when the
    /// session is driven directly (tests, fuzzing).
    public var peerUID = UInt32(getuid())

    /// The cache namespace of a request of this peer (`shared`: the one common to all users).
    func cacheOwner(shared: Bool) -> CacheStore.Owner { .init(uid: peerUID, shared: shared) }
    var cacheViewer: CacheStore.Viewer { context.cacheViewer(uid: peerUID) }

    public init(context: ServerContext, send: @escaping @Sendable ([UInt8]) -> Void, close: @escaping @Sendable () -> Void) {
        self.context = context
        self.send = send
        self.close = close
        decoder = FrameDecoder(maxPayload: context.maxFrame)
    }

    // MARK: replies

    func reply(_ id: UInt64, final: Bool = true, _ fill: (inout Vist2_V1_ServerMessage) -> Void) {
        var m = Vist2_V1_ServerMessage()
        m.requestID = id
        m.final = final
        fill(&m)
        // A reply must fit the client's frame limit (the server's, announced in HelloReply). One
        // that does not, or that cannot be serialized, is logged and replaced by an INTERNAL
        // error, so the request still gets its final reply; nothing is dropped silently.
        let framed: [UInt8]
        do {
            framed = try Frame.encode(try m.serializedBytes(), maxPayload: limits.maxFrame)
        } catch {
            context.log("could not send a reply to request \(id): \(error)")
            context.metrics.error("unsendable_reply")
            guard final, m.error.code != .internal else { return }
            return self.error(id, .internal, "the reply could not be sent: \(error)")
        }
        send(framed)
    }

    func error(_ id: UInt64, _ code: Vist2_V1_ErrorCode, _ message: String) {
        context.metrics.error("\(code)")
        reply(id) {
            $0.error = .with {
                $0.code = code
                $0.message = message
            }
        }
    }

    func error(_ id: UInt64, _ e: EngineError) { error(id, Conversions.code(e), e.description) }

    /// Refuses a peer before anything is read from it.
    public func deny(_ message: String) { refuse(.permissionDenied, message) }

    /// Answers `code` (request id 0) and closes the connection.
    func refuse(_ code: Vist2_V1_ErrorCode, _ message: String) {
        error(0, code, message)
        closed = true
        close()
    }

    // MARK: bytes in

    /// Bytes from the peer. A framing error is answered once and closes the connection.
    public func receive(_ bytes: [UInt8]) {
        guard !closed else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        lastReceived = now
        if frameStartedAt == nil && !bytes.isEmpty { frameStartedAt = now }
        let payloads: [[UInt8]]
        do {
            payloads = try decoder.feed(bytes)
            // Between frames again, or a new frame begun by the bytes after the last whole one.
            if !decoder.isMidFrame {
                frameStartedAt = nil
            } else if !payloads.isEmpty {
                frameStartedAt = now
            }
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
            guard !closed else { return }
            guard let m = try? Vist2_V1_ClientMessage(serializedBytes: p) else {
                error(0, .badRequest, "the frame does not hold a valid ClientMessage")
                continue
            }
            handle(m)
        }
    }

    /// Checks the connection's timeouts (called every `limits.timerTick` on its event loop):
    /// no Hello within `handshakeTimeout`, a frame not complete `frameTimeout` after its first
    /// byte, or nothing received for `idleTimeout` with nothing in flight. A breach gets TIMEOUT
    /// (request id 0) and closes the connection.
    public func checkTimeouts(now: UInt64 = DispatchTime.now().uptimeNanoseconds) {
        guard !closed else { return }
        func over(_ since: UInt64, _ d: Duration) -> Bool { now > since && Double(now - since) / 1e9 >= d.asSeconds }
        let why: String
        if !greeted && over(openedAt, limits.handshakeTimeout) {
            why = "no Hello within \(limits.handshakeTimeout)"
        } else if let f = frameStartedAt, over(f, limits.frameTimeout) {
            why = "a frame was not complete \(limits.frameTimeout) after its first byte"
        } else if limits.idleTimeout > .zero && over(lastReceived, limits.idleTimeout) && inFlightCount == 0 {
            why = "idle for \(limits.idleTimeout) with nothing in flight"
        } else {
            return
        }
        context.metrics.with { $0.timeouts += 1 }
        error(0, .timeout, why + "; closing the connection")
        closed = true
        close()
    }

    var inFlightCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return inFlight.count
    }

    /// The connection went away: its requests stop, its documents close.
    public func disconnected() {
        closed = true
        lock.lock()
        let jobs = Array(inFlight.values)
        let docs = documents.count
        let bytes = documentBytes
        documents = [:]
        documentBytes = 0
        lock.unlock()
        for j in jobs { j.cancel() }
        context.adjust(documents: -docs, bytes: -bytes)
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
        let kind = Handlers.kind(m.body)
        context.metrics.request(kind)
        switch m.body {
        case .hello:
            error(id, .badRequest, "the handshake is already done")
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
        case .none:
            error(id, .unknownRequest, "empty or unknown request body")
        case .some(let body):
            guard let handler = context.handlers[kind] else {
                return error(id, .unsupported, "this daemon does not handle \(kind) requests")
            }
            handler(self, id, body)
        }
    }

    // MARK: requests in flight

    /// Registers `id` as in flight with a new engine job, or replies why not (DRAINING,
    /// DUPLICATE_REQUEST_ID, TOO_MANY_REQUESTS, BUSY) and returns nil. The job holds its place
    /// in the engine's queue while its text work runs; the handler gives it its engine work
    /// (`context.worker.start`) or ends it (`end`).
    func begin(_ id: UInt64) -> EngineWorker.Job? {
        guard !context.isDraining else {
            error(id, .draining, "the daemon is shutting down and takes no new work")
            return nil
        }
        lock.lock()
        let duplicate = inFlight[id] != nil
        let count = inFlight.count
        lock.unlock()
        guard !duplicate else {
            error(id, .duplicateRequestID, "request \(id) is already in flight")
            return nil
        }
        guard count < limits.maxInFlight else {
            error(id, .tooManyRequests, "at most \(limits.maxInFlight) requests in flight per connection")
            return nil
        }
        let job = EngineWorker.Job(owner: ObjectIdentifier(self))
        guard context.worker.submit(job) else {
            error(id, .busy, "the server's queue is full (\(context.worker.capacity) waiting); retry later")
            return nil
        }
        lock.lock()
        inFlight[id] = job
        lock.unlock()
        return job
    }

    /// Ends request `id`: it leaves the in-flight table before its final reply goes out, so the
    /// client may reuse the id as soon as it has read that reply. A job that never got engine
    /// work is withdrawn from the engine's queue after that reply (a drain, which waits for the
    /// queue to empty, then finds every final reply on its way).
    func end(_ id: UInt64, _ job: EngineWorker.Job, withdraw: Bool = false, _ final: () -> Void) {
        lock.lock()
        inFlight[id] = nil
        lock.unlock()
        final()
        if withdraw { context.worker.withdraw(job) }
    }

    /// Runs `work` for request `id` on the text queue (tokenizing, chunking, rendering: beside
    /// the engine). It returns the engine work to start, or nil when it has replied and ended
    /// the request itself; an EngineError it throws ends the request with that error.
    func textWork(_ id: UInt64, _ job: EngineWorker.Job, _ work: @escaping @Sendable () throws(EngineError) -> EngineWorker.Work?) {
        context.text.async { [self] in
            if job.isCancelled { return end(id, job, withdraw: true) { error(id, .cancelled, "cancelled before it started") } }
            switch Result(catching: { () throws(EngineError) in try work() }) {
            case .success(let w?):
                context.worker.start(job, w)
            case .success(nil):
                break
            case .failure(let e):
                end(id, job, withdraw: true) { error(id, e) }
            }
        }
    }

    // MARK: documents

    /// The texts of `ids`, or an error reply sent. A request names at most
    /// `limits.maxDocumentsPerRequest` documents, each once, so what it reads is bounded by the
    /// connection's document bytes.
    func texts(_ id: UInt64, _ ids: [String]) -> [String]? {
        guard ids.count <= limits.maxDocumentsPerRequest else {
            error(id, .badRequest, "a request may read at most \(limits.maxDocumentsPerRequest) documents, \(ids.count) were given")
            return nil
        }
        var seen = Set<String>()
        for d in ids where !seen.insert(d).inserted {
            error(id, .badRequest, "document '\(d.prefix(64))' is listed more than once")
            return nil
        }
        lock.lock()
        let found = ids.map { documents[$0]?.text }
        lock.unlock()
        if let i = found.firstIndex(where: { $0 == nil }) {
            error(id, .unknownDocument, "no document '\(ids[i].prefix(64))' is open on this connection")
            return nil
        }
        return found.map { $0! }
    }

    /// The chunking last made for a request over `docIDs`, when that is one document.
    func chunking(_ docIDs: [String]) -> Chunking? {
        guard docIDs.count == 1 else { return nil }
        lock.lock()
        defer { lock.unlock() }
        return documents[docIDs[0]]?.chunking
    }

    /// Keeps `c` for the next request over `docIDs` (one document; a closed one is ignored).
    func keep(_ c: Chunking?, for docIDs: [String]) {
        guard let c, docIDs.count == 1 else { return }
        lock.lock()
        documents[docIDs[0]]?.chunking = c
        lock.unlock()
    }

    func info(_ docID: String) -> Vist2_V1_DocumentInfo {
        lock.lock()
        let d = documents[docID]
        lock.unlock()
        return .with {
            $0.documentID = docID
            $0.path = d?.path ?? ""
            $0.bytes = UInt64(d?.text.utf8.count ?? 0)
            $0.chunks = UInt32(d?.chunks ?? 0)
        }
    }

    var vist2: VIST2Model? { context.model.vist2 }
}
