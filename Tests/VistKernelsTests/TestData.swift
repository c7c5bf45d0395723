import VistKernels

/// Deterministic pseudo-random data for kernel tests.
struct TestRNG {
    var state: UInt64
    init(_ seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        var z = state
        z = (z ^ (z >> 33)) &* 0xff51_afd7_ed55_8ccd
        return z ^ (z >> 33)
    }
    /// Uniform in [-1, 1).
    mutating func float() -> Float { Float(Double(next() >> 11) * 0x1.0p-53 * 2 - 1) }
    mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
}

/// Random bytes forming valid rows of `type`: block scales are finite, modest halves.
func randomMatrixBytes(_ type: TensorType, rows: Int, cols: Int, rng: inout TestRNG) -> [UInt8] {
    let rowBytes = type.rowBytes(cols)!
    var bytes = [UInt8](repeating: 0, count: rows * rowBytes)
    func putHalf(_ v: Float, at i: Int) {
        let h = Half.fromFloat(v)
        bytes[i] = UInt8(h & 0xff)
        bytes[i + 1] = UInt8(h >> 8)
    }
    switch type {
    case .f32:
        for i in 0..<(rows * cols) {
            let b = rng.float().bitPattern
            for k in 0..<4 { bytes[4 * i + k] = UInt8((b >> (8 * UInt32(k))) & 0xff) }
        }
    case .f16:
        for i in 0..<(rows * cols) { putHalf(rng.float(), at: 2 * i) }
    case .bf16:
        for i in 0..<(rows * cols) {
            let b = rng.float().bitPattern >> 16
            bytes[2 * i] = UInt8(b & 0xff)
            bytes[2 * i + 1] = UInt8(b >> 8)
        }
    case .q4_0, .q4_1, .q8_0:
        for b in 0..<(rows * cols / 32) {
            let base = b * type.blockBytes
            putHalf(abs(rng.float()) * 0.1 + 0.001, at: base)
            var q = base + 2
            if type == .q4_1 {
                putHalf(rng.float() * 0.5, at: base + 2)
                q = base + 4
            }
            for j in q..<(base + type.blockBytes) {
                var v = rng.byte()
                if type == .q8_0 && v == 0x80 { v = 0x81 }  // llama.cpp's Q8_0 never stores -128
                bytes[j] = v
            }
        }
    }
    return bytes
}
