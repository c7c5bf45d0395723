import Foundation
import Testing

@testable import VistFormats
@testable import VistKernels

func safetensorsBytes(header: String, data: [UInt8]) -> [UInt8] {
    var out: [UInt8] = []
    withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { out.append(contentsOf: $0) }
    out.append(contentsOf: header.utf8)
    out.append(contentsOf: data)
    return out
}

func floatBytes(_ xs: [Float]) -> [UInt8] {
    var out: [UInt8] = []
    for x in xs { withUnsafeBytes(of: x.bitPattern.littleEndian) { out.append(contentsOf: $0) } }
    return out
}

@Suite("safetensors reader")
struct SafetensorsTests {
    @Test("F32, F16 and BF16 tensors and metadata read back")
    func valid() throws {
        let dir = TempDir()
        var data = floatBytes([1, 2, 3, 4, 5, 6])
        let f16: [UInt16] = [0x3C00, 0xC000]  // 1, -2
        for h in f16 { data.append(UInt8(h & 0xff)); data.append(UInt8(h >> 8)) }
        let bf16: [UInt16] = [0x3F80, 0x4040]  // 1, 3
        for h in bf16 { data.append(UInt8(h & 0xff)); data.append(UInt8(h >> 8)) }
        let header = """
            {"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},\
            "h":{"dtype":"F16","shape":[2],"data_offsets":[24,28]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[28,32]}}
            """
        let f = try SafetensorsFile(path: dir.write("m.safetensors", safetensorsBytes(header: header, data: data)))
        #expect(f.metadata["format"] == "pt")
        let m = try f.matrix("w", rows: 2, cols: 3)
        #expect(m.type == .f32 && m.rows == 2)
        #expect(try f.floats("w", shape: [2, 3]) == [1, 2, 3, 4, 5, 6])
        #expect(try f.floats("h", shape: [2]) == [1, -2])
        #expect(try f.floats("b", shape: [2]) == [1, 3])
        do {
            _ = try f.floats("w", shape: [3, 2])
            Issue.record("wrong shape accepted")
        } catch {
            #expect(error.tensor == "w")
        }
    }

    @Test("Damaged files give errors that name the tensor or the header")
    func damaged() {
        let dir = TempDir()
        let data = floatBytes([1, 2])
        func check(_ name: String, _ bytes: [UInt8], tensor: String?, code: String) {
            do {
                _ = try SafetensorsFile(path: dir.write(name, bytes))
                Issue.record("\(name) accepted")
            } catch {
                #expect(error.tensor == tensor, "\(name): \(error)")
                #expect(error.code == code, "\(name): \(error)")
            }
        }
        check("short", [1, 2, 3], tensor: nil, code: "truncated")
        check(
            "hugeheader", safetensorsBytes(header: "{}", data: []).enumerated().map { $0.offset == 7 ? 0x7f : $0.element }, tensor: nil,
            code: "truncated")
        check("notjson", safetensorsBytes(header: "{nope", data: data), tensor: nil, code: "invalid")
        check(
            "dtype", safetensorsBytes(header: #"{"t":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, data: data), tensor: "t",
            code: "unsupported_type")
        check(
            "span", safetensorsBytes(header: #"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: data), tensor: "t",
            code: "invalid")
        check(
            "past", safetensorsBytes(header: #"{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, data: data), tensor: "t",
            code: "truncated")
        check(
            "shape", safetensorsBytes(header: #"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#, data: data), tensor: "t",
            code: "invalid")
        check("fields", safetensorsBytes(header: #"{"t":{"dtype":"F32"}}"#, data: data), tensor: "t", code: "invalid")
    }
}
