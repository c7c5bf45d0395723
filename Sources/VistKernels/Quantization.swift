import CVistKernels

/// Element type of a weight tensor, with GGML's numbering (the values GGUF stores).
public enum TensorType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case f32 = 0
    case f16 = 1
    case q4_0 = 2
    case q4_1 = 3
    case q8_0 = 8
    case bf16 = 30

    /// Elements per block (1 for float types).
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16: return 1
        case .q4_0, .q4_1, .q8_0: return 32
        }
    }

    /// Bytes per block, as in llama.cpp's ggml-common.h.
    public var blockBytes: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        case .q4_0: return 18
        case .q4_1: return 20
        case .q8_0: return 34
        }
    }

    public var isQuantized: Bool { blockSize > 1 }

    /// Bytes of a row of `n` elements, or nil when `n` is not a whole number of blocks.
    public func rowBytes(_ n: Int) -> Int? {
        guard n >= 0, n % blockSize == 0 else { return nil }
        return n / blockSize * blockBytes
    }

    public var description: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .q4_0: return "Q4_0"
        case .q4_1: return "Q4_1"
        case .q8_0: return "Q8_0"
        }
    }
}

/// Half precision and bfloat16 conversions (IEEE 754 binary16 with round-to-nearest-even).
public enum Half {
    @inlinable public static func toFloat(_ h: UInt16) -> Float { vk_fp16_to_fp32(h) }
    @inlinable public static func fromFloat(_ f: Float) -> UInt16 { vk_fp32_to_fp16(f) }
    @inlinable public static func bf16ToFloat(_ h: UInt16) -> Float { vk_bf16_to_fp32(h) }
}

/// The SIMD path the C kernels chose on this CPU ("avx512vnni", "avx2" or "scalar").
public var simdPath: String { String(cString: vk_simd_path()) }

/// Forces the portable scalar kernels (for tests that compare paths). Returns the old setting.
@discardableResult
public func forceScalarKernels(_ on: Bool) -> Bool { vk_force_scalar(on ? 1 : 0) != 0 }

/// Dequantizes `count` elements of `type` at `src` into `dst`.
@inlinable
public func dequantize(_ type: TensorType, _ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, count: Int) {
    vk_dequantize(Int32(type.rawValue), src, dst, Int64(count))
}

/// Quantizes `count` floats (a multiple of 32) into activation blocks for the integer dot products.
@inlinable
public func quantizeActivations(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<vk_block_q8a>, count: Int) {
    vk_quantize_q8a(x, out, Int64(count))
}

public typealias ActivationBlock = vk_block_q8a
