import ArgumentParser
import Foundation
import VistEngine

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generate text from a prompt (streams to stdout).")

    @OptionGroup var modelOptions: ModelOptions

    @Flag(help: "Run the engine in this process instead of asking the daemon.")
    var local = false

    @Option(name: .long, help: "Maximum tokens to generate.")
    var maxTokens = 128

    @Option(name: .long, help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0.8

    @Option(name: .long, help: "Top-k (0 disables).")
    var topK = 40

    @Option(name: .long, help: "Top-p nucleus mass.")
    var topP: Float = 0.95

    @Option(name: .long, help: "Min-p relative probability floor.")
    var minP: Float = 0.05

    @Option(name: .long, help: "Repetition penalty (1 disables).")
    var repeatPenalty: Float = 1.0

    @Option(name: .long, help: "Random seed.")
    var seed: UInt64 = 0

    @Option(name: .long, help: "Stop before this string (repeatable).")
    var stop: [String] = []

    @Flag(help: "Wrap the prompt in the model's chat template.")
    var chat = false

    @Flag(help: "Print one JSON object instead of streaming text.")
    var json = false

    @Argument(help: "The prompt.")
    var prompt: String

    func run() throws {
        try requireLocal(local)
        try runReportingErrors(json: json) {
            let model = try modelOptions.load()
            var req = GenerationRequest(prompt: prompt)
            req.chat = chat
            req.maxTokens = maxTokens
            req.stop = stop
            req.sampling.temperature = temperature
            req.sampling.topK = topK
            req.sampling.topP = topP
            req.sampling.minP = minP
            req.sampling.repetitionPenalty = repeatPenalty
            req.sampling.seed = seed
            let result = try Generator(model: model).generate(req) { piece in
                if !json {
                    FileHandle.standardOutput.write(Data(piece.utf8))
                }
                return true
            }
            if json {
                printJSON(result)
            } else {
                FileHandle.standardOutput.write(Data("\n".utf8))
            }
        }
    }
}

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the token ids of a text.")

    @OptionGroup var modelOptions: ModelOptions

    @Flag(help: "Parse the text of special tokens such as <|im_start|> as those tokens.")
    var parseSpecial = false

    @Flag(help: "Do not add BOS/EOS even if the model asks for them.")
    var noSpecial = false

    @Flag(help: "Print {\"ids\": [...]}.")
    var json = false

    @Argument(help: "The text.")
    var text: String

    func run() throws {
        try runReportingErrors(json: json) {
            let model = try modelOptions.load()
            let ids = model.tokenizer.encode(text, addSpecial: !noSpecial, parseSpecial: parseSpecial)
            if json {
                printJSON(["ids": ids])
            } else {
                print(ids.map(String.init).joined(separator: " "))
            }
        }
    }
}

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Perplexity of a text file, computed as llama.cpp's llama-perplexity does.",
        discussion: """
            Non-overlapping windows of --ctx tokens; each starts from an empty cache (with BOS \
            replacing its first token when the model adds BOS); the second half of each window \
            is scored. See docs/PERPLEXITY.md.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .long, help: "Window size in tokens.")
    var ctx = 512

    @Flag(help: "Print one JSON object.")
    var json = false

    @Argument(help: "A UTF-8 text file.")
    var file: String

    func run() throws {
        try runReportingErrors(json: json) {
            guard let data = FileManager.default.contents(atPath: file) else { throw EngineError.io("cannot read \(file)") }
            guard let text = String(data: data, encoding: .utf8) else { throw EngineError.badArgument("\(file) is not valid UTF-8") }
            let model = try modelOptions.load()
            let r = try model.perplexity(text: text, ctx: ctx) { done, total, ppl in
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

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Prompt-processing and generation throughput, measured like llama-bench.")

    @OptionGroup var modelOptions: ModelOptions

    @Flag(help: "Run the engine in this process.")
    var local = false

    @Option(name: .short, help: "Prompt tokens (pp).")
    var p = 512

    @Option(name: .short, help: "Generated tokens (tg).")
    var n = 128

    @Option(name: .short, help: "Timed repetitions after one warm-up.")
    var r = 5

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        try requireLocal(local)
        try runReportingErrors(json: json) {
            let model = try modelOptions.load()
            let b = try model.bench(prompt: p, generate: n, repetitions: r)
            if json {
                printJSON(b)
            } else {
                print(String(format: "pp%d: %.1f ± %.1f tokens/s", b.pp_tokens, b.pp_tokens_per_s, b.pp_stddev))
                print(String(format: "tg%d: %.1f ± %.1f tokens/s", b.tg_tokens, b.tg_tokens_per_s, b.tg_stddev))
                print(
                    "threads \(b.threads), simd \(b.simd), peak RSS \(b.peak_rss_bytes / 1_048_576) MiB, weights \(b.model_bytes / 1_048_576) MiB"
                )
            }
        }
    }
}
