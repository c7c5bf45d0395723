import Foundation
import SwiftProtobuf
import VistProtocol
import VistWire

#if canImport(Glibc)
    import Glibc
#endif

/// A typed, blocking client for vist2d: one connection, requests answered in order of arrival.
/// `vist2ctl` is a thin shell over it; it never speaks the wire format by hand.
public final class VistClient {
    public enum ClientError: Error, CustomStringConvertible {
        case connect(path: String, reason: String)
        case io(String)
        case closed
        case protocolError(String)
        case server(Vist2_V1_ErrorCode, String)

        public var description: String {
            switch self {
            case .connect(let p, let r): return "cannot connect to the vist2 daemon at \(p): \(r) (is vist2d running?)"
            case .io(let s): return s
            case .closed: return "the daemon closed the connection"
            case .protocolError(let s): return s
            case .server(let c, let m): return "\(m) [\(c)]"
            }
        }
    }

    let fd: Int32
    var decoder = FrameDecoder(maxPayload: Frame.hardMaxPayload)
    var pending: [[UInt8]] = []
    var nextID: UInt64 = 1
    public private(set) var hello = Vist2_V1_HelloReply()

    /// The socket a user's daemon listens on: $XDG_RUNTIME_DIR/vist2/vist2.sock, else /run/vist2/vist2.sock.
    public static var defaultSocketPath: String {
        if let d = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !d.isEmpty { return d + "/vist2/vist2.sock" }
        return "/run/vist2/vist2.sock"
    }

