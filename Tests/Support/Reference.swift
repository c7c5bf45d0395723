import Foundation
import VistKernels

/// Naive reference kernels: plain loops in Double, written from the format descriptions rather
/// than shared with the fast paths, so tests can check the SIMD/BLAS kernels against them. Test
/// support only: no production target links it.
public enum Reference {
    /// Dequantizes one block-format row by reading the bytes directly (llama.cpp block layouts).
    public static func dequantizeRow(_ type: TensorType, _ p: UnsafeRawPointer, count: Int) -> [Float] {
        var out = [Float](repeating: 0, count: count)
        func half(_ off: Int) -> Float { Half.toFloat(p.loadUnaligned(fromByteOffset: off, as: UInt16.self)) }
        switch type {
        case .f32:
            for i in 0..<count { out[i] = p.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
        case .f16:
            for i in 0..<count { out[i] = half(2 * i) }
        case .bf16:
            for i in 0..<count {
                out[i] = Half.bf16ToFloat(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
            }
        case .q4_0, .q4_1, .q8_0:
            for b in 0..<(count / 32) {
                let base = b * type.blockBytes
                let d = half(base)
                for j in 0..<32 {
                    let v: Float
                    switch type {
                    case .q8_0:
                        v = Float(p.load(fromByteOffset: base + 2 + j, as: Int8.self)) * d
                    case .q4_0, .q4_1:
                        let qOff = type == .q4_0 ? 2 : 4
                        let byte = p.load(fromByteOffset: base + qOff + (j % 16), as: UInt8.self)
                        let q = j < 16 ? Int(byte & 0x0f) : Int(byte >> 4)
                        v = type == .q4_0 ? Float(q - 8) * d : Float(q) * d + half(base + 2)
                    default: v = 0
                    }
                    out[b * 32 + j] = v
                }
            }
        }
        return out
    }

    /// The bytes of row r of w as the model file stores them (its blocks one after another),
    /// read from either layout; the interleaved one by its definition in CVistKernels.h (group g
    /// = rows 8g..<8g+8; its block i holds the 8 rows' scales, then Q4_1's 8 mins, then their
    /// quant bytes: Q8_0's 8 arrays, Q4's four chunks of 4 bytes per row), independently of the
    /// kernels.
    public static func fileRow(_ w: WeightMatrix, _ r: Int) -> [UInt8] {
        switch w.layout {
        case .rows:
            return Array(UnsafeRawBufferPointer(start: w.data + r * w.rowBytes, count: w.rowBytes))
        case .interleaved8:
            let bb = w.type.blockBytes, nb = w.cols / 32, g = r / 8, k = r % 8
            let halves = w.type == .q4_1 ? 2 : 1
            let qBytes = bb - 2 * halves
            var out: [UInt8] = []
            for i in 0..<nb {
                let block = w.data + (g * nb + i) * 8 * bb
                for h in 0..<halves { out += UnsafeRawBufferPointer(start: block + 16 * h + 2 * k, count: 2) }
                let quants = block + 16 * halves
                if w.type == .q8_0 {
                    out += UnsafeRawBufferPointer(start: quants + k * qBytes, count: qBytes)
                } else {
                    // Four 32-byte chunks; chunk c holds bytes 4c..<4c+4 of row 0, then row 1, ...
                    for c in 0..<4 { out += UnsafeRawBufferPointer(start: quants + 32 * c + 4 * k, count: 4) }
                }
            }
            return out
        }
    }

    /// Row r of w dequantized by `dequantizeRow`.
    public static func dequantizeRow(_ w: WeightMatrix, _ r: Int) -> [Float] {
        fileRow(w, r).withUnsafeBytes { dequantizeRow(w.type, $0.baseAddress!, count: w.cols) }
    }

    /// y (n, rows) = x (n, cols) * W^T, accumulated in Double from dequantized rows.
    public static func matmul(_ w: WeightMatrix, x: [Float], n: Int) -> [Float] {
        var y = [Float](repeating: 0, count: n * w.rows)
        for r in 0..<w.rows {
            let row = dequantizeRow(w, r)
            for i in 0..<n {
                var acc = 0.0
                for c in 0..<w.cols { acc += Double(row[c]) * Double(x[i * w.cols + c]) }
                y[i * w.rows + r] = Float(acc)
            }
        }
        return y
    }

    public static func rmsNorm(_ x: [Float], weight: [Float], eps: Float) -> [Float] {
        let ms = x.reduce(0.0) { $0 + Double($1) * Double($1) } / Double(x.count)
        let s = 1 / (ms + Double(eps)).squareRoot()
        return zip(x, weight).map { Float(Double($0) * s * Double($1)) }
    }

    public static func softmax(_ x: [Float]) -> [Float] {
        let m = x.max() ?? 0
        let e = x.map { exp(Double($0 - m)) }
        let s = e.reduce(0, +)
        return e.map { Float($0 / s) }
    }

    /// RoPE on one head vector, angles computed in Double.
    public static func rope(_ x: [Float], pos: Int, base: Float, style: RopeStyle) -> [Float] {
        let d = x.count, half = d / 2
        var y = x
        for i in 0..<half {
            let theta = Double(pos) * pow(Double(base), -2 * Double(i) / Double(d))
            let (a, b, ia, ib) = style == .interleaved ? (x[2 * i], x[2 * i + 1], 2 * i, 2 * i + 1) : (x[i], x[i + half], i, i + half)
            y[ia] = Float(Double(a) * cos(theta) - Double(b) * sin(theta))
            y[ib] = Float(Double(a) * sin(theta) + Double(b) * cos(theta))
        }
        return y
    }
}
