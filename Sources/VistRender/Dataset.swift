import Foundation

/// The training examples' directory (Training/vist2/data.py reads it): `chunks.jsonl`, one
/// `DatasetRecord` per chunk in document order; `images.u8`, each chunk's sketch image as
/// height x width gray bytes (255 = paper); `meta.json`, a `DatasetMeta`.
///
/// A directory can also be *text only* (`vist2ctl dataset --text-only`): the records without
/// cells, no images, and `"text_only": true` in meta.json. It is the compact form a training
/// machine receives; `vist2-render dataset` renders it there into the full form, byte for byte
/// what `vist2ctl dataset` writes.
public struct DatasetRecord: Codable, Sendable, Equatable {
    public var doc: String
    public var index: Int
    public var tokens: [Int32]
    public var text: String
    /// Every drawn character's cell as [scalar index, x, y, advance] quadruples, flattened: left
    /// and top edge in canvas pixels and width; the height is the line height. Absent in a
    /// text-only directory.
    public var cells: [Int]?

    public init(doc: String, index: Int, tokens: [Int32], text: String, cells: [Int]? = nil) {
        self.doc = doc
        self.index = index
        self.tokens = tokens
        self.text = text
        self.cells = cells
    }
}

public struct DatasetMeta: Codable, Sendable, Equatable {
    public var chunks: Int
    public var documents: Int
    public var tokens: Int
    public var height: Int
    public var width: Int
    public var lineHeight: Int
    public var margin: Int
    /// The tile size of a tiled layout (the page is the canvas when absent).
    public var tile: Int?
    public var modelFingerprint: String
    public var chunkLength: Int
    public var visualTokens: Int
    /// True for a text-only directory (no images, no cells); absent once rendered.
    public var textOnly: Bool?

    enum CodingKeys: String, CodingKey {
        case chunks, documents, tokens, height, width, margin, tile
        case lineHeight = "line_height"
        case modelFingerprint = "model_fingerprint"
        case chunkLength = "chunk_length"
        case visualTokens = "visual_tokens"
        case textOnly = "text_only"
    }

    /// Whether the images were (or will be) made with this geometry.
    public func matches(_ r: RenderConfig) -> Bool {
        height == r.height && width == r.width && lineHeight == r.lineHeight && margin == r.margin && tile == r.tile
    }
}

/// Writes a dataset directory chunk by chunk. With a renderer each chunk is rendered (image and
/// cells); without one the directory is text only. The files are written under `.partial` names
/// and take their places only in `finish`: a run that fails (a bad corpus line, a full disk)
/// leaves a dataset already in the directory as it was.
public final class DatasetWriter {
    public let directory: String
    let renderer: SketchRenderer?
    let images: FileHandle?
    let records: FileHandle
    let encoder: JSONEncoder
    public private(set) var chunks = 0
    public private(set) var tokens = 0
    var finished = false
    static let partial = ".partial"

    public init(directory: String, renderer: SketchRenderer?) throws(RenderError) {
        self.directory = directory
        self.renderer = renderer
        let fm = FileManager.default
        do { try fm.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw .io("cannot create \(directory): \(error.localizedDescription)")
        }
        func create(_ name: String) throws(RenderError) -> FileHandle {
            let p = directory + "/" + name + Self.partial
            guard fm.createFile(atPath: p, contents: nil), let h = FileHandle(forWritingAtPath: p) else { throw .io("cannot write \(p)") }
            return h
        }
        images = renderer == nil ? nil : try create("images.u8")
        records = try create("chunks.jsonl")
        encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    }

    private func write(_ h: FileHandle, _ d: Data) throws(RenderError) {
        do { try h.write(contentsOf: d) } catch { throw .io("cannot write to \(directory): \(error.localizedDescription)") }
    }

    /// One chunk: its text and token ids; rendered here when the writer has a renderer.
    public func add(doc: String, index: Int, tokens ids: [Int32], text: Substring) throws(RenderError) {
        var record = DatasetRecord(doc: doc, index: index, tokens: ids, text: String(text))
        if let renderer, let images {
            try write(images, Data(renderer.render(text).image.pixels))
            var cells: [Int] = []
            for p in renderer.placements(text) { cells += [p.scalar, p.x, p.y, p.advance] }
            record.cells = cells
        }
        guard var line = try? encoder.encode(record) else { throw .io("cannot encode the record of \(doc) chunk \(index)") }
        line.append(0x0A)
        try write(records, line)
        chunks += 1
        tokens += ids.count
    }

    deinit {
        guard !finished else { return }
        try? images?.close()
        try? records.close()
        for name in ["images.u8", "chunks.jsonl"] { try? FileManager.default.removeItem(atPath: directory + "/" + name + Self.partial) }
    }

    /// Puts a `.partial` file in its place (rename(2) replaces the old one atomically).
    func install(_ name: String) throws(RenderError) {
        let p = directory + "/" + name
        guard rename(p + Self.partial, p) == 0 else { throw .io("cannot move \(p + Self.partial) to \(p)") }
    }

    /// Closes the files, puts them in place and writes meta.json with the counts, `render`'s
    /// geometry and the model's identity.
    @discardableResult
    public func finish(
        documents: Int, render r: RenderConfig, modelFingerprint: String, chunkLength: Int, visualTokens: Int
    ) throws(RenderError) -> DatasetMeta {
        finished = true
        try? images?.close()
        try? records.close()
        let meta = DatasetMeta(
            chunks: chunks, documents: documents, tokens: tokens, height: r.height, width: r.width, lineHeight: r.lineHeight,
            margin: r.margin, tile: r.tile, modelFingerprint: modelFingerprint, chunkLength: chunkLength, visualTokens: visualTokens,
            textOnly: renderer == nil ? true : nil)
        // meta.json goes last: the files it describes are in place before it says so. A directory
        // rendered before and now written text only must not keep stale images.
        try? FileManager.default.removeItem(atPath: directory + "/meta.json")
        if images != nil { try install("images.u8") } else { try? FileManager.default.removeItem(atPath: directory + "/images.u8") }
        try install("chunks.jsonl")
        guard let data = try? encoder.encode(meta),
            FileManager.default.createFile(atPath: directory + "/meta.json" + Self.partial, contents: data)
        else {
            throw .io("cannot write \(directory)/meta.json")
        }
        try install("meta.json")
        return meta
    }
}

/// Calls `body` with each line of `handle` (without its newline) and the line's number from 1,
/// reading a megabyte at a time; an unfinished last line is a line too. `body` returns false to
/// stop early. (The JSONL files of a corpus and of a dataset.)
public func forEachLine(of handle: FileHandle, _ body: (Data, Int) throws -> Bool) rethrows {
    var pending = Data()
    var lineNo = 0
    while true {
        let block = handle.readData(ofLength: 1 << 20)
        pending.append(block)
        // Whole lines of this block; an unfinished last line waits for the next block (or ends
        // the input). The rest is kept once per block, not once per line.
        var start = pending.startIndex
        while start < pending.endIndex {
            let nl = pending[start...].firstIndex(of: 0x0A)
            if nl == nil && !block.isEmpty { break }
            let line = pending[start..<(nl ?? pending.endIndex)]
            start = nl.map { $0 + 1 } ?? pending.endIndex
            lineNo += 1
            if try !body(line, lineNo) { return }
        }
        pending = Data(pending[start...])
        if block.isEmpty { return }
    }
}