    /// Connects and performs the handshake.
    public init(socketPath: String = VistClient.defaultSocketPath, clientName: String = "vist2ctl") throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ClientError.connect(path: socketPath, reason: String(cString: strerror(errno))) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(socketPath.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw ClientError.connect(path: socketPath, reason: "path too long")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw ClientError.connect(path: socketPath, reason: reason)
        }
        var m = Vist2_V1_ClientMessage()
        m.requestID = 0
        m.hello = .with {
            $0.protocolVersion = 1
            $0.clientName = clientName
        }
        // The daemon may refuse a peer before reading anything (PERMISSION_DENIED) and close: then
        // the Hello cannot be written, but its error is waiting to be read.
        let sendError: Error?
        do {
            try send(m)
            sendError = nil
        } catch {
            sendError = error
        }
        let r: Vist2_V1_ServerMessage
        do { r = try receive() } catch { throw sendError ?? error }
        if case .error(let e) = r.body { throw ClientError.server(e.code, e.message) }
        if let sendError { throw sendError }
        guard case .hello(let h) = r.body else { throw ClientError.protocolError("the daemon did not answer the handshake") }
        hello = h
    }

    deinit { close(fd) }

    public func makeID() -> UInt64 {
        defer { nextID += 1 }
        return nextID
    }

    public func send(_ m: Vist2_V1_ClientMessage) throws {
        let payload: [UInt8] = try m.serializedBytes()
        try sendRaw(try Frame.encode(payload, maxPayload: Frame.hardMaxPayload))
    }

    /// Bytes as they are (tests send malformed input with this).
    public func sendRaw(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            // MSG_NOSIGNAL: a daemon that closed the connection is an error here, not a SIGPIPE.
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ClientError.io("write: \(String(cString: strerror(errno)))")
            }
            off += n
        }
    }

    /// The next message from the daemon (blocking).
    public func receive() throws -> Vist2_V1_ServerMessage {
        while pending.isEmpty {
            var buf = [UInt8](repeating: 0, count: 65536)
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ClientError.io("read: \(String(cString: strerror(errno)))")
            }
            if n == 0 { throw ClientError.closed }
            do { pending += try decoder.feed(buf[0..<n]) } catch { throw ClientError.protocolError(error.description) }
        }
        let p = pending.removeFirst()
        do { return try Vist2_V1_ServerMessage(serializedBytes: p) } catch {
            throw ClientError.protocolError("undecodable reply: \(error)")
        }
    }

    /// Sends one request and returns its final reply's body; non-final replies go to `onPartial`.
    func request(_ fill: (inout Vist2_V1_ClientMessage) -> Void, id: UInt64? = nil, onPartial: (Vist2_V1_ServerMessage) -> Void = { _ in })
        throws -> Vist2_V1_ServerMessage.OneOf_Body?
    {
        var m = Vist2_V1_ClientMessage()
        m.requestID = id ?? makeID()
        fill(&m)
        try send(m)
        while true {
            let r = try receive()
            guard r.requestID == m.requestID else { continue }
            if case .error(let e) = r.body { throw ClientError.server(e.code, e.message) }
            if r.final { return r.body }
            onPartial(r)
        }
    }

    func unexpected(_ what: String) -> ClientError { .protocolError("unexpected reply to \(what)") }

    public func status() throws -> Vist2_V1_Status {
        guard case .status(let s) = try request({ $0.status = .init() }) else { throw unexpected("Status") }
        return s
    }

    public func openDocument(text: String, path: String = "") throws -> Vist2_V1_DocumentInfo {
        let body = try request {
            $0.openDocument = .with {
                $0.text = text
                $0.path = path
            }
        }
        guard case .document(let d) = body else { throw unexpected("OpenDocument") }
        return d
    }

    public func updateDocument(id: String, text: String) throws -> Vist2_V1_DocumentInfo {
        let body = try request {
            $0.updateDocument = .with {
                $0.documentID = id
                $0.text = text
            }
        }
        guard case .document(let d) = body else { throw unexpected("UpdateDocument") }
        return d
    }

    public func closeDocument(id: String) throws {
        guard case .ack = try request({ $0.closeDocument = .with { $0.documentID = id } }) else { throw unexpected("CloseDocument") }
    }

    public func compress(
        documentID: String, instruction: String = "", chat: Bool = false, shared: Bool = false,
        onProgress: (Vist2_V1_CompressProgress) -> Void = { _ in }
    ) throws -> Vist2_V1_CompressResult {
        let body = try request(
            {
                $0.compress = .with {
                    $0.documentID = documentID
                    $0.instruction = instruction
                    $0.chat = chat
                    $0.shared = shared
                }
            },
            onPartial: { if case .compressProgress(let p) = $0.body { onProgress(p) } })
        guard case .compressResult(let r) = body else { throw unexpected("Compress") }
        return r
    }

    public func render(documentID: String, onChunk: (Vist2_V1_RenderedChunk) -> Void) throws -> Vist2_V1_RenderResult {
        let body = try request(
            { $0.render = .with { $0.documentID = documentID } }, onPartial: { if case .renderedChunk(let c) = $0.body { onChunk(c) } })
        guard case .renderResult(let r) = body else { throw unexpected("Render") }
        return r
    }

    public func cacheList(limit: UInt32 = 0) throws -> [Vist2_V1_CacheEntry] {
        guard case .cacheList(let l) = try request({ $0.cacheList = .with { $0.limit = limit } }) else { throw unexpected("CacheList") }
        return l.entries
    }

    public func cacheEvict(keys: [String], all: Bool = false) throws -> Vist2_V1_CacheEvictResult {
        let body = try request {
            $0.cacheEvict = .with {
                $0.keys = keys
                $0.all = all
            }
        }
        guard case .cacheEvictResult(let r) = body else { throw unexpected("CacheEvict") }
        return r
    }

    public func cacheStats() throws -> Vist2_V1_CacheStats {
        guard case .cacheStats(let s) = try request({ $0.cacheStats = .init() }) else { throw unexpected("CacheStats") }
        return s
    }

    public func metrics() throws -> String {
        guard case .metrics(let m) = try request({ $0.metrics = .init() }) else { throw unexpected("Metrics") }
        return m.prometheusText
    }

    public func tokenize(_ text: String, parseSpecial: Bool = false, noSpecial: Bool = false) throws -> [Int32] {
        let body = try request {
            $0.tokenize = .with {
                $0.text = text
                $0.parseSpecial = parseSpecial
                $0.noSpecial = noSpecial
            }
        }
        guard case .tokenizeResult(let r) = body else { throw unexpected("Tokenize") }
        return r.ids
    }

    public func perplexity(documentID: String, ctx: UInt32, onProgress: (Vist2_V1_PerplexityProgress) -> Void = { _ in }) throws
        -> Vist2_V1_PerplexityResult
    {
        let body = try request(
            {
                $0.perplexity = .with {
                    $0.documentID = documentID
                    $0.ctx = ctx
                }
            }, onPartial: { if case .perplexityProgress(let p) = $0.body { onProgress(p) } })
        guard case .perplexityResult(let r) = body else { throw unexpected("Perplexity") }
        return r
    }

    public func bench(prompt: UInt32, generate: UInt32, repetitions: UInt32) throws -> Vist2_V1_BenchResult {
        let body = try request {
            $0.bench = .with {
                $0.promptTokens = prompt
                $0.generatedTokens = generate
                $0.repetitions = repetitions
            }
        }
        guard case .benchResult(let r) = body else { throw unexpected("Bench") }
        return r
    }

    /// Sends a generation and streams its text; returns the final result.
    public func generate(_ g: Vist2_V1_GenerateRequest, id: UInt64? = nil, onText: (String) -> Void = { _ in }) throws
        -> Vist2_V1_GenerateResult
    {
        let body = try request({ $0.generate = g }, id: id, onPartial: { if case .textDelta(let d) = $0.body { onText(d.text) } })
        guard case .generateResult(let r) = body else { throw unexpected("Generate") }
        return r
    }
}
