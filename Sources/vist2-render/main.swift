// vist2-render: the sketch renderer alone (VistRender: FreeType and PNG), for machines without a
// Swift toolchain. scripts/build-render-tool.sh builds it with the Swift standard library,
// Foundation, FreeType, libpng and zlib linked statically, so the binary needs only the C
// library. A GPU training machine receives a text-only corpus (`vist2ctl dataset --text-only`)
// and this binary, and renders the images itself: exactly the files `vist2ctl dataset` writes.
import ArgumentParser
import Foundation
import VistRender

@main
struct VistRenderTool: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vist2-render",
        abstract: "Render text into a VIST2 model's sketch images, without the engine.",
        subcommands: [RenderDataset.self, RenderPNG.self])
}

/// Failures, each with a stable code, printed as one line; exit status 1.
struct ToolError: Error, CustomStringConvertible {
    var code: String
    var description: String

    init(_ code: String, _ message: String) {
        self.code = code
        self.description = message
    }

    init(_ e: RenderError) { self.init(e.code, e.description) }
}

func reportingErrors(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as ToolError {
        FileHandle.standardError.write(Data("vist2-render: error [\(e.code)]: \(e.description)\n".utf8))
        throw ExitCode(1)
    } catch let e as RenderError {
        FileHandle.standardError.write(Data("vist2-render: error [\(e.code)]: \(e.description)\n".utf8))
        throw ExitCode(1)
    }
}

/// The model config's geometry ("render" of a VIST2 config.json) and, with --font, another path
/// to the same font file (its sha256 is still checked against the config).
struct RenderOptions: ParsableArguments {
    @Option(help: "A VIST2 model's config.json (its \"render\" section is used).")
    var config: String

    @Option(help: "The font file, where it is not at the config's path (same sha256).")
    var font: String?

    struct File: Decodable { var render: RenderConfig }

    func renderer() throws -> SketchRenderer {
        guard let data = FileManager.default.contents(atPath: config) else { throw ToolError("io", "cannot read \(config)") }
        var r: RenderConfig
        do { r = try JSONDecoder().decode(File.self, from: data).render } catch {
            throw ToolError("bad_render_config", "\(config): no valid \"render\" section (\(error))")
        }
        // --font is a path from the working directory (the config's own is from its directory).
        if let font { r.font = font.hasPrefix("/") ? font : FileManager.default.currentDirectoryPath + "/" + font }
        let base = URL(fileURLWithPath: config).deletingLastPathComponent()
        return try SketchRenderer(config: r, baseDirectory: base)
    }
}

struct RenderDataset: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dataset",
        abstract: "Render a text-only dataset directory (vist2ctl dataset --text-only) into a full one.",
        discussion: """
            Reads IN/meta.json and IN/chunks.jsonl, renders every chunk with the config's \
            geometry and writes OUT/images.u8, OUT/chunks.jsonl (with each character's cell) and \
            OUT/meta.json: the files `vist2ctl dataset` writes for the same corpus. The geometry \
            the chunks were cut for (IN/meta.json) must be the config's.
            """)

    @OptionGroup var options: RenderOptions

    @Option(help: "Output directory (created if missing; its files are replaced).")
    var out: String

    @Argument(help: "The text-only dataset directory.")
    var input: String

    func run() throws {
        try reportingErrors {
            let renderer = try options.renderer()
            guard let metaData = FileManager.default.contents(atPath: input + "/meta.json") else {
                throw ToolError("io", "cannot read \(input)/meta.json")
            }
            guard let meta = try? JSONDecoder().decode(DatasetMeta.self, from: metaData) else {
                throw ToolError("bad_dataset", "\(input)/meta.json is not a dataset's meta.json")
            }
            guard meta.textOnly == true else { throw ToolError("bad_dataset", "\(input) is already rendered (no \"text_only\": true)") }
            guard meta.matches(renderer.config) else {
                throw ToolError("bad_dataset", "\(input) was cut for another geometry than \(options.config)'s")
            }
            guard let records = FileHandle(forReadingAtPath: input + "/chunks.jsonl") else {
                throw ToolError("io", "cannot read \(input)/chunks.jsonl")
            }
            let writer = try DatasetWriter(directory: out, renderer: renderer)
            let decoder = JSONDecoder()
            try forEachLine(of: records) { line, lineNo in
                if line.isEmpty { return true }
                guard let r = try? decoder.decode(DatasetRecord.self, from: line) else {
                    throw ToolError("bad_dataset", "\(input)/chunks.jsonl:\(lineNo): not a chunk record")
                }
                try writer.add(doc: r.doc, index: r.index, tokens: r.tokens, text: Substring(r.text))
                return true
            }
            guard writer.chunks == meta.chunks, writer.tokens == meta.tokens else {
                throw ToolError(
                    "bad_dataset",
                    "\(input): chunks.jsonl holds \(writer.chunks) chunks and \(writer.tokens) tokens, meta.json says \(meta.chunks) and \(meta.tokens)"
                )
            }
            try writer.finish(
                documents: meta.documents, render: renderer.config, modelFingerprint: meta.modelFingerprint, chunkLength: meta.chunkLength,
                visualTokens: meta.visualTokens)
            print("\(writer.chunks) chunks rendered -> \(out)/")
        }
    }
}

struct RenderPNG: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "png", abstract: "Render the start of a text file (what fits on one canvas) as a PNG.")

    @OptionGroup var options: RenderOptions

    @Option(help: "The PNG to write.")
    var out: String

    @Argument(help: "A UTF-8 text file.")
    var file: String

    func run() throws {
        try reportingErrors {
            let renderer = try options.renderer()
            guard let data = FileManager.default.contents(atPath: file) else { throw ToolError("io", "cannot read \(file)") }
            guard let text = String(data: data, encoding: .utf8) else { throw ToolError("bad_text", "\(file) is not valid UTF-8") }
            let (image, fit) = renderer.render(text)
            try image.writePNG(to: out)
            print("\(fit.scalars) of \(text.unicodeScalars.count) characters on \(fit.rows) rows -> \(out)")
        }
    }
}
