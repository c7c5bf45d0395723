import VistWire

/// Every bound the daemon puts on what clients may make it hold or do, in one place. Each is
/// documented in Protocols/PROTOCOL.md ("Limits") with the error its breach returns, and
/// announced to clients in `HelloReply.limits`. The defaults let one user's editors and scripts
/// work freely while no client, or crowd of clients, can exhaust the daemon's memory, descriptors
/// or engine.
public struct ServerLimits: Sendable, Equatable {
    /// Requests waiting for the engine, server-wide; past it: BUSY.
    public var queueCapacity = 16
    /// Requests the engine runs at once (decoding together in one batch, taking turns for
    /// prefill steps); the next ones wait in the queue.
    public var maxActive = 32
    /// Largest frame payload accepted; past it: FRAME_TOO_LARGE and the connection closes.
    public var maxFrame = Frame.defaultMaxPayload
    /// Requests in flight per connection; past it: TOO_MANY_REQUESTS.
    public var maxInFlight = 16
    /// Documents open per connection; past it: TOO_MANY_REQUESTS.
    public var maxDocuments = 256
    /// Bytes of one document's text; past it: DOCUMENT_TOO_LARGE.
    public var maxDocumentBytes = 4 << 20
    /// Bytes of the documents open on one connection; past it: DOCUMENT_TOO_LARGE.
    public var maxConnectionDocumentBytes = 64 << 20
    /// Bytes of the documents open on the whole daemon; past it: BUSY.
    public var maxTotalDocumentBytes = 1 << 30
    /// Documents one Generate may read (each at most once; a repeat is BAD_REQUEST).
    public var maxDocumentsPerRequest = 64
    /// Connections at once; the next one gets BUSY (request id 0) and is closed.
    public var maxConnections = 512
    /// A connection must send Hello within this; else TIMEOUT and close.
    public var handshakeTimeout: Duration = .seconds(10)
    /// A connection with nothing in flight that sends nothing for this long is closed (TIMEOUT).
    /// Documents do not keep a connection alive: a client that wants to hold them sends Status
    /// now and then. `.zero` disables it.
    public var idleTimeout: Duration = .seconds(3600)
    /// A frame must be complete this long after its first byte arrived (a client that sends a
    /// header and stalls); else TIMEOUT and close.
    public var frameTimeout: Duration = .seconds(30)
    /// Bytes of replies a connection may leave unread (each counted with
    /// `pendingReplyOverhead`); past it the connection is closed and its requests cancelled.
    public var maxPendingOutput = 16 << 20
    /// Bytes of unread replies over all connections; past it, the connection whose reply would
    /// cross it is closed if it holds more than `pendingOutputShare` itself.
    public var maxTotalPendingOutput = 256 << 20
    public var pendingOutputShare = 1 << 20
    /// What one queued reply costs beyond its bytes (buffer, closure, promise), as counted
    /// against the two limits above.
    public static let pendingReplyOverhead = 512
    /// max_tokens of one Generate; past it: BAD_REQUEST.
    public var maxTokens = 1 << 16
    /// Stop strings of one Generate and bytes of each; past them: BAD_REQUEST.
    public var maxStopStrings = 16
    public var maxStopBytes = 256
    /// Entries one CacheList reply may carry (it must fit a frame).
    public var maxCacheListEntries = 10_000
    /// On SIGTERM, queued and running requests get this long to finish; then the rest are
    /// cancelled and every client gets its final reply.
    public var drainTimeout: Duration = .seconds(30)
    /// The engine counts as stalled (Status "stalled", no watchdog keep-alive) when it has work
    /// and has made no progress for this long. One step of any request takes far less.
    public var stallTimeout: Duration = .seconds(120)
    /// Bytes of the path an OpenDocument names (informational, echoed back).
    public var maxPathBytes = 4096
    /// Keys one CacheEvict may name.
    public var maxEvictKeys = 100_000
    /// Logits window of a Perplexity when the request leaves it 0.
    public var defaultPerplexityContext = 512
    /// max_tokens of a Generate that leaves it 0.
    public var defaultMaxTokens = 128
    /// Timed repetitions of a Bench that leaves them 0.
    public var defaultBenchRepetitions = 5
    /// How often each connection's timeouts are checked.
    public var timerTick: Duration = .seconds(1)

    public init() {}
}

extension Duration {
    /// Whole milliseconds, for the wire (clamped to UInt32).
    public var milliseconds: UInt32 {
        let (s, atto) = components
        return UInt32(clamping: s * 1000 + atto / 1_000_000_000_000_000)
    }

    public var asSeconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) / 1e18
    }
}
