import Foundation

/// Writes a safetensors file (the layout `SafetensorsFile` reads) with F32 tensors, streaming
/// each tensor to disk as it is added so a whole checkpoint never sits in memory twice. The
/// header is written first, so every tensor's name and shape must be declared up front.
public struct SafetensorsWriter {
    public struct Entry: Sendable {
        public var name: String
        public var shape: [Int]
        public init(name: String, shape: [Int]) {
            self.name = name
            self.shape = shape
        }
        var count: Int { shape.reduce(1, *) }
    }

    let entries: [Entry]
    let handle: FileHandle
    let path: String
    var next = 0

    /// Creates `path` (replacing it) and writes the header for `entries` in this order.
    public init(path: String, entries: [Entry], metadata: [String: String] = [:]) throws(FormatError) {
        var seen = Set<String>()
        for e in entries {
            guard !e.name.isEmpty, e.name != "__metadata__", seen.insert(e.name).inserted else {
                throw FormatError(file: path, problem: .invalid("tensor name '\(e.name)' is empty, reserved or repeated"))
            }
            guard e.shape.allSatisfy({ $0 >= 0 }) else {
                throw FormatError(file: path, problem: .invalid("negative dimension in \(e.name)"))
            }
        }
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var offset = 0
        for e in entries {
            header[e.name] = ["dtype": "F32", "shape": e.shape, "data_offsets": [offset, offset + 4 * e.count]] as [String: Any]
            offset += 4 * e.count
        }
        guard var json = try? JSONSerialization.data(withJSONObject: header, options: [.sortedKeys]) else {
            throw FormatError(file: path, problem: .invalid("cannot encode the header"))
        }
        // Pad the header with spaces so the data starts 8-byte aligned (the format allows it).
        while (8 + json.count) % 8 != 0 { json.append(0x20) }
        guard FileManager.default.createFile(atPath: path, contents: nil), let h = FileHandle(forWritingAtPath: path) else {
            throw FormatError(file: path, problem: .io("cannot create"))
        }
        self.handle = h
        self.path = path
        self.entries = entries
        var len = UInt64(json.count).littleEndian
        do {
            try h.write(contentsOf: Data(bytes: &len, count: 8))
            try h.write(contentsOf: json)
        } catch {
            throw FormatError(file: path, problem: .io("cannot write: \(error.localizedDescription)"))
        }
    }

    /// Writes the next declared tensor; `values` must have exactly its element count.
    public mutating func write(_ values: [Float]) throws(FormatError) {
        guard next < entries.count else { throw FormatError(file: path, problem: .invalid("more tensors written than declared")) }
        let e = entries[next]
        guard values.count == e.count else {
            throw FormatError(file: path, tensor: e.name, problem: .invalid("\(values.count) values for shape \(e.shape)"))
        }
        do {
            try values.withUnsafeBufferPointer { try handle.write(contentsOf: Data(buffer: $0)) }
        } catch {
            throw FormatError(file: path, tensor: e.name, problem: .io("cannot write: \(error.localizedDescription)"))
        }
        next += 1
    }

    /// Checks that every declared tensor was written, flushes and closes.
    public func finish() throws(FormatError) {
        defer { try? handle.close() }
        guard next == entries.count else {
            throw FormatError(file: path, problem: .invalid("only \(next) of \(entries.count) declared tensors were written"))
        }
        do { try handle.synchronize() } catch { throw FormatError(file: path, problem: .io("cannot sync: \(error.localizedDescription)")) }
    }
}
