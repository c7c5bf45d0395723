import ArgumentParser
import Foundation
import VistEngine
import VistRender

/// `vist2ctl dataset`: training examples from a corpus, through the engine's own chunker,
/// tokenizer and renderer (the layout: VistRender's `DatasetWriter`).
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
            Chunks are written in document order; --max-chunks stops after that many. \
            With --text-only the chunks are cut and tokenized but not rendered (no images, no \
            cells, "text_only": true): a compact corpus that `vist2-render dataset` renders \
            where there is no Swift toolchain, into exactly the files this command writes.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .long, help: "Output directory (created if missing; its files are replaced).")
    var out: String

    @Option(name: .long, help: "Stop after this many chunks (0 = the whole corpus).")
    var maxChunks = 0

    @Flag(help: "Cut and tokenize only; render later with vist2-render.")
    var textOnly = false

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

    func run() throws {
        try Output(json: json).run {
            let model = try modelOptions.loadVIST2()
            guard let input = FileHandle(forReadingAtPath: corpus) else { throw EngineError.io("cannot read \(corpus)") }
            func rendering<T>(_ body: () throws(RenderError) -> T) throws(EngineError) -> T {
                do { return try body() } catch { throw EngineError.io(error.description) }
            }
            let writer = try rendering { () throws(RenderError) in
                try DatasetWriter(directory: out, renderer: textOnly ? nil : model.renderer)
            }
            var nDocs = 0
            try forEachLine(of: input) { lineData, lineNo in
                if lineData.allSatisfy({ $0 == 0x20 || $0 == 0x0D }) { return true }
                guard let line = try? JSONDecoder().decode(Line.self, from: lineData) else {
                    throw EngineError.badArgument("\(corpus):\(lineNo): not a JSON object with string fields \"id\" and \"text\"")
                }
                nDocs += 1
                for (i, c) in model.chunker.chunks(line.text).enumerated() {
                    let ids = model.language.tokenizer.encode(String(c.text), addSpecial: false)
                    try rendering { () throws(RenderError) in try writer.add(doc: line.id, index: i, tokens: ids, text: c.text) }
                    if maxChunks > 0 && writer.chunks >= maxChunks { return false }
                }
                return true
            }
            let meta = try rendering { () throws(RenderError) in
                try writer.finish(
                    documents: nDocs, render: model.config.render, modelFingerprint: model.fingerprint, chunkLength: model.chunkLength,
                    visualTokens: model.visualTokens)
            }
            if json {
                printJSON(meta)
            } else {
                print("\(meta.chunks) chunks (\(meta.tokens) tokens) from \(nDocs) documents -> \(out)/\(textOnly ? " (text only)" : "")")
            }
        }
    }
}
