import VistKernels

/// A GGUF metadata value. Type tags are GGUF's `gguf_metadata_value_type`:
/// 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64.
public indirect enum GGUFValue: Sendable, Equatable {
    case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32)
    case float32(Float), bool(Bool), string(String)
    case array([GGUFValue])
    case uint64(UInt64), int64(Int64), float64(Double)

    /// The value as an integer, for any integer type (and bool).
    public var int: Int? {
        switch self {
        case .uint8(let v): return Int(v)
        case .int8(let v): return Int(v)
        case .uint16(let v): return Int(v)
        case .int16(let v): return Int(v)
        case .uint32(let v): return Int(v)
        case .int32(let v): return Int(v)
        case .uint64(let v): return v <= UInt64(Int.max) ? Int(v) : nil
        case .int64(let v): return Int(v)
        case .bool(let v): return v ? 1 : 0
        default: return nil
        }
    }

    public var float: Double? {
        switch self {
        case .float32(let v): return Double(v)
        case .float64(let v): return v
        default: return int.map(Double.init)
        }
    }

    public var string: String? { if case .string(let s) = self { return s } else { return nil } }
    public var bool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var array: [GGUFValue]? { if case .array(let a) = self { return a } else { return nil } }
}

/// One tensor's entry in the GGUF tensor-info table.
public struct GGUFTensorInfo: Sendable {
    public let name: String
    /// Dimensions, innermost first (GGML's ne[0], ne[1], ...): a matrix is (cols, rows).
    public let dims: [Int]
    /// The raw GGML type id; `type` is nil for ids this engine does not support.
    public let rawType: UInt32
    public var type: TensorType? { TensorType(rawValue: rawType) }
    /// Offset of the data from the start of the data section.
    public let offset: Int
    public var elementCount: Int { dims.reduce(1, *) }
}

/// A memory-mapped GGUF v2/v3 file (llama.cpp's model format): header, metadata, tensor infos,
/// and zero-copy views of tensor data. Layout (little-endian):
///
///     magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
///     kv_count x (string key | u32 value_type | value)
///     tensor_count x (string name | u32 n_dims | n_dims x u64 ne | u32 type | u64 offset)
///     padding to `general.alignment` (default 32) | tensor data
///
/// where a string is u64 length + UTF-8 bytes and an array is u32 type + u64 count + values.
/// Every read is bounds-checked; a damaged file gives a `FormatError`, never a crash.
public final class GGUFFile: @unchecked Sendable {
    public let file: MappedFile
    public let version: UInt32
    public let metadata: [String: GGUFValue]
    /// Metadata keys in file order.
    public let metadataKeys: [String]
    public let tensors: [GGUFTensorInfo]
    public let tensorIndex: [String: Int]
    public let alignment: Int
    public let dataOffset: Int

    public var path: String { file.path }

    /// GGML_MAX_DIMS in llama.cpp.
    static let maxDims = 4

    public convenience init(path: String) throws(FormatError) {
        try self.init(file: MappedFile(path: path))
    }

