import ArgumentParser
import Foundation

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Perplexity of a text file, computed as llama.cpp's llama-perplexity does.",
        discussion: """
            Non-overlapping windows of --ctx tokens; each starts from an empty cache (with BOS \
            replacing its first token when the model adds BOS); the second half of each window \
            is scored. See docs/PERPLEXITY.md.
            """)

    @OptionGroup var target: BackendOptions

    @Option(name: .long, help: "Window size in tokens.")
    var ctx = 512

    @Flag(help: "Print one JSON object.")
    var json = false

    @Argument(help: "A UTF-8 text file.")
    var file: String

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let document = try Document.read(file)
            let r = try target.backend().perplexity(document, ctx: ctx) { done, total, ppl in
                output.progress("[\(done)/\(total)] \(String(format: "%.4f", ppl))\n")
            }
            output.result(
                r,
                text: String(
                    format: "perplexity: %.4f over %d windows of %d tokens (%d scored, %d in the file)", r.perplexity, r.windows, r.ctx,
                    r.scored_tokens, r.tokens))
        }
    }
}
