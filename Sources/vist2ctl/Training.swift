import ArgumentParser
import Foundation
import VistEngine
import VistFormats
import VistRender

/// `vist2ctl export-backbone`: the backbone as the engine sees it, for the training code.
struct ExportBackbone: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-backbone",
        abstract: "Write a model's decoder as a Hugging Face directory of F32 weights, dequantized by the engine.",
        discussion: """
            The training code (Training/) freezes the backbone; it loads this directory so that it \
            trains against exactly the weights the engine multiplies with (a quantized GGUF is \
            dequantized by the engine's own kernels). For a VIST2 model directory the backbone it \
            names is exported. Writes OUT/config.json and OUT/model.safetensors.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Flag(help: "Print one JSON object with what was written.")
    var json = false

    @Argument(help: "Output directory (created if missing).")
    var out: String

    func run() throws {
        try runReportingErrors(json: json) {
            // A VIST2 model directory's backbone, without its vision encoder or adapter.
            let lm = try modelOptions.loadBackbone()
            let written = Result { () throws(FormatError) in try lm.weights.exportHuggingFace(to: URL(fileURLWithPath: out)) }
            if case .failure(let e) = written { throw EngineError.format(e) }
            let c = lm.config
            if json {
                printJSON(["out": out, "source": lm.source.path, "architecture": c.architecture.rawValue, "layers": "\(c.layers)"])
            } else {
                print(
                    "wrote \(out)/config.json and \(out)/model.safetensors (\(c.architecture.rawValue), \(c.layers) layers) from \(lm.source.path)"
                )
            }
        }
    }
}

/// `vist2ctl dataset`: training examples from a corpus, through the engine's own chunker,
/// tokenizer and renderer.
struct Dataset: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Cut a JSONL corpus into a VIST2 model's chunks and render them, for the training code.",
        discussion: """
            Reads CORPUS, one JSON object per line with "id" and "text" (Training/build_corpus.py \
            writes this), cuts each text with the model's chunker and writes to OUT: \
            images.u8 (each chunk's sketch image, height x width gray bytes, 255 = paper; the \
            vision encoder reads x/127.5 - 1), chunks.jsonl (per chunk: doc, index, token ids, \
            text, and the cell of every drawn character as [scalar index, x, y, advance] \
            quadruples flattened: left and top edge in canvas pixels and width; the height is \
            the line height) and meta.json (geometry, counts, the model fingerprint). \
            Chunks are written in document order; --max-chunks stops after that many.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .long, help: "Output directory (created if missing; its files are replaced).")
    var out: String

    @Option(name: .long, help: "Stop after this many chunks (0 = the whole corpus).")
    var maxChunks = 0

    @Flag(help: "Print one JSON object with the counts.")
    var json = false

    @Argument(help: "The corpus (JSONL).")
    var corpus: String

    func validate() throws {
        guard maxChunks >= 0 else { throw ValidationError("--max-chunks must be >= 0") }
    }

    struct Line: Decodable {
        var id: String
        var text: String
    }

    struct Record: Encodable {
        var doc: String
        var index: Int
        var tokens: [Int32]
        var text: String
        var cells: [Int]
    }

    struct Meta: Encodable {
        var chunks: Int
        var documents: Int
        var tokens: Int
        var height: Int
        var width: Int
        var line_height: Int
        var margin: Int
        /// The tile size of a tiled layout (the page is the canvas when absent).
        var tile: Int?
        var model_fingerprint: String
        var chunk_length: Int
        var visual_tokens: Int
    }

    func run() throws {
        try runReportingErrors(json: json) {
            let model = try modelOptions.loadVIST2()
            let fm = FileManager.default
            do { try fm.createDirectory(atPath: out, withIntermediateDirectories: true) } catch {
                throw EngineError.io("cannot create \(out): \(error.localizedDescription)")
            }
            guard let input = FileHandle(forReadingAtPath: corpus) else { throw EngineError.io("cannot read \(corpus)") }
            func create(_ name: String) throws(EngineError) -> FileHandle {
                let p = out + "/" + name
                guard fm.createFile(atPath: p, contents: nil), let h = FileHandle(forWritingAtPath: p) else {
                    throw EngineError.io("cannot write \(p)")
                }
                return h
            }
            let images = try create("images.u8")
            let records = try create("chunks.jsonl")
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            var nChunks = 0, nDocs = 0, nTokens = 0, lineNo = 0
            var pending = Data()
            func write(_ h: FileHandle, _ d: Data) throws(EngineError) {
                do { try h.write(contentsOf: d) } catch { throw EngineError.io("cannot write to \(out): \(error.localizedDescription)") }
            }
            reading: while true {
                let block = input.readData(ofLength: 1 << 20)
                pending.append(block)
                // Whole lines of this block; an unfinished last line waits for the next block
                // (or ends the input). The rest is kept once per block, not once per line.
                var start = pending.startIndex
                while start < pending.endIndex {
                    let nl = pending[start...].firstIndex(of: 0x0A)
                    if nl == nil && !block.isEmpty { break }
                    let lineData = pending[start..<(nl ?? pending.endIndex)]
                    start = nl.map { $0 + 1 } ?? pending.endIndex
                    lineNo += 1
                    if lineData.allSatisfy({ $0 == 0x20 || $0 == 0x0D }) { continue }
                    guard let line = try? JSONDecoder().decode(Line.self, from: lineData) else {
                        throw EngineError.badArgument("\(corpus):\(lineNo): not a JSON object with string fields \"id\" and \"text\"")
                    }
                    nDocs += 1
                    for (i, c) in model.chunker.chunks(line.text).enumerated() {
                        let img = model.renderer.render(c.text).image
                        let ids = model.language.tokenizer.encode(String(c.text), addSpecial: false)
                        var cells: [Int] = []
                        for p in model.renderer.placements(c.text) { cells += [p.scalar, p.x, p.y, p.advance] }
                        try write(images, Data(img.pixels))
                        var rec =
                            (try? enc.encode(Record(doc: line.id, index: i, tokens: ids, text: String(c.text), cells: cells))) ?? Data()
                        rec.append(0x0A)
                        try write(records, rec)
                        nChunks += 1
                        nTokens += ids.count
                        if maxChunks > 0 && nChunks >= maxChunks { break reading }
                    }
                }
                pending = Data(pending[start...])
                if block.isEmpty { break }
            }
            try? images.close()
            try? records.close()
            let r = model.config.render
            let meta = Meta(
                chunks: nChunks, documents: nDocs, tokens: nTokens, height: r.height, width: r.width, line_height: r.lineHeight,
                margin: r.margin, tile: r.tile, model_fingerprint: model.fingerprint, chunk_length: model.chunkLength,
                visual_tokens: model.visualTokens)
            guard fm.createFile(atPath: out + "/meta.json", contents: (try? enc.encode(meta)) ?? Data()) else {
                throw EngineError.io("cannot write \(out)/meta.json")
            }
            if json {
                printJSON(meta)
            } else {
                print("\(nChunks) chunks (\(nTokens) tokens) from \(nDocs) documents -> \(out)/")
            }
        }
    }
}