    public init(file: MappedFile) throws(FormatError) {
        self.file = file
        var r = Cursor(base: file.base, size: file.size, path: file.path)
        let magic = try r.u32()
        guard magic == 0x4655_4747 else {  // "GGUF" read little-endian
            throw FormatError(file: file.path, problem: .badMagic("not a GGUF file (bad magic)"))
        }
        version = try r.u32()
        guard version == 2 || version == 3 else {
            throw FormatError(file: file.path, problem: .unsupportedVersion(version))
        }
        let tensorCount = try r.u64()
        let kvCount = try r.u64()
        // Each kv takes at least 8+4+1 bytes and each tensor info at least 8+4+4+8 bytes.
        guard kvCount <= UInt64(file.size / 13), tensorCount <= UInt64(file.size / 24) else {
            throw FormatError(
                file: file.path, problem: .invalid("tensor or metadata count \(tensorCount)/\(kvCount) exceeds what the file can hold"))
        }
        var meta: [String: GGUFValue] = [:]
        var keys: [String] = []
        for _ in 0..<Int(kvCount) {
            let key = try r.string()
            let tag = try r.u32()
            let value = try r.value(tag: tag, depth: 0, key: key)
            guard meta[key] == nil else {
                throw FormatError(file: file.path, problem: .invalid("duplicate metadata key '\(key)'"))
            }
            meta[key] = value
            keys.append(key)
        }
        metadata = meta
        metadataKeys = keys

        var align = 32
        if let a = meta["general.alignment"] {
            guard let v = a.int, v > 0, v & (v - 1) == 0 else {
                throw FormatError(file: file.path, problem: .invalid("general.alignment must be a power of two"))
            }
            align = v
        }
        alignment = align

        var infos: [GGUFTensorInfo] = []
        var index: [String: Int] = [:]
        for _ in 0..<Int(tensorCount) {
            let name = try r.string()
            let nDims = try r.u32()
            guard nDims >= 1, nDims <= UInt32(Self.maxDims) else {
                throw FormatError(file: file.path, tensor: name, problem: .invalid("has \(nDims) dimensions (1...\(Self.maxDims) allowed)"))
            }
            var dims: [Int] = []
            var count = 1
            for _ in 0..<Int(nDims) {
                let d = try r.u64()
                guard d <= UInt64(Int32.max) else {
                    throw FormatError(file: file.path, tensor: name, problem: .invalid("dimension \(d) is out of range"))
                }
                let (m, overflow) = count.multipliedReportingOverflow(by: Int(d))
                guard !overflow, m <= Int(Int64.max / 8) else {
                    throw FormatError(file: file.path, tensor: name, problem: .invalid("element count overflows"))
                }
                count = m
                dims.append(Int(d))
            }
            let type = try r.u32()
            let offset = try r.u64()
            guard offset <= UInt64(file.size) else {
                throw FormatError(
                    file: file.path, tensor: name,
                    problem: .truncated("data offset \(offset) is past the end of the \(file.size)-byte file"))
            }
            guard Int(offset) % align == 0 else {
                throw FormatError(file: file.path, tensor: name, problem: .invalid("data offset \(offset) is not aligned to \(align)"))
            }
            guard index[name] == nil else {
                throw FormatError(file: file.path, tensor: name, problem: .invalid("duplicate tensor name"))
            }
            index[name] = infos.count
            infos.append(GGUFTensorInfo(name: name, dims: dims, rawType: type, offset: Int(offset)))
        }
        tensors = infos
        tensorIndex = index
        dataOffset = (r.offset + align - 1) / align * align

        // Every tensor of a supported type must lie inside the file.
        for t in infos {
            guard let type = t.type else { continue }
            guard t.dims[0] % type.blockSize == 0 else {
                throw FormatError(
                    file: file.path, tensor: t.name,
                    problem: .invalid("row length \(t.dims[0]) is not a multiple of the \(type) block size \(type.blockSize)"))
            }
            let bytes = t.elementCount / type.blockSize * type.blockBytes
            guard dataOffset + t.offset + bytes <= file.size else {
                throw FormatError(
                    file: file.path, tensor: t.name,
                    problem: .truncated("data ends at byte \(dataOffset + t.offset + bytes) but the file has \(file.size)"))
            }
        }
    }

    public func info(_ name: String) -> GGUFTensorInfo? { tensorIndex[name].map { tensors[$0] } }

    /// Raw bytes of a tensor of a supported type.
    public func data(of t: GGUFTensorInfo) throws(FormatError) -> UnsafeRawPointer {
        guard t.type != nil else {
            throw FormatError(
                file: path, tensor: t.name,
                problem: .unsupportedType("GGML type \(t.rawType) (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)"))
        }
        return file.base + dataOffset + t.offset
    }

    /// A 2-D tensor as a weight matrix (rows = ne1, cols = ne0), checking its shape.
    public func matrix(_ name: String, rows: Int, cols: Int) throws(FormatError) -> WeightMatrix {
        guard let t = info(name) else { throw FormatError(file: path, tensor: name, problem: .missing("tensor")) }
        let shape = t.dims.count == 1 ? [t.dims[0], 1] : t.dims
        guard shape.count == 2 || shape.dropFirst(2).allSatisfy({ $0 == 1 }), shape[0] == cols, shape[1] == rows else {
            throw FormatError(file: path, tensor: name, problem: .invalid("shape \(t.dims) does not match the expected [\(cols), \(rows)]"))
        }
        let p = try data(of: t)
        return WeightMatrix(type: t.type!, rows: rows, cols: cols, data: p)
    }

    /// A 1-D tensor dequantized to floats, checking its length.
    public func vector(_ name: String, count: Int) throws(FormatError) -> [Float] {
        guard let t = info(name) else { throw FormatError(file: path, tensor: name, problem: .missing("tensor")) }
        guard t.elementCount == count else {
            throw FormatError(file: path, tensor: name, problem: .invalid("has \(t.elementCount) elements, expected \(count)"))
        }
        let p = try data(of: t)
        var out = [Float](repeating: 0, count: count)
        out.withUnsafeMutableBufferPointer { dequantize(t.type!, p, $0.baseAddress!, count: count) }
        return out
    }

