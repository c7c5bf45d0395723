import ArgumentParser
import Foundation
import VistEngine

#if canImport(Glibc)
    import Glibc
#endif

struct Compress: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compress documents in the daemon, filling its persistent caches.",
        discussion: """
            Opens each FILE in the daemon and prefills it as a generation over it with --instruction \
            would (chunks rendered, encoded and prefilled as visual blocks), so that such a generation \
            — now, from another client, or after a restart — starts from the cache. Reports chunks, \
            tokens, ratio and how many chunks came from each cache level. With --local the same \
            compression runs in this process (nothing is cached) to show its figures. A progress \
            bar is drawn on stderr when it is a terminal.
            """)

    @OptionGroup var target: BackendOptions

    @Option(help: "The instruction the documents will be used with (visual blocks attend to it).")
    var instruction = ""

    @Flag(help: "Wrap the instruction in the model's chat template (as generate --chat does).")
    var chat = false

    @Flag(help: "Use and fill the cache entries shared by all users of the daemon, not your own.")
    var shared = false

    @Flag(help: "Print one JSON object per file.")
    var json = false

    @Argument(help: "UTF-8 text files.")
    var files: [String]

    func validate() throws {
        guard !files.isEmpty else { throw ValidationError("name at least one file") }
    }

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let backend = try target.backend()
            let bar = isatty(2) == 1 && !json
            for file in files {
                let document = try Document.read(file)
                let r: CompressionResult
                do {
                    r = try backend.compress(document, instruction: instruction, chat: chat, shared: shared) { done, total in
                        guard bar, total > 0 else { return }
                        let width = 30, filled = done * width / total
                        let hashes = String(repeating: "#", count: filled), blanks = String(repeating: " ", count: width - filled)
                        output.progress("\r\(file) [\(hashes)\(blanks)] \(done)/\(total) chunks")
                    }
                } catch {
                    let (code, message) = describe(error)
                    throw CLIError(code: code, message: "\(file): \(message)")
                }
                if bar { output.progress("\r\u{1B}[K") }
                var fields = jsonFields(r)
                fields["file"] = .string(file)
                output.result(
                    fields,
                    text:
                        "\(file): \(r.chunks) chunks, \(r.text_tokens) tokens -> \(r.visual_tokens) visual tokens (ratio \(String(format: "%.2f", r.ratio))); encoded \(r.chunks_encoded), chunk-cache hits \(r.chunk_cache_hits), prefix-cache hits \(r.prefix_cache_hits); \(String(format: "%.0f", r.elapsed_ms)) ms"
                )
            }
        }
    }
}
