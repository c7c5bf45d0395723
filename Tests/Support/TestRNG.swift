/// Deterministic pseudo-random data for tests (one generator for every test target).
public struct TestRNG {
    public var state: UInt64
    public init(_ seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    public mutating func next() -> UInt64 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        var z = state
        z = (z ^ (z >> 33)) &* 0xff51_afd7_ed55_8ccd
        return z ^ (z >> 33)
    }
    /// Uniform in [-1, 1).
    public mutating func float() -> Float { Float(Double(next() >> 11) * 0x1.0p-53 * 2 - 1) }
    public mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
}
