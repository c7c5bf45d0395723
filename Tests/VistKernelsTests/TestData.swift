import VistKernels
import VistTestSupport

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
