import Foundation

/// Writes GGUF v3 files (the layout `GGUFFile` reads): for test models and tools that derive a
/// GGUF from other checkpoints. Tensor data must already be in its on-disk element format.
public struct GGUFWriter {
    public struct Tensor {
        public var name: String
        /// Dimensions innermost first (ne0 = row length).
        public var dims: [Int]
        public var rawType: UInt32
        public var data: [UInt8]

        public init(name: String, dims: [Int], rawType: UInt32, data: [UInt8]) {
            self.name = name
            self.dims = dims
            self.rawType = rawType
            self.data = data
        }
    }

    public var metadata: [(String, GGUFValue)] = []
    public var tensors: [Tensor] = []
    public var alignment = 32

    public init() {}

    public mutating func add(_ key: String, _ value: GGUFValue) { metadata.append((key, value)) }

    public mutating func add(tensor name: String, dims: [Int], floats: [Float]) {
        var bytes = [UInt8]()
        bytes.reserveCapacity(floats.count * 4)
        for f in floats { withUnsafeBytes(of: f.bitPattern.littleEndian) { bytes.append(contentsOf: $0) } }
        tensors.append(Tensor(name: name, dims: dims, rawType: 0, data: bytes))
    }

    /// The file's bytes.
    public func serialize() -> [UInt8] {
        var out: [UInt8] = []
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        func str(_ s: String) {
            u64(UInt64(s.utf8.count))
            out.append(contentsOf: s.utf8)
        }
        func tag(_ v: GGUFValue) -> UInt32 {
            switch v {
            case .uint8: return 0
            case .int8: return 1
            case .uint16: return 2
            case .int16: return 3
            case .uint32: return 4
            case .int32: return 5
            case .float32: return 6
            case .bool: return 7
            case .string: return 8
            case .array: return 9
            case .uint64: return 10
            case .int64: return 11
            case .float64: return 12
            }
        }
        func value(_ v: GGUFValue) {
            switch v {
            case .uint8(let x): out.append(x)
            case .int8(let x): out.append(UInt8(bitPattern: x))
            case .uint16(let x): withUnsafeBytes(of: x.littleEndian) { out.append(contentsOf: $0) }
            case .int16(let x): withUnsafeBytes(of: x.littleEndian) { out.append(contentsOf: $0) }
            case .uint32(let x): u32(x)
            case .int32(let x): u32(UInt32(bitPattern: x))
            case .float32(let x): u32(x.bitPattern)
            case .bool(let x): out.append(x ? 1 : 0)
            case .string(let s): str(s)
            case .array(let items):
                u32(items.first.map(tag) ?? 4)
                u64(UInt64(items.count))
                for i in items { value(i) }
            case .uint64(let x): u64(x)
            case .int64(let x): u64(UInt64(bitPattern: x))
            case .float64(let x): u64(x.bitPattern)
            }
        }
        out.append(contentsOf: Array("GGUF".utf8))
        u32(3)
        u64(UInt64(tensors.count))
        u64(UInt64(metadata.count))
        for (k, v) in metadata {
            str(k)
            u32(tag(v))
            value(v)
        }
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            offsets.append(offset)
            offset += (t.data.count + alignment - 1) / alignment * alignment
        }
        for (t, off) in zip(tensors, offsets) {
            str(t.name)
            u32(UInt32(t.dims.count))
            for d in t.dims { u64(UInt64(d)) }
            u32(t.rawType)
            u64(UInt64(off))
        }
        while out.count % alignment != 0 { out.append(0) }
        for t in tensors {
            out.append(contentsOf: t.data)
            while (out.count) % alignment != 0 { out.append(0) }
        }
        return out
    }

    public func write(to path: String) throws {
        try Data(serialize()).write(to: URL(fileURLWithPath: path))
    }
}