    // MARK: metadata accessors with precise errors

    public func string(_ key: String) throws(FormatError) -> String {
        guard let v = metadata[key] else { throw FormatError(file: path, problem: .missing("metadata key '\(key)'")) }
        guard let s = v.string else { throw FormatError(file: path, problem: .invalid("metadata key '\(key)' is not a string")) }
        return s
    }

    public func int(_ key: String) throws(FormatError) -> Int {
        guard let v = metadata[key] else { throw FormatError(file: path, problem: .missing("metadata key '\(key)'")) }
        guard let i = v.int else { throw FormatError(file: path, problem: .invalid("metadata key '\(key)' is not an integer")) }
        return i
    }

    public func float(_ key: String) throws(FormatError) -> Double {
        guard let v = metadata[key] else { throw FormatError(file: path, problem: .missing("metadata key '\(key)'")) }
        guard let f = v.float else { throw FormatError(file: path, problem: .invalid("metadata key '\(key)' is not a number")) }
        return f
    }

    public func array(_ key: String) throws(FormatError) -> [GGUFValue] {
        guard let v = metadata[key] else { throw FormatError(file: path, problem: .missing("metadata key '\(key)'")) }
        guard let a = v.array else { throw FormatError(file: path, problem: .invalid("metadata key '\(key)' is not an array")) }
        return a
    }
}

/// A bounds-checked little-endian reader over a mapped file.
struct Cursor {
    let base: UnsafeRawPointer
    let size: Int
    let path: String
    var offset = 0

    init(base: UnsafeRawPointer, size: Int, path: String) {
        self.base = base
        self.size = size
        self.path = path
    }

    mutating func need(_ n: Int, _ what: String) throws(FormatError) {
        guard n >= 0, n <= size - offset else {
            throw FormatError(file: path, problem: .truncated("\(what) at byte \(offset) needs \(n) bytes, \(size - offset) remain"))
        }
    }

    mutating func load<T: FixedWidthInteger>(_: T.Type, _ what: String) throws(FormatError) -> T {
        try need(MemoryLayout<T>.size, what)
        let v = T(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
        offset += MemoryLayout<T>.size
        return v
    }

    mutating func u32() throws(FormatError) -> UInt32 { try load(UInt32.self, "u32") }
    mutating func u64() throws(FormatError) -> UInt64 { try load(UInt64.self, "u64") }

    mutating func string() throws(FormatError) -> String {
        let n = try u64()
        guard n <= UInt64(size - offset) else {
            throw FormatError(file: path, problem: .truncated("string of \(n) bytes at byte \(offset) runs past the end"))
        }
        let buf = UnsafeRawBufferPointer(start: base + offset, count: Int(n))
        offset += Int(n)
        // GGUF strings are UTF-8; invalid bytes become U+FFFD rather than failing the whole file.
        return String(decoding: buf, as: UTF8.self)
    }

    mutating func value(tag: UInt32, depth: Int, key: String) throws(FormatError) -> GGUFValue {
        switch tag {
        case 0: return .uint8(try load(UInt8.self, key))
        case 1: return .int8(try load(Int8.self, key))
        case 2: return .uint16(try load(UInt16.self, key))
        case 3: return .int16(try load(Int16.self, key))
        case 4: return .uint32(try load(UInt32.self, key))
        case 5: return .int32(try load(Int32.self, key))
        case 6: return .float32(Float(bitPattern: try load(UInt32.self, key)))
        case 7:
            let b = try load(UInt8.self, key)
            guard b <= 1 else { throw FormatError(file: path, problem: .invalid("metadata key '\(key)': bool byte \(b)")) }
            return .bool(b == 1)
        case 8: return .string(try string())
        case 9:
            guard depth == 0 else {
                throw FormatError(file: path, problem: .invalid("metadata key '\(key)': nested arrays are not supported"))
            }
            let elemTag = try u32()
            let count = try u64()
            guard count <= UInt64(size - offset) else {  // every element takes at least one byte
                throw FormatError(file: path, problem: .truncated("metadata key '\(key)': array of \(count) elements runs past the end"))
            }
            var items: [GGUFValue] = []
            items.reserveCapacity(Int(count))
            for _ in 0..<Int(count) { items.append(try value(tag: elemTag, depth: depth + 1, key: key)) }
            return .array(items)
        case 10: return .uint64(try load(UInt64.self, key))
        case 11: return .int64(try load(Int64.self, key))
        case 12: return .float64(Double(bitPattern: try load(UInt64.self, key)))
        default:
            throw FormatError(file: path, problem: .unsupportedType("metadata key '\(key)' has value type \(tag)"))
        }
    }
}
