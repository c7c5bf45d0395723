import Foundation
import VistKernels

/// A memory-mapped safetensors file (Hugging Face): u64 little-endian header length N, N bytes of
/// JSON `{"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
/// then the data, offsets relative to its start. Shapes are row-major, last dimension innermost.
/// Supported dtypes: F32, F16, BF16.
public final class SafetensorsFile: @unchecked Sendable {
    public struct Tensor: Sendable {
        public let name: String
        public let type: TensorType
        public let shape: [Int]
        public let begin: Int
        public let end: Int
        public var elementCount: Int { shape.reduce(1, *) }
    }

    public let file: MappedFile
    public let tensors: [String: Tensor]
    public let metadata: [String: String]
    public let dataOffset: Int
    public var path: String { file.path }

    /// Header sizes above this are refused before parsing (the format's own reference limit is 100 MB).
    static let maxHeader = 100 << 20

    public convenience init(path: String) throws(FormatError) {
        try self.init(file: MappedFile(path: path))
    }

    public init(file: MappedFile) throws(FormatError) {
        self.file = file
        let path = file.path
        guard file.size >= 8 else { throw FormatError(file: path, problem: .truncated("shorter than the 8-byte header length")) }
        let n = UInt64(littleEndian: file.base.loadUnaligned(as: UInt64.self))
        guard n >= 2, n <= UInt64(Self.maxHeader), n <= UInt64(file.size - 8) else {
            throw FormatError(file: path, problem: .truncated("header length \(n) does not fit the file of \(file.size) bytes"))
        }
        dataOffset = 8 + Int(n)
        let headerBytes = Data(bytes: file.base + 8, count: Int(n))
        guard let json = try? JSONSerialization.jsonObject(with: headerBytes), let obj = json as? [String: Any] else {
            throw FormatError(file: path, problem: .invalid("header is not a JSON object"))
        }
        let dataSize = file.size - dataOffset
        var out: [String: Tensor] = [:]
        var meta: [String: String] = [:]
        for (name, v) in obj {
            if name == "__metadata__" {
                guard let m = v as? [String: Any] else { throw FormatError(file: path, problem: .invalid("__metadata__ is not an object")) }
                for (k, s) in m {
                    guard let s = s as? String else {
                        throw FormatError(file: path, problem: .invalid("__metadata__['\(k)'] is not a string"))
                    }
                    meta[k] = s
                }
                continue
            }
            guard let t = v as? [String: Any], let dtype = t["dtype"] as? String, let shapeAny = t["shape"] as? [Any],
                let offs = t["data_offsets"] as? [Any], offs.count == 2
            else {
                throw FormatError(file: path, tensor: name, problem: .invalid("entry needs dtype, shape and data_offsets"))
            }
            let type: TensorType
            switch dtype {
            case "F32": type = .f32
            case "F16": type = .f16
            case "BF16": type = .bf16
            default: throw FormatError(file: path, tensor: name, problem: .unsupportedType("dtype \(dtype) (supported: F32, F16, BF16)"))
            }
            var shape: [Int] = []
            var count = 1
            for s in shapeAny {
                guard let d = (s as? NSNumber)?.intValue, d >= 0, d <= Int(Int32.max) else {
                    throw FormatError(file: path, tensor: name, problem: .invalid("bad shape \(shapeAny)"))
                }
                let (m, o) = count.multipliedReportingOverflow(by: d)
                guard !o, m <= dataSize else {
                    throw FormatError(file: path, tensor: name, problem: .invalid("shape \(shapeAny) is larger than the file"))
                }
                count = m
                shape.append(d)
            }
            guard let b = (offs[0] as? NSNumber)?.intValue, let e = (offs[1] as? NSNumber)?.intValue, 0 <= b, b <= e else {
                throw FormatError(file: path, tensor: name, problem: .invalid("bad data_offsets \(offs)"))
            }
            guard e <= dataSize else {
                throw FormatError(
                    file: path, tensor: name, problem: .truncated("data ends at \(e) but the data section has \(dataSize) bytes"))
            }
            guard e - b == count * type.blockBytes else {
                throw FormatError(
                    file: path, tensor: name,
                    problem: .invalid("data_offsets span \(e - b) bytes but shape \(shape) of \(dtype) needs \(count * type.blockBytes)"))
            }
            out[name] = Tensor(name: name, type: type, shape: shape, begin: b, end: e)
        }
        tensors = out
        metadata = meta
    }

    public func data(of t: Tensor) -> UnsafeRawPointer { file.base + dataOffset + t.begin }

    /// A 2-D tensor `[rows, cols]` as a weight matrix, checking its shape.
    public func matrix(_ name: String, rows: Int, cols: Int) throws(FormatError) -> WeightMatrix {
        guard let t = tensors[name] else { throw FormatError(file: path, tensor: name, problem: .missing("tensor")) }
        guard t.shape == [rows, cols] else {
            throw FormatError(
                file: path, tensor: name, problem: .invalid("shape \(t.shape) does not match the expected [\(rows), \(cols)]"))
        }
        return WeightMatrix(type: t.type, rows: rows, cols: cols, data: data(of: t))
    }

    /// A tensor of any shape as floats, checking its shape.
    public func floats(_ name: String, shape: [Int]) throws(FormatError) -> [Float] {
        guard let t = tensors[name] else { throw FormatError(file: path, tensor: name, problem: .missing("tensor")) }
        guard t.shape == shape else {
            throw FormatError(file: path, tensor: name, problem: .invalid("shape \(t.shape) does not match the expected \(shape)"))
        }
        var out = [Float](repeating: 0, count: t.elementCount)
        let p = data(of: t)
        out.withUnsafeMutableBufferPointer { dequantize(t.type, p, $0.baseAddress!, count: t.elementCount) }
        return out
    }
}
