import ArgumentParser
import Foundation
import VistEngine
import VistRender

struct Render: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Render a document into the sketch images a VIST2 model reads.",
        discussion: """
            Cuts FILE into chunks with the model's chunker and writes chunk-NNN.png for each, plus \
            contact-sheet.png and chunks.json (texts, token counts, rows, missing glyphs). With \
            --raw it also writes chunk-NNN.f32: the normalised pixels (x/127.5 - 1, float32 \
            little-endian, height x width) exactly as the vision encoder reads them, for the \
            training code. The daemon renders with the model it holds; --local renders in this \
            process with --model (the images are the same: PNG is lossless).
            """)

    @OptionGroup var target: BackendOptions

    @Option(name: .long, help: "Output directory (created if missing).")
    var out = "render-out"

    @Flag(help: "Also write the normalised pixel tensors (.f32).")
    var raw = false

    @Flag(help: "Print one JSON object with the statistics.")
    var json = false

    @Argument(help: "A UTF-8 text file.")
    var file: String

    struct ChunkInfo: Encodable {
        var index: Int
        var text: String
        var tokens: Int
        var rows: Int
        var missing_glyphs: Int
        var png: String
        var raw: String?
    }

    struct Summary: Encodable {
        var chunks: Int
        var characters: Int
        var tokens: Int
        var visual_tokens: Int
        var ratio: Double
        var missing_glyphs: Int
        var out: String
        var model_fingerprint: String
        var chunk_list: [ChunkInfo]
    }

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let document = try Document.read(file)
            let backend = try target.backend()
            do {
                try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            } catch {
                throw CLIError.io("cannot create \(out): \(error.localizedDescription)")
            }
            var infos: [ChunkInfo] = []
            var images: [GrayImage] = []
            let totals = try backend.render(document) { c in
                let name = "chunk-\(String(format: "%03d", c.index))"
                try c.image.writePNG(to: "\(out)/\(name).png")
                var rawName: String? = nil
                if raw {
                    rawName = name + ".f32"
                    let bytes = c.image.normalized().withUnsafeBufferPointer { Data(buffer: $0) }
                    guard FileManager.default.createFile(atPath: "\(out)/\(name).f32", contents: bytes) else {
                        throw CLIError.io("cannot write \(out)/\(name).f32")
                    }
                }
                images.append(c.image)
                infos.append(
                    ChunkInfo(
                        index: c.index, text: c.text, tokens: c.tokens, rows: c.rows, missing_glyphs: c.missingGlyphs, png: name + ".png",
                        raw: rawName))
            }
            if !images.isEmpty { try GrayImage.contactSheet(images, columns: 4).writePNG(to: out + "/contact-sheet.png") }
            let summary = Summary(
                chunks: totals.chunks, characters: document.text.count, tokens: totals.tokens, visual_tokens: totals.visualTokens,
                ratio: totals.ratio, missing_glyphs: infos.map(\.missing_glyphs).reduce(0, +), out: out,
                model_fingerprint: totals.modelFingerprint, chunk_list: infos)
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
            guard FileManager.default.createFile(atPath: out + "/chunks.json", contents: (try? enc.encode(summary)) ?? Data()) else {
                throw CLIError.io("cannot write \(out)/chunks.json")
            }
            output.result(
                summary,
                text:
                    "\(summary.chunks) chunks, \(summary.characters) characters, \(summary.tokens) tokens -> \(summary.visual_tokens) visual tokens (ratio \(String(format: "%.2f", summary.ratio))), \(summary.missing_glyphs) missing glyphs; images in \(out)/"
            )
        }
    }
}
