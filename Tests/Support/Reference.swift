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

    /// y (n, rows) = x (n, cols) * W^T, accumulated in Double from dequantized rows.
    public static func matmul(_ w: WeightMatrix, x: [Float], n: Int) -> [Float] {
        var y = [Float](repeating: 0, count: n * w.rows)
        for r in 0..<w.rows {
            let row = dequantizeRow(w.type, w.row(r), count: w.cols)
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
