import ArgumentParser
import Foundation
import VistClient
import VistEngine
import VistProtocol
import VistRender

struct Render: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Render a document into the sketch images a VIST2 model reads.",
        discussion: """
            Cuts FILE into chunks with the model's chunker and writes chunk-NNN.png for each, plus \
            contact-sheet.png and chunks.json (texts, token counts, rows, missing glyphs). With \
            --raw it also writes chunk-NNN.f32: the normalised pixels (x/127.5 - 1, float32 \
            little-endian, height x width) exactly as the vision encoder reads them, for the \
            training code.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Render in this process with --model instead of asking the daemon (implied by --raw).")
    var local = false

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
        if !local && !raw {
            try runOnDaemon()
            return
        }
        try runReportingErrors(json: json) {
            let text = try readText(file)
            let model = try modelOptions.loadVIST2()
            do {
                try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            } catch {
                throw EngineError.io("cannot create \(out): \(error.localizedDescription)")
            }
            let chunks = model.chunker.chunks(text)
            var infos: [ChunkInfo] = []
            var images: [GrayImage] = []
            for (i, c) in chunks.enumerated() {
                let img = model.renderer.render(c.text).image
                images.append(img)
                let png = "chunk-\(String(format: "%03d", i)).png"
                do { try img.writePNG(to: out + "/" + png) } catch { throw EngineError.io("\(error)") }
                var rawName: String? = nil
                if raw {
                    rawName = "chunk-\(String(format: "%03d", i)).f32"
                    let floats = img.normalized()
                    let bytes = floats.withUnsafeBufferPointer { Data(buffer: $0) }
                    guard FileManager.default.createFile(atPath: out + "/" + rawName!, contents: bytes) else {
                        throw EngineError.io("cannot write \(out)/\(rawName!)")
                    }
                }
                infos.append(
                    ChunkInfo(
                        index: i, text: String(c.text), tokens: c.tokens, rows: c.rows, missing_glyphs: c.missing, png: png, raw: rawName))
            }
            if !images.isEmpty {
                do { try GrayImage.contactSheet(images, columns: 4).writePNG(to: out + "/contact-sheet.png") } catch {
                    throw EngineError.io("\(error)")
                }
            }
            let tokens = chunks.map(\.tokens).reduce(0, +)
            let visual = chunks.count * model.visualTokens
            let summary = Summary(
                chunks: chunks.count, characters: text.count, tokens: tokens, visual_tokens: visual,
                ratio: visual > 0 ? Double(tokens) / Double(visual) : 0, missing_glyphs: chunks.map(\.missing).reduce(0, +), out: out,
                model_fingerprint: model.fingerprint, chunk_list: infos)
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys, .prettyPrinted]
            guard FileManager.default.createFile(atPath: out + "/chunks.json", contents: (try? enc.encode(summary)) ?? Data()) else {
                throw EngineError.io("cannot write \(out)/chunks.json")
            }
            if json {
                printJSON(summary)
            } else {
                print(
                    "\(summary.chunks) chunks, \(summary.characters) characters, \(summary.tokens) tokens -> \(summary.visual_tokens) visual tokens (ratio \(String(format: "%.2f", summary.ratio))), \(summary.missing_glyphs) missing glyphs; images in \(out)/"
                )
            }
        }
    }

    /// The daemon renders with the model it holds; the PNGs arrive over the socket.
    func runOnDaemon() throws {
        let text = readDocument(file, json: json)
        let c = socketOption.connect(json: json)
        do {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            let doc = try c.openDocument(text: text, path: file)
            var infos: [ChunkInfo] = []
            var failure: String? = nil
            let r = try c.render(documentID: doc.documentID) { chunk in
                let png = "chunk-\(String(format: "%03d", chunk.index)).png"
                if !FileManager.default.createFile(atPath: out + "/" + png, contents: chunk.png) { failure = "cannot write \(out)/\(png)" }
                infos.append(
                    ChunkInfo(
                        index: Int(chunk.index), text: chunk.text, tokens: Int(chunk.tokens), rows: 0,
                        missing_glyphs: Int(chunk.missingGlyphs),
                        png: png, raw: nil))
            }
            try c.closeDocument(id: doc.documentID)
            if let failure { fail(failure, code: "io", json: json) }
            let summary = Summary(
                chunks: Int(r.chunks), characters: text.count, tokens: Int(r.textTokens), visual_tokens: Int(r.visualTokens),
                ratio: r.ratio,
                missing_glyphs: infos.map(\.missing_glyphs).reduce(0, +), out: out, model_fingerprint: c.hello.modelFingerprint,
                chunk_list: infos)
            if json {
                printJSON(summary)
            } else {
                print(
                    "\(summary.chunks) chunks, \(summary.tokens) tokens -> \(summary.visual_tokens) visual tokens (ratio \(String(format: "%.2f", summary.ratio))), \(summary.missing_glyphs) missing glyphs; images in \(out)/"
                )
            }
        } catch {
            fail("\(error)", code: daemonCode(error), json: json)
        }
    }
}
