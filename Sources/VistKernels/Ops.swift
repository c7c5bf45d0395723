import CVistKernels
import Foundation

/// Elementwise and normalisation kernels on raw buffers. Each works on one row; callers loop
/// over rows (or split rows over a pool). Math follows llama.cpp's ggml ops for the same names.
public enum Ops {
    /// out = x / sqrt(mean(x²) + eps) * weight  (RMSNorm, ggml_rms_norm then ggml_mul).
    @inlinable
    public static func rmsNorm(
        _ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, n: Int, eps: Float
    ) {
        var ss: Float = 0
        for i in 0..<n { ss += x[i] * x[i] }
        let scale = 1 / (ss / Float(n) + eps).squareRoot()
        for i in 0..<n { out[i] = x[i] * scale * weight[i] }
    }

    /// gate = silu(gate) * up  (SwiGLU; vectorized exp in C).
    @inlinable
    public static func swiglu(_ gate: UnsafeMutablePointer<Float>, up: UnsafePointer<Float>, n: Int) {
        vk_swiglu(gate, up, Int64(n))
    }

    /// x = gelu(x), tanh approximation (vectorized exp in C).
    @inlinable
    public static func geluTanh(_ x: UnsafeMutablePointer<Float>, n: Int) {
        vk_gelu_tanh(x, Int64(n))
    }

    /// x += y
    @inlinable
    public static func add(_ x: UnsafeMutablePointer<Float>, _ y: UnsafePointer<Float>, n: Int) {
        for i in 0..<n { x[i] += y[i] }
    }

    /// In-place softmax over n values (max-subtracted for stability; vectorized exp in C).
    @inlinable
    public static func softmax(_ x: UnsafeMutablePointer<Float>, n: Int) {
        vk_softmax(x, Int64(n))
    }

    /// log(sum(exp(x))) over n values.
    @inlinable
    public static func logSumExp(_ x: UnsafePointer<Float>, n: Int) -> Double {
        vk_logsumexp(x, Int64(n))
    }
}

/// How rotary position embeddings pair the dimensions of a head.
public enum RopeStyle: String, Sendable, Codable {
    /// Pairs (2i, 2i+1): llama.cpp's LLAMA_ROPE_TYPE_NORM, used for GGUF `llama` models, whose
    /// converter permutes the Q and K rows of the Hugging Face checkpoint into this order.
    case interleaved
    /// Pairs (i, i + d/2): Hugging Face's rotate_half, and llama.cpp's NEOX type (Qwen3).
    case halves
}

/// Precomputed cos/sin of RoPE angles: theta(pos, i) = pos * base^(-2i/dims), i < dims/2.
public final class RopeTable: @unchecked Sendable {
    public let dims: Int
    public let base: Float
    public let style: RopeStyle
    @usableFromInline var cosTable: [Float] = []
    @usableFromInline var sinTable: [Float] = []
    public private(set) var positions = 0

    public init(dims: Int, base: Float, style: RopeStyle) {
        self.dims = dims
        self.base = base
        self.style = style
    }

    /// Makes positions 0..<n available.
    public func reserve(_ n: Int) {
        guard n > positions else { return }
        let half = dims / 2
        var newCos = [Float](repeating: 0, count: n * half)
        var newSin = [Float](repeating: 0, count: n * half)
        newCos.withUnsafeMutableBufferPointer { c in
            newSin.withUnsafeMutableBufferPointer { s in
                for i in 0..<half {
                    let freq = powf(base, -2 * Float(i) / Float(dims))
                    for p in 0..<n {
                        let theta = Float(p) * freq
                        c[p * half + i] = cosf(theta)
                        s[p * half + i] = sinf(theta)
                    }
                }
            }
        }
        cosTable = newCos
        sinTable = newSin
        positions = n
    }

    /// Rotates one head vector of `dims` floats in place for position `pos` (< positions).
    @inlinable
    public func apply(_ x: UnsafeMutablePointer<Float>, pos: Int) {
        let half = dims / 2
        cosTable.withUnsafeBufferPointer { c in
            sinTable.withUnsafeBufferPointer { s in
                let cb = c.baseAddress! + pos * half
                let sb = s.baseAddress! + pos * half
                switch style {
                case .interleaved:
                    for i in 0..<half {
                        let a = x[2 * i], b = x[2 * i + 1]
                        x[2 * i] = a * cb[i] - b * sb[i]
                        x[2 * i + 1] = a * sb[i] + b * cb[i]
                    }
                case .halves:
                    for i in 0..<half {
                        let a = x[i], b = x[i + half]
                        x[i] = a * cb[i] - b * sb[i]
                        x[i + half] = a * sb[i] + b * cb[i]
                    }
                }
            }
        }
    }
}
