import ArgumentParser
import Foundation
import VistEngine

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Perplexity of a text file, computed as llama.cpp's llama-perplexity does.",
        discussion: """
            Non-overlapping windows of --ctx tokens; each starts from an empty cache (with BOS \
            replacing its first token when the model adds BOS); the second half of each window \
            is scored. See docs/PERPLEXITY.md.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Compute in this process with --model instead of asking the daemon.")
    var local = false

    @Option(name: .long, help: "Window size in tokens.")
    var ctx = 512

    @Flag(help: "Print one JSON object.")
    var json = false

    @Argument(help: "A UTF-8 text file.")
    var file: String

    func run() throws {
        if !local {
            let text = readDocument(file, json: json)
            guard (1...Int(UInt32.max)).contains(ctx) else { fail("--ctx must be positive", code: "bad_argument", json: json) }
            let c = socketOption.connect(json: json)
            do {
                let doc = try c.openDocument(text: text, path: file)
                let r = try c.perplexity(documentID: doc.documentID, ctx: UInt32(ctx)) { p in
                    if !json {
                        FileHandle.standardError.write(
                            Data("[\(p.windowsDone)/\(p.windowsTotal)] \(String(format: "%.4f", p.perplexity))\n".utf8))
                    }
                }
                try c.closeDocument(id: doc.documentID)
                if json {
                    printJSON([
                        "perplexity": AnyEncodable(r.perplexity), "tokens": AnyEncodable(Int(r.tokens)),
                        "windows": AnyEncodable(Int(r.windows)),
                        "scored_tokens": AnyEncodable(Int(r.scoredTokens)), "ctx": AnyEncodable(Int(r.ctx)),
                    ])
                } else {
                    print(
                        String(
                            format: "perplexity: %.4f over %d windows of %d tokens (%d scored, %d in the file)", r.perplexity, r.windows,
                            r.ctx,
                            r.scoredTokens, r.tokens))
                }
            } catch { fail("\(error)", code: daemonCode(error), json: json) }
            return
        }
        try runReportingErrors(json: json) {
            let text = try readText(file)
            let model = try modelOptions.load()
            let r = try model.perplexity(text: text, ctx: ctx, kvType: modelOptions.kvType) { done, total, ppl in
                if !json { FileHandle.standardError.write(Data("[\(done)/\(total)] \(String(format: "%.4f", ppl))\n".utf8)) }
            }
            if json {
                printJSON(r)
            } else {
                print(
                    String(
                        format: "perplexity: %.4f over %d windows of %d tokens (%d scored, %d in the file)", r.perplexity, r.windows, r.ctx,
                        r.scored_tokens, r.tokens))
            }
        }
    }
}
