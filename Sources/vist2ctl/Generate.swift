import ArgumentParser
import Foundation
import VistEngine

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generate text from a prompt (streams to stdout).")

    @OptionGroup var target: BackendOptions

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

    @Flag(help: "Keep generating past end-of-generation tokens (benchmarks).")
    var ignoreEOS = false

    @Flag(help: "Wrap the prompt in the model's chat template.")
    var chat = false

    @Option(name: .long, help: "A document to read as context (repeatable; needs a VIST2 model).")
    var doc: [String] = []

    @Flag(help: "Read the documents as plain text with the backbone alone (the baseline VIST2 is compared with).")
    var fullText = false

    @Flag(help: "Use and fill the daemon's cache entries shared by all users, not your own.")
    var shared = false

    @Flag(help: "Print one JSON object instead of streaming text.")
    var json = false

    @Argument(help: "The prompt.")
    var prompt: String

    func run() throws {
        let output = Output(json: json)
        try output.run {
            var req = GenerationRequest(prompt: prompt, fullText: fullText)
            req.chat = chat
            req.maxTokens = maxTokens
            req.stop = stop
            req.ignoreEOS = ignoreEOS
            req.sampling.temperature = temperature
            req.sampling.topK = topK
            req.sampling.topP = topP
            req.sampling.minP = minP
            req.sampling.repetitionPenalty = repeatPenalty
            req.sampling.seed = seed
            let documents = try doc.map { path throws(EngineError) in try Document.read(path) }
            let backend = try target.backend()
            let result = try backend.generate(req, documents: documents, shared: shared, onText: output.stream)
            if json { printJSON(result) } else { output.stream("\n") }
        }
    }
}
