import Dispatch
import Foundation
import SwiftProtobuf
import VistCache
import VistEngine
import VistProtocol
import VistRender
import VistWire

/// The protocol state of one connection, independent of sockets: bytes in through `receive`,
/// framed replies out through `send`. Called on the connection's event loop; engine jobs send
/// from the worker thread (the `send` closure hops back to the loop). Documents belong to the
/// connection that opened them and are closed with it; what they cost to compress lives on in
/// the shared persistent cache.
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

    func reply(_ id: UInt64, final: Bool = true, _ fill: (inout Vist2_V1_ServerMessage) -> Void) {
        var m = Vist2_V1_ServerMessage()
        m.requestID = id
        m.final = final
        fill(&m)
        // A reply must fit the client's frame limit (the server's, announced in HelloReply). One
        // that does not is replaced by an INTERNAL error, so the request still gets its final
        // reply; nothing is dropped silently.
        let framed: [UInt8]
        do {
            framed = try Frame.encode(try m.serializedBytes(), maxPayload: limits.maxFrame)
        } catch {
            context.log("could not send a reply to request \(id): \(error)")
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

    /// Refuses a peer before anything is read from it.
    public func deny(_ message: String) { refuse(.permissionDenied, message) }

    /// Answers `code` (request id 0) and closes the connection.
    func refuse(_ code: Vist2_V1_ErrorCode, _ message: String) {
        error(0, code, message)
        closed = true
        close()
    }

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
        context.metrics.request(Self.kind(m.body))
        switch m.body {
        case .hello:
            error(id, .badRequest, "the handshake is already done")
        case .status:
            reply(id) { $0.status = context.status() }
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
        case .openDocument(let o):
            openDocument(id, o)
        case .updateDocument(let u):
            updateDocument(id, u)
        case .closeDocument(let c):
            lock.lock()
            let removed = documents.removeValue(forKey: c.documentID)
            if let removed { documentBytes -= removed.text.utf8.count }
            lock.unlock()
            guard let removed else {
                return error(id, .unknownDocument, "no document '\(c.documentID.prefix(64))' is open on this connection")
            }
            context.adjust(documents: -1, bytes: -removed.text.utf8.count)
            reply(id) { $0.ack = Vist2_V1_Ack() }
        case .compress(let c):
            compress(id, c)
        case .generate(let g):
            generate(id, g)
        case .render(let r):
            render(id, r)
        case .cacheList(let l):
            let limit = min(l.limit == 0 ? Int.max : Int(l.limit), limits.maxCacheListEntries)
            let entries = context.cache?.list(limit: limit, for: cacheViewer) ?? []
            reply(id) {
                $0.cacheList = .with {
                    $0.entries = entries.map { e in
                        .with {
                            $0.key = e.key
                            $0.level = e.level.name
                            $0.bytes = UInt64(e.bytes)
                            $0.lastUsedUnix = Int64(e.lastUsed.timeIntervalSince1970)
                            $0.ownerUid = e.owner
                            $0.shared = e.shared
                        }
                    }
                }
            }
        case .cacheEvict(let e):
            guard e.all || !e.keys.isEmpty else { return error(id, .badRequest, "name keys to evict, or set all") }
            guard e.keys.count <= 100_000, e.keys.allSatisfy({ $0.count == 64 && $0.allSatisfy(\.isHexDigit) }) else {
                return error(id, .badRequest, "cache keys are 64 hex digits")
            }
            var r = CacheStore.EvictResult()
            if e.all {
                r.removed = context.cache?.evictAll(by: cacheViewer) ?? 0
            } else {
                r = context.cache?.evict(keys: e.keys, by: cacheViewer) ?? r
                if r.removed == 0 && r.refused > 0 {
                    return error(id, .permissionDenied, "the named cache entries belong to another user")
                }
                if r.removed == 0 { return error(id, .notFound, "no such cache entries") }
            }
            reply(id) {
                $0.cacheEvictResult = .with {
                    $0.removed = UInt32(clamping: r.removed)
                    $0.refused = UInt32(clamping: r.refused)
                }
            }
        case .cacheStats:
            let s = context.cache?.stats(for: cacheViewer) ?? CacheStore.Stats()
            reply(id) {
                $0.cacheStats = .with {
                    $0.bytes = UInt64(s.bytes)
                    $0.budgetBytes = UInt64(s.budget)
                    $0.entries = UInt64(s.entries)
                    $0.hits = UInt64(s.hits)
                    $0.misses = UInt64(s.misses)
                    $0.evictions = UInt64(s.evictions)
                    $0.rejectedDamaged = UInt64(s.rejectedDamaged)
                }
            }
        case .metrics:
            let text = context.metrics.render(context)
            reply(id) { $0.metrics = .with { $0.prometheusText = text } }
        case .tokenize(let t):
            tokenize(id, t)
        case .perplexity(let p):
            perplexity(id, p)
        case .bench(let b):
            bench(id, b)
        case .none:
            error(id, .unknownRequest, "empty or unknown request body")
        }
    }

    func tokenize(_ id: UInt64, _ t: Vist2_V1_TokenizeRequest) {
        let tok = context.language.tokenizer
        let worker = context.worker
        submit(id) { job throws(EngineError) in
            let step = { worker.pause(job) }
            guard let ids = tok.encode(t.text, addSpecial: !t.noSpecial, parseSpecial: t.parseSpecial, step: step) else {
                throw .cancelled
            }
            return { $0.tokenizeResult = .with { $0.ids = ids } }
        }
    }

    func perplexity(_ id: UInt64, _ p: Vist2_V1_PerplexityRequest) {
        guard let text = texts(id, [p.documentID]) else { return }
        let lm = context.language
        let ctx = p.ctx == 0 ? 512 : Int(p.ctx)
        let worker = context.worker
        submit(id) { [self] job throws(EngineError) in
            let r = try lm.perplexity(
                text: text[0], ctx: ctx,
                progress: { done, total, ppl in
                    self.reply(id, final: false) {
                        $0.perplexityProgress = .with {
                            $0.windowsDone = UInt32(done)
                            $0.windowsTotal = UInt32(total)
                            $0.perplexity = ppl
                        }
                    }
                },
                step: { worker.pause(job) })
            if job.isCancelled { throw .cancelled }
            return {
                $0.perplexityResult = .with {
                    $0.perplexity = r.perplexity
                    $0.tokens = UInt32(clamping: r.tokens)
                    $0.windows = UInt32(clamping: r.windows)
                    $0.scoredTokens = UInt32(clamping: r.scored_tokens)
                    $0.ctx = UInt32(clamping: r.ctx)
                }
            }
        }
    }

    func bench(_ id: UInt64, _ b: Vist2_V1_BenchRequest) {
        let lm = context.language
        let worker = context.worker
        submit(id) { job throws(EngineError) in
            let r = try lm.bench(
                prompt: Int(b.promptTokens), generate: Int(b.generatedTokens),
                repetitions: b.repetitions == 0 ? 5 : Int(b.repetitions),
                step: { worker.pause(job) })
            return {
                $0.benchResult = .with {
                    $0.ppTokens = UInt32(r.pp_tokens)
                    $0.tgTokens = UInt32(r.tg_tokens)
                    $0.threads = UInt32(r.threads)
                    $0.repetitions = UInt32(r.repetitions)
                    $0.ppTokensPerS = r.pp_tokens_per_s
                    $0.ppStddev = r.pp_stddev
                    $0.tgTokensPerS = r.tg_tokens_per_s
                    $0.tgStddev = r.tg_stddev
                    $0.peakRssBytes = UInt64(r.peak_rss_bytes)
                    $0.modelBytes = UInt64(r.model_bytes)
                    $0.simd = r.simd
                }
            }
        }
    }

    static func kind(_ b: Vist2_V1_ClientMessage.OneOf_Body?) -> String {
        switch b {
        case .hello: return "hello"
        case .status: return "status"
        case .openDocument: return "open_document"
        case .updateDocument: return "update_document"
        case .closeDocument: return "close_document"
        case .compress: return "compress"
        case .generate: return "generate"
        case .render: return "render"
        case .cancel: return "cancel"
        case .cacheList: return "cache_list"
        case .cacheEvict: return "cache_evict"
        case .cacheStats: return "cache_stats"
        case .metrics: return "metrics"
        case .tokenize: return "tokenize"
        case .perplexity: return "perplexity"
        case .bench: return "bench"
        case .none: return "unknown"
        }
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

    /// The chunking last made for a request over `docIDs`, when that is one document.
    func chunking(_ docIDs: [String]) -> Chunking? {
        guard docIDs.count == 1 else { return nil }
        lock.lock()
        defer { lock.unlock() }
        return documents[docIDs[0]]?.chunking
    }

    /// Keeps `c` for the next request over `docIDs` (one document; a closed one is ignored).
    func keep(_ c: Chunking, for docIDs: [String]) {
        guard docIDs.count == 1 else { return }
        lock.lock()
        documents[docIDs[0]]?.chunking = c
        lock.unlock()
    }

    func openDocument(_ id: UInt64, _ o: Vist2_V1_OpenDocument) {
        guard o.path.utf8.count <= 4096 else { return error(id, .badRequest, "path longer than 4096 bytes") }
        let size = o.text.utf8.count
        lock.lock()
        let full = documents.count >= limits.maxDocuments
        lock.unlock()
        guard !full else { return error(id, .tooManyRequests, "at most \(limits.maxDocuments) documents open per connection") }
        guard takeDocumentBytes(id, size) else { return }
        lock.lock()
        var docID = ""
        repeat { docID = String(format: "d%016llx", UInt64.random(in: 0...UInt64.max)) } while documents[docID] != nil
        documents[docID] = Document(path: o.path, text: o.text)
        lock.unlock()
        context.adjust(documents: 1)
        reply(id) { $0.document = info(docID) }
    }

    func updateDocument(_ id: UInt64, _ u: Vist2_V1_UpdateDocument) {
        lock.lock()
        let old = documents[u.documentID]
        lock.unlock()
        guard let old else { return error(id, .unknownDocument, "no document '\(u.documentID.prefix(64))' is open on this connection") }
        let oldSize = old.text.utf8.count, size = u.text.utf8.count
        guard takeDocumentBytes(id, size - oldSize, replacing: oldSize) else { return }
        lock.lock()
        documents[u.documentID] = Document(path: old.path, text: u.text, chunking: old.chunking)
        lock.unlock()
        reply(id) { $0.document = info(u.documentID) }
    }

    /// Accounts `delta` more bytes of document text to this connection and the daemon, or
    /// replies DOCUMENT_TOO_LARGE (this document, or this connection's documents, over their
    /// limit) or BUSY (the daemon's documents over theirs) and returns false. `replacing`: the
    /// size of the text being replaced, for the per-document check.
    func takeDocumentBytes(_ id: UInt64, _ delta: Int, replacing: Int = 0) -> Bool {
        let size = replacing + delta
        guard size <= limits.maxDocumentBytes else {
            error(id, .documentTooLarge, "the document has \(size) bytes; at most \(limits.maxDocumentBytes) are accepted")
            return false
        }
        lock.lock()
        let mine = documentBytes
        lock.unlock()
        guard delta <= 0 || mine + delta <= limits.maxConnectionDocumentBytes else {
            error(
                id, .documentTooLarge,
                "this connection's documents would hold \(mine + delta) bytes; at most \(limits.maxConnectionDocumentBytes) are accepted (close some)"
            )
            return false
        }
        guard context.reserveDocumentBytes(delta) else {
            error(id, .busy, "the daemon holds its limit of \(limits.maxTotalDocumentBytes) bytes of open documents; retry later")
            return false
        }
        lock.lock()
        documentBytes += delta
        lock.unlock()
        return true
    }

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

    /// Registers `id` as in flight and queues `work` on the engine; `work` returns its final
    /// reply (or throws an EngineError). The request leaves the in-flight table before its final
    /// reply goes out, so the client may reuse the id as soon as it has read that reply.
    func submit(_ id: UInt64, _ work: @escaping (EngineWorker.Job) throws(EngineError) -> (inout Vist2_V1_ServerMessage) -> Void) {
        guard !context.isDraining else { return error(id, .draining, "the daemon is shutting down and takes no new work") }
        lock.lock()
        let duplicate = inFlight[id] != nil
        let count = inFlight.count
        lock.unlock()
        guard !duplicate else { return error(id, .duplicateRequestID, "request \(id) is already in flight") }
        guard count < context.limits.maxInFlight else {
            return error(id, .tooManyRequests, "at most \(context.limits.maxInFlight) requests in flight per connection")
        }
        let job = EngineWorker.Job(owner: ObjectIdentifier(self)) { [self] job in
            func end(_ final: () -> Void) {
                lock.lock()
                inFlight[id] = nil
                lock.unlock()
                final()
            }
            if job.isCancelled { return end { error(id, .cancelled, "cancelled before it started") } }
            switch Result(catching: { () throws(EngineError) in try work(job) }) {
            case .success(let fill):
                if job.isCancelled { return end { error(id, .cancelled, "cancelled") } }
                end { reply(id, fill) }
            case .failure(let e):
                let code: Vist2_V1_ErrorCode
                switch e {
                case .contextOverflow: code = .contextOverflow
                case .cancelled: code = .cancelled
                case .io, .format, .modelNotFound: code = .internal
                default: code = .badRequest
                }
                end { error(id, code, e.description) }
            }
        }
        lock.lock()
        inFlight[id] = job
        lock.unlock()
        guard context.worker.submit(job) else {
            lock.lock()
            inFlight[id] = nil
            lock.unlock()
            return error(id, .busy, "the server's queue is full (\(context.worker.capacity) waiting); retry later")
        }
    }

    var vist2: VIST2Model? {
        if case .vist2(let m) = context.model { return m }
        return nil
    }

    func compress(_ id: UInt64, _ c: Vist2_V1_CompressRequest) {
        guard let model = vist2 else {
            return error(id, .unsupported, "the loaded model (\(context.modelName)) has no vision encoder; compress needs a VIST2 model")
        }
        guard let text = texts(id, [c.documentID]) else { return }
        let cache = context.blockCache(for: cacheOwner(shared: c.shared)), metrics = context.metrics, worker = context.worker
        let previous = chunking([c.documentID])
        submit(id) { [self] job throws(EngineError) in
            let r = try VIST2Generator(model: model).compress(
                documents: text, instruction: c.instruction, chat: c.chat, cache: cache,
                reusing: previous, onChunking: { self.keep($0, for: [c.documentID]) },
                step: { worker.pause(job) },
                progress: { done, total in
                    self.reply(id, final: false) {
                        $0.compressProgress = .with {
                            $0.chunksDone = UInt32(done)
                            $0.chunksTotal = UInt32(total)
                        }
                    }
                    return worker.pause(job)
                })
            metrics.blocks(encoded: r.chunks_encoded, chunkHits: r.chunk_cache_hits, prefixHits: r.prefix_cache_hits)
            lock.lock()
            documents[c.documentID]?.chunks = r.chunks
            lock.unlock()
            return {
                $0.compressResult = .with {
                    $0.chunks = UInt32(r.chunks)
                    $0.textTokens = UInt32(r.text_tokens)
                    $0.visualTokens = UInt32(r.visual_tokens)
                    $0.ratio = r.ratio
                    $0.chunksRendered = UInt32(r.chunks_encoded)
                    $0.chunkCacheHits = UInt32(r.chunk_cache_hits)
                    $0.prefixCacheHits = UInt32(r.prefix_cache_hits)
                    $0.elapsedMs = r.elapsed_ms
                }
            }
        }
    }

    func render(_ id: UInt64, _ r: Vist2_V1_RenderRequest) {
        guard let model = vist2 else {
            return error(id, .unsupported, "the loaded model (\(context.modelName)) has no renderer; render needs a VIST2 model")
        }
        guard let text = texts(id, [r.documentID]) else { return }
        let worker = context.worker
        let previous = chunking([r.documentID])
        submit(id) { [self] job throws(EngineError) in
            let step = { worker.pause(job) }
            guard let chunking = model.chunker.chunking(text[0], reusing: previous, step: step) else { throw .cancelled }
            keep(chunking, for: [r.documentID])
            let chunks = chunking.chunks
            for (i, c) in chunks.enumerated() {
                guard step() else { throw .cancelled }
                let encoded = Result { () throws(RenderError) in try model.renderer.render(c.text).image.pngData() }
                guard case .success(let png) = encoded else { throw .io("cannot encode chunk \(i) as PNG") }
                reply(id, final: false) {
                    $0.renderedChunk = .with {
                        $0.index = UInt32(i)
                        $0.png = Data(png)
                        $0.text = String(c.text)
                        $0.tokens = UInt32(c.tokens)
                        $0.missingGlyphs = UInt32(c.missing)
                    }
                }
            }
            let tokens = chunks.map(\.tokens).reduce(0, +)
            let visual = chunks.count * model.visualTokens
            return {
                $0.renderResult = .with {
                    $0.chunks = UInt32(chunks.count)
                    $0.textTokens = UInt32(tokens)
                    $0.visualTokens = UInt32(visual)
                    $0.ratio = visual > 0 ? Double(tokens) / Double(visual) : 0
                }
            }
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
        var req = GenerationRequest(prompt: g.instruction)
        req.chat = g.chat
        // A VIST2 model can write past the backbone's context (finished chunks shrink to visual
        // tokens), so the bound is a sanity limit, not the context.
        let maxTokens = limits.maxTokens
        guard g.maxTokens <= UInt32(clamping: maxTokens) else {
            return error(id, .badRequest, "max_tokens \(g.maxTokens) is over the limit of \(maxTokens)")
        }
        req.maxTokens = Int(g.maxTokens == 0 ? 128 : g.maxTokens)
        guard g.stop.count <= limits.maxStopStrings, g.stop.allSatisfy({ $0.utf8.count <= limits.maxStopBytes }) else {
            return error(id, .badRequest, "at most \(limits.maxStopStrings) stop strings of at most \(limits.maxStopBytes) bytes")
        }
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
        guard let docs = texts(id, g.documentIds) else { return }
        if !docs.isEmpty && vist2 == nil {
            return error(
                id, .unsupported, "the loaded model (\(context.modelName)) is a plain language model; documents need a VIST2 model")
        }
        let ctx = context
        let request = req
        let cache = context.blockCache(for: cacheOwner(shared: g.shared))
        let docIDs = g.documentIds, previous = chunking(g.documentIds)
        submit(id) { [self] job throws(EngineError) in
            let onText: (String) -> Bool = { piece in
                self.reply(id, final: false) { $0.textDelta = .with { $0.text = piece } }
                return !job.isCancelled
            }
            var result: Vist2_V1_GenerateResult
            switch ctx.model {
            case .vist2(let m):
                var interleaved = request
                interleaved.yield = { ctx.worker.yieldToOthers(from: job) }
                interleaved.isCancelled = { job.isCancelled }
                var vr = VIST2Request(generation: interleaved, documents: docs, fullText: g.fullText)
                vr.cache = cache
                vr.previousChunking = previous
                vr.onChunking = { self.keep($0, for: docIDs) }
                vr.progress = { _, _ in !job.isCancelled }
                let r = try VIST2Generator(model: m).generate(vr, onText: onText)
                result = Self.common(
                    r.text, r.prompt_tokens, r.generated_tokens, r.ttft_ms, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.stop_reason)
                result.docTextTokens = UInt32(clamping: r.doc_text_tokens)
                result.visualTokens = UInt32(clamping: r.visual_tokens)
                result.compressionRatio = r.compression_ratio
                result.kvBytes = UInt64(r.kv_bytes)
                result.kvBytesFinal = UInt64(r.kv_bytes_final)
                result.flops = UInt64(r.flops)
                result.renderMs = r.render_ms
                result.visionMs = r.vision_ms
                result.prefillMs = r.prefill_ms
                result.decodeMs = r.decode_ms
                result.chunks = UInt32(r.chunks)
                result.swaps = UInt32(r.swaps)
                result.chunksEncoded = UInt32(r.chunks_encoded)
                result.chunkCacheHits = UInt32(r.chunk_cache_hits)
                result.prefixCacheHits = UInt32(r.prefix_cache_hits)
                ctx.metrics.blocks(encoded: r.chunks_encoded, chunkHits: r.chunk_cache_hits, prefixHits: r.prefix_cache_hits)
                ctx.metrics.generation(
                    prompt: r.prompt_tokens, generated: r.generated_tokens, prefillMs: r.prefill_ms, decodeMs: r.decode_ms,
                    kvPeak: r.kv_bytes, decodeTPS: r.decode_tokens_per_s)
            case .language(let lm):
                var interleaved = request
                interleaved.yield = { ctx.worker.yieldToOthers(from: job) }
                interleaved.isCancelled = { job.isCancelled }
                let r = try Generator(model: lm).generate(interleaved, onText: onText)
                result = Self.common(
                    r.text, r.prompt_tokens, r.generated_tokens, r.ttft_ms, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.stop_reason)
                ctx.metrics.generation(
                    prompt: r.prompt_tokens, generated: r.generated_tokens, prefillMs: r.ttft_ms,
                    decodeMs: r.decode_tokens_per_s > 0 ? Double(max(0, r.generated_tokens - 1)) / r.decode_tokens_per_s * 1000 : 0,
                    kvPeak: 0, decodeTPS: r.decode_tokens_per_s)
            }
            if result.stopReason == StopReason.cancelled.rawValue { throw .cancelled }
            let final = result
            return { $0.generateResult = final }
        }
    }
}
