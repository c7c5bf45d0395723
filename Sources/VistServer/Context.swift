import Foundation
import VistCache
import VistEngine
import VistProtocol
import VistWire

/// What every connection shares: the loaded model, the engine worker, the persistent cache,
/// limits, the peer policy and the counters behind `Metrics`.
public final class ServerContext: @unchecked Sendable {
    public enum Model {
        case vist2(VIST2Model)
        case language(LanguageModel)
    }

    public struct Limits: Sendable {
        public var queueCapacity = 16
        public var maxFrame = Frame.defaultMaxPayload
        /// Requests in flight per connection.
        public var maxInFlight = 16
        /// Documents open per connection.
        public var maxDocuments = 256
        /// Bytes of unsent replies a connection may accumulate (a client that stops reading)
        /// before it is closed and its requests cancelled.
        public var maxPendingOutput = 64 << 20
        public init() {}
    }

    public let model: Model
    public let modelName: String
    public let worker: EngineWorker
    public let limits: Limits
    public let cache: CacheStore?
    public let peers: PeerPolicy
    public let metrics = ServerMetrics()
    public let log: @Sendable (String) -> Void
    public let started = Date()
    public static let serverVersion = "vist2d 0.2.0"
    public static let protocolVersion: UInt32 = 1
    let lock = NSLock()
    var clients = 0
    var documentsOpen = 0
    var draining = false

    public init(
        model: Model, modelName: String, limits: Limits = Limits(), cache: CacheStore? = nil, peers: PeerPolicy = .sameUser,
        log: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.model = model
        self.modelName = modelName
        self.limits = limits
        worker = EngineWorker(capacity: limits.queueCapacity)
        self.cache = cache
        blockCache = cache.map { StoreBlockCache(store: $0) }
        self.peers = peers
        self.log = log
    }

    public var maxFrame: Int { limits.maxFrame }
    /// Largest max_tokens a request may ask for.
    public var maxTokens: Int { 1 << 20 }

    var language: LanguageModel {
        switch model {
        case .vist2(let m): return m.language
        case .language(let l): return l
        }
    }

    /// The engine's view of the persistent cache.
    let blockCache: VIST2BlockCache?

    /// Called when SIGTERM arrives: new work is refused with DRAINING, queued work finishes.
    public func beginDraining() {
        lock.lock()
        draining = true
        lock.unlock()
    }

    var isDraining: Bool {
        lock.lock()
        defer { lock.unlock() }
        return draining
    }

    func adjust(clients dc: Int = 0, documents dd: Int = 0) {
        lock.lock()
        clients += dc
        documentsOpen += dd
        lock.unlock()
    }

    func counts() -> (clients: Int, documents: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (clients, documentsOpen)
    }

    func helloReply() -> Vist2_V1_HelloReply {
        .with {
            $0.protocolVersion = Self.protocolVersion
            $0.serverVersion = Self.serverVersion
            $0.modelName = modelName
            $0.contextLength = UInt32(language.config.contextLength)
            var caps = ["status", "generate", "cancel", "documents", "metrics", "cache", "tokenize", "perplexity", "bench"]
            if case .vist2(let m) = model {
                $0.modelFingerprint = m.fingerprint
                $0.chunkLength = UInt32(m.chunkLength)
                $0.chunkRatio = UInt32(m.config.chunk.ratio)
                $0.visualTokens = UInt32(m.visualTokens)
                caps += ["compress", "render"]
            }
            $0.limits = .with {
                $0.maxFrameBytes = UInt32(limits.maxFrame)
                $0.maxRequestsInFlight = UInt32(limits.maxInFlight)
                $0.queueCapacity = UInt32(worker.capacity)
                $0.maxDocumentBytes = UInt64(limits.maxFrame)
                $0.maxTokens = UInt32(maxTokens)
            }
            $0.capabilities = caps
        }
    }

    func status() -> Vist2_V1_Status {
        let c = counts()
        return .with {
            $0.state = isDraining ? "draining" : "ready"
            $0.queueLength = UInt32(worker.queueLength)
            $0.clients = UInt32(c.clients)
            $0.documentsOpen = UInt32(c.documents)
            $0.cacheBytes = UInt64(cache?.stats.bytes ?? 0)
            $0.uptimeSeconds = UInt64(Date().timeIntervalSince(started))
            $0.modelName = modelName
            if case .vist2(let vm) = model { $0.modelFingerprint = vm.fingerprint }
        }
    }
}

/// `VIST2BlockCache` over the on-disk `CacheStore`: floats stored as their little-endian bytes.
final class StoreBlockCache: VIST2BlockCache, @unchecked Sendable {
    let store: CacheStore
    init(store: CacheStore) { self.store = store }

    static func floats(_ b: UnsafeRawBufferPointer) -> [Float]? {
        guard b.count % 4 == 0 else { return nil }
        var out = [Float](repeating: 0, count: b.count / 4)
        out.withUnsafeMutableBytes { $0.copyMemory(from: b) }
        return out
    }

    func alignerOutput(key: [UInt8]) -> [Float]? { store.get(.chunk, key: key, decode: Self.floats) ?? nil }
    func storeAlignerOutput(key: [UInt8], _ values: ArraySlice<Float>) {
        _ = values.withUnsafeBytes { store.put(.chunk, key: key, payload: $0) }
    }
    func blockKV(key: [UInt8]) -> [Float]? { store.get(.prefix, key: key, decode: Self.floats) ?? nil }
    func storeBlockKV(key: [UInt8], _ values: [Float]) {
        _ = values.withUnsafeBytes { store.put(.prefix, key: key, payload: $0) }
    }
}
