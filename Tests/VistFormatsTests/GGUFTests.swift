import Foundation
import Testing
import VistTestSupport

@testable import VistFormats
@testable import VistKernels

/// A scratch directory removed at deinit.
final class TempDir {
    let url: URL
    init() {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-test-\(UUID().uuidString)")
        try! FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(at: url) }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    func write(_ name: String, _ bytes: [UInt8]) -> String {
        let p = path(name)
        _ = FileManager.default.createFile(atPath: p, contents: Data(bytes))
        return p
    }
}

func sampleGGUF() -> GGUFWriter {
    var w = GGUFWriter()
    w.add("general.architecture", .string("llama"))
    w.add("u8", .uint8(200))
    w.add("i8", .int8(-5))
    w.add("u16", .uint16(65000))
    w.add("i16", .int16(-300))
    w.add("u32", .uint32(4_000_000_000))
    w.add("i32", .int32(-2_000_000))
    w.add("f32", .float32(1.5))
    w.add("bool", .bool(true))
    w.add("u64", .uint64(1 << 40))
    w.add("i64", .int64(-(1 << 40)))
    w.add("f64", .float64(2.25))
    w.add("strings", .array([.string("a"), .string("héllo"), .string("")]))
    w.add("ints", .array([.int32(1), .int32(-2)]))
    w.add(tensor: "matrix", dims: [32, 3], floats: (0..<96).map { Float($0) })
    w.add(tensor: "vector", dims: [5], floats: [1, 2, 3, 4, 5])
    // A Q8_0 tensor: one block of d = 0.5 (0x3800) and q = 0...31.
    var q8: [UInt8] = [0x00, 0x38]
    q8.append(contentsOf: (0..<32).map { UInt8($0) })
    w.tensors.append(.init(name: "q8", dims: [32], rawType: 8, data: q8))
    // A Q6_K tensor (type 14) this engine does not support.
    w.tensors.append(.init(name: "k_quant", dims: [256], rawType: 14, data: [UInt8](repeating: 0, count: 210)))
    return w
}

@Suite("GGUF reader")
struct GGUFTests {
    @Test("Every metadata value type, tensor infos and tensor data read back")
    func roundTrip() throws {
        let dir = TempDir()
        let path = dir.write("m.gguf", sampleGGUF().serialize())
        let g = try GGUFFile(path: path)
        #expect(g.version == 3)
        #expect(g.metadata["u8"] == .uint8(200))
        #expect(g.metadata["i8"] == .int8(-5))
        #expect(g.metadata["u16"] == .uint16(65000))
        #expect(g.metadata["i16"] == .int16(-300))
        #expect(g.metadata["u32"] == .uint32(4_000_000_000))
        #expect(g.metadata["i32"] == .int32(-2_000_000))
        #expect(g.metadata["f32"] == .float32(1.5))
        #expect(g.metadata["bool"] == .bool(true))
        #expect(g.metadata["u64"] == .uint64(1 << 40))
        #expect(g.metadata["i64"] == .int64(-(1 << 40)))
        #expect(g.metadata["f64"] == .float64(2.25))
        #expect(g.metadata["strings"] == .array([.string("a"), .string("héllo"), .string("")]))
        #expect(g.metadata["ints"] == .array([.int32(1), .int32(-2)]))
        #expect(throws: FormatError.self) { try g.int("ints") }
        #expect(throws: FormatError.self) { try g.int("strings") }
        #expect(g.metadataKeys.first == "general.architecture")
        let m = try g.matrix("matrix", rows: 3, cols: 32)
        #expect(Reference.dequantizeRow(m, 2) == (64..<96).map { Float($0) })
        #expect(try g.vector("vector", count: 5) == [1, 2, 3, 4, 5])
        #expect(try g.vector("q8", count: 32) == (0..<32).map { Float($0) * 0.5 })
    }

    @Test("Wrong shapes, missing and unsupported tensors name the tensor")
    func tensorErrors() throws {
        let dir = TempDir()
        let g = try GGUFFile(path: dir.write("m.gguf", sampleGGUF().serialize()))
        do {
            _ = try g.matrix("matrix", rows: 4, cols: 32)
            Issue.record("shape mismatch accepted")
        } catch {
            #expect(error.tensor == "matrix")
            #expect(error.description.contains("shape"))
        }
        do {
            _ = try g.vector("nope", count: 1)
            Issue.record("missing tensor accepted")
        } catch {
            #expect(error.tensor == "nope" && error.code == "missing")
        }
        do {
            _ = try g.vector("k_quant", count: 256)
            Issue.record("unsupported type accepted")
        } catch {
            #expect(error.tensor == "k_quant" && error.code == "unsupported_type")
            #expect(error.description.contains("m.gguf"))
        }
    }

