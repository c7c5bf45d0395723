import Foundation
import Synchronization
import VistCache
import VistEngine
import VistProtocol
import VistWire

/// What every connection shares: the loaded model, the engine worker, the persistent cache,
/// limits, the peer policy and the counters behind `Metrics`.
public final class ServerContext: @unchecked Sendable {
    public typealias Model = EngineModel
    public typealias Limits = ServerLimits

    public let model: Model
    public let modelName: String
    public let worker: EngineWorker
    public let limits: Limits
    public let cache: CacheStore?
    public let peers: PeerPolicy
    public let metrics = ServerMetrics()
    public let log: @Sendable (String) -> Void
    /// The element type of every request's KV cache (`--kv-type`).
    public let kvType: KVType
    /// Where text work runs (tokenizing, chunking, rendering): beside the engine thread, so a
    /// long document never holds up other clients' decoding.
    let text = DispatchQueue(label: "vist2-text", qos: .userInitiated, attributes: .concurrent)
    /// Request handlers by message kind.
    let handlers: [String: Handler]
    public let started = Date()
    public static let serverVersion = "vist2d 0.2.0"
    public static let protocolVersion: UInt32 = 1
    let lock = NSLock()
    var clients = 0
    var documentsOpen = 0
    /// Bytes of the text of every open document (`limits.maxTotalDocumentBytes`).
    var documentBytes = 0
    var draining = false
    /// Bytes of replies queued on all connections and not yet written (`limits.maxTotalPendingOutput`).
    let pendingOutput = Atomic<Int>(0)

    public init(
        model: Model, modelName: String, limits: Limits = Limits(), cache: CacheStore? = nil, peers: PeerPolicy = .sameUser,
        kvType: KVType = .f32, log: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.model = model
        self.modelName = modelName
        self.limits = limits
        self.kvType = kvType
        handlers = Handlers.table
        worker = EngineWorker(capacity: limits.queueCapacity, maxActive: limits.maxActive, transformer: model.language.transformer)
        self.cache = cache
        self.peers = peers
        self.log = log
    }

    public var maxFrame: Int { limits.maxFrame }

    var language: LanguageModel { model.language }

    /// The engine's view of the persistent cache for one request: lookups and stores in
    /// `owner`'s namespace (a user's own entries, or the shared ones).
    func blockCache(for owner: CacheStore.Owner) -> VIST2BlockCache? { cache.map { StoreBlockCache(store: $0, owner: owner) } }

    /// The daemon's own uid: it and root see and evict every cache entry.
    let ownUID = UInt32(getuid())

    /// How the peer `uid` sees the shared cache (CacheList, CacheEvict, CacheStats).
    func cacheViewer(uid: UInt32) -> CacheStore.Viewer { .init(uid: uid, seesAll: uid == 0 || uid == ownUID) }

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

    func adjust(clients dc: Int = 0, documents dd: Int = 0, bytes db: Int = 0) {
        lock.lock()
        clients += dc
        documentsOpen += dd
        documentBytes += db
        lock.unlock()
    }

    /// Counts a new connection unless `limits.maxConnections` are open.
    func admitConnection() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard clients < limits.maxConnections else { return false }
        clients += 1
        return true
    }

    /// Takes `delta` more bytes of document text (negative: gives them back); false, and nothing
    /// taken, when that would pass `limits.maxTotalDocumentBytes`.
    func reserveDocumentBytes(_ delta: Int) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard delta <= 0 || documentBytes + delta <= limits.maxTotalDocumentBytes else { return false }
        documentBytes += delta
        return true
    }

    func counts() -> (clients: Int, documents: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (clients, documentsOpen)
    }

    var openDocumentBytes: Int {
        lock.lock()
        defer { lock.unlock() }
        return documentBytes
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
            let l = limits
            $0.limits = .with {
                $0.maxFrameBytes = UInt32(clamping: l.maxFrame)
                $0.maxRequestsInFlight = UInt32(clamping: l.maxInFlight)
                $0.queueCapacity = UInt32(clamping: worker.capacity)
                $0.maxDocumentBytes = UInt64(l.maxDocumentBytes)
                $0.maxTokens = UInt32(clamping: l.maxTokens)
                $0.maxDocumentsPerRequest = UInt32(clamping: l.maxDocumentsPerRequest)
                $0.maxDocuments = UInt32(clamping: l.maxDocuments)
                $0.maxConnectionDocumentBytes = UInt64(l.maxConnectionDocumentBytes)
                $0.maxTotalDocumentBytes = UInt64(l.maxTotalDocumentBytes)
                $0.maxConnections = UInt32(clamping: l.maxConnections)
                $0.handshakeTimeoutMs = l.handshakeTimeout.milliseconds
                $0.idleTimeoutMs = l.idleTimeout.milliseconds
                $0.frameTimeoutMs = l.frameTimeout.milliseconds
                $0.maxPendingOutputBytes = UInt64(l.maxPendingOutput)
                $0.maxStopStrings = UInt32(clamping: l.maxStopStrings)
                $0.maxStopBytes = UInt32(clamping: l.maxStopBytes)
            }
            $0.capabilities = caps
        }
    }

    func status() -> Vist2_V1_Status {
        let c = counts()
        let stalled = worker.stalledSeconds
        return .with {
            $0.state = isDraining ? "draining" : stalled > limits.stallTimeout.asSeconds ? "stalled" : "ready"
            $0.engineStalledSeconds = stalled
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

/// `VIST2BlockCache` over the on-disk `CacheStore`: aligner outputs stored as their floats'
/// little-endian bytes, block KV entries as the bytes the KV cache gives.
final class StoreBlockCache: VIST2BlockCache, @unchecked Sendable {
    let store: CacheStore
    let owner: CacheStore.Owner
    init(store: CacheStore, owner: CacheStore.Owner) {
        self.store = store
        self.owner = owner
    }

    static func floats(_ b: UnsafeRawBufferPointer) -> [Float]? {
        guard b.count % 4 == 0 else { return nil }
        var out = [Float](repeating: 0, count: b.count / 4)
        out.withUnsafeMutableBytes { $0.copyMemory(from: b) }
        return out
    }

    func alignerOutput(key: [UInt8]) -> [Float]? { store.get(.chunk, key: key, owner: owner, decode: Self.floats) ?? nil }
    func storeAlignerOutput(key: [UInt8], _ values: ArraySlice<Float>) {
        _ = values.withUnsafeBytes { store.put(.chunk, key: key, owner: owner, payload: $0) }
    }
    func blockKV(key: [UInt8]) -> [UInt8]? { store.get(.prefix, key: key, owner: owner, decode: { Array($0) }) }
    func storeBlockKV(key: [UInt8], _ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        _ = bytes.withUnsafeBytes { store.put(.prefix, key: key, owner: owner, payload: $0) }
    }
}

extension CacheStore.Owner {
    /// The engine's sharing scope for requests whose cache entries are this owner's: a user's
    /// own namespace, or the shared one (`GenerationRequest.sharingScope`).
    var sharingScope: [UInt8] { shared ? Array("shared".utf8) : Array("uid \(uid)".utf8) }
}
