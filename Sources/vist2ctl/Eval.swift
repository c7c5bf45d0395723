import ArgumentParser
import Foundation
import VistEngine

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure how well a VIST2 model reads its sketch images: OCR accuracy and retention.",
        discussion: """
            Cuts FILE with the model's chunker. OCR: each chunk is transcribed greedily from its \
            visual block alone (after the model's ocr_prompt) and compared with the chunk's text \
            (character accuracy = 1 - edit distance / length). Retention (docs/MODEL.md section 7): \
            for every chunk after the first, the perplexity of its tokens (all but its first) \
            given nothing (ppl_none), the full text of the --context-chunks chunks before it \
            (ppl_text), or only their visual blocks (ppl_visual); retention = \
            (ppl_none - ppl_visual) / (ppl_none - ppl_text). Runs in this process.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .long, help: "Earlier chunks each scored chunk is given (1...64).")
    var contextChunks = 4

    @Option(name: .long, help: "Evaluate only the first N chunks (0 = all).")
    var maxChunks = 0

    @Flag(help: "Also print each chunk's transcription (JSON: \"transcriptions\").")
    var show = false

    @Flag(help: "Print one JSON object.")
    var json = false

    @Argument(help: "A UTF-8 text file.")
    var file: String

    func validate() throws {
        guard (1...64).contains(contextChunks) else { throw ValidationError("--context-chunks must be in 1...64") }
        guard maxChunks >= 0 else { throw ValidationError("--max-chunks must be >= 0") }
    }

    func run() throws {
        try Output(json: json).run {
            let text = try readText(file)
            let model = try modelOptions.loadVIST2()
            let tty = isatty(2) != 0 && !json
            let r = try VIST2Evaluator(model: model).evaluate(
                text: text, contextChunks: contextChunks, maxChunks: maxChunks, keepTranscriptions: show
            ) { done, total in
                if tty { FileHandle.standardError.write(Data("\r\(done)/\(total)".utf8)) }
                return true
            }
            if tty { FileHandle.standardError.write(Data("\r".utf8)) }
            if json {
                printJSON(r)
                return
            }
            func f(_ x: Double) -> String { String(format: "%.3f", x) }
            for (i, t) in (r.transcriptions ?? []).enumerated() { print("--- chunk \(i) as read from its sketch image\n\(t)") }
            print(
                "chunks               \(r.chunks) (\(r.pairs) scored pairs, \(r.scored_tokens) tokens, \(r.context_chunks) context chunks)")
            print("ocr_char_accuracy    \(f(r.ocr_char_accuracy))")
            print("ppl_none             \(f(r.ppl_none))")
            print("ppl_text             \(f(r.ppl_text))")
            print("ppl_visual           \(f(r.ppl_visual))")
            print("retention            \(r.retention.map(f) ?? "n/a (needs two chunks and ppl_text < ppl_none)")")
        }
    }
}