    @Test("Every truncation of a valid file is an error, never a crash")
    func truncations() throws {
        let dir = TempDir()
        let bytes = sampleGGUF().serialize()
        // The last tensor's data may be cut without touching the header; everything else must fail.
        for n in stride(from: 0, to: bytes.count, by: 1) {
            let p = dir.write("t.gguf", Array(bytes[0..<n]))
            do {
                let g = try GGUFFile(path: p)
                // Accepted only if all supported tensors still fit.
                for t in g.tensors where t.type != nil { _ = try g.data(of: t) }
                #expect(n >= bytes.count - 256, "a file cut at \(n) of \(bytes.count) bytes was accepted")
            } catch {
                #expect(error.file == p)
            }
        }
    }

    @Test("Bad magic, versions, counts, dims and offsets are refused with a clear problem")
    func corruptHeaders() throws {
        let dir = TempDir()
        var bytes = sampleGGUF().serialize()
        var bad = bytes
        bad[0] = UInt8(ascii: "X")
        #expect(throws: FormatError(file: dir.path("a"), problem: .badMagic("not a GGUF file (bad magic)"))) {
            try GGUFFile(path: dir.write("a", bad))
        }
        bad = bytes
        bad[4] = 9
        #expect(throws: FormatError(file: dir.path("b"), problem: .unsupportedVersion(9))) { try GGUFFile(path: dir.write("b", bad)) }
        bad = bytes
        bad[8...15] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][...]  // absurd tensor count
        #expect(throws: FormatError.self) { try GGUFFile(path: dir.write("c", bad)) }
        bad = bytes
        bad[16...23] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][...]  // absurd kv count
        #expect(throws: FormatError.self) { try GGUFFile(path: dir.write("d", bad)) }
        #expect(throws: FormatError.self) { try GGUFFile(path: dir.write("e", [])) }
        #expect(throws: FormatError.self) { try GGUFFile(path: dir.path("does-not-exist")) }
        #expect(throws: FormatError.self) { try GGUFFile(path: dir.url.path) }  // a directory

        // A tensor whose data would run past the end of the file names that tensor.
        var w = GGUFWriter()
        w.add(tensor: "big", dims: [32, 4], floats: [Float](repeating: 1, count: 128))
        bytes = w.serialize()
        do {
            _ = try GGUFFile(path: dir.write("f", Array(bytes.dropLast(64))))
            Issue.record("truncated tensor data accepted")
        } catch {
            #expect(error.tensor == "big" && error.code == "truncated")
        }
        // Five dimensions.
        w = GGUFWriter()
        w.add(tensor: "t", dims: [1, 1, 1, 1, 1], floats: [1])
        do {
            _ = try GGUFFile(path: dir.write("g", w.serialize()))
            Issue.record("5-D tensor accepted")
        } catch {
            #expect(error.tensor == "t")
        }
        // Misaligned offset: patch the offset of the second tensor to 1.
        w = GGUFWriter()
        w.add(tensor: "a", dims: [1], floats: [1])
        w.add(tensor: "b", dims: [1], floats: [2])
        bytes = w.serialize()
        // Header 24 bytes; tensor a: 8+1 name, 4 ndims, 8 dim, 4 type, 8 offset = 33; b's offset is the last 8 bytes of its info.
        let bOffsetAt = 24 + 33 + 33 - 8
        bytes[bOffsetAt] = 1
        do {
            _ = try GGUFFile(path: dir.write("h", bytes))
            Issue.record("misaligned offset accepted")
        } catch {
            #expect(error.tensor == "b")
        }
    }

    @Test("Random byte flips in the header never crash the reader")
    func fuzzHeader() {
        let dir = TempDir()
        let bytes = sampleGGUF().serialize()
        var rng = SystemRandomNumberGenerator()
        for i in 0..<300 {
            var b = bytes
            for _ in 0..<3 {
                let at = Int.random(in: 0..<min(600, b.count), using: &rng)
                b[at] = UInt8.random(in: 0...255, using: &rng)
            }
            let p = dir.write("z\(i % 4)", b)
            if let g = try? GGUFFile(path: p) {
                for t in g.tensors where t.type != nil { _ = try? g.vector(t.name, count: t.elementCount) }
            }
        }
    }
}
