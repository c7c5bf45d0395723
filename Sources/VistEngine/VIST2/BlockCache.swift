/// Where the engine looks for a finished chunk's work before doing it (DAEMON.md, persistent
/// caches): level 1 holds a chunk's aligner output (m x dim floats) under `VIST2Model.chunkKey`,
/// level 2 the KV entries of one visual block (`KVCache.rows`) under the chained
/// `VIST2Model.prefixKey`. Anything that comes back with the wrong size is treated as a miss.
/// The daemon implements it over its on-disk store; the engine never depends on that store.
public protocol VIST2BlockCache: AnyObject, Sendable {
    func alignerOutput(key: [UInt8]) -> [Float]?
    func storeAlignerOutput(key: [UInt8], _ values: ArraySlice<Float>)
    func blockKV(key: [UInt8]) -> [Float]?
    func storeBlockKV(key: [UInt8], _ values: [Float])
}

/// What the cached prefill of finished chunks did.
public struct BlockStats: Sendable, Equatable {
    /// Chunks rendered and run through the vision encoder now.
    public var encoded = 0
    /// Aligner outputs taken from level 1.
    public var chunkHits = 0
    /// Visual blocks whose KV entries came from level 2 (no render, encode or prefill at all).
    public var prefixHits = 0
    public var renderNs: UInt64 = 0
    public var visionNs: UInt64 = 0
    public init() {}
}
