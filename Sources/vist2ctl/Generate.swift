import ArgumentParser
import Foundation
import VistBridge
import VistClient
import VistEngine
import VistProtocol

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generate text from a prompt (streams to stdout).")

    @OptionGroup var modelOptions: ModelOptions

    @OptionGroup var socketOption: SocketOption

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
        if !local {
            try runOnDaemon()
            return
        }
        try runReportingErrors(json: json) {
            var req = GenerationRequest(prompt: prompt)
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
            let stream: (String) -> Bool = { piece in
                if !json { FileHandle.standardOutput.write(Data(piece.utf8)) }
                return true
            }
            let model: EngineModel
            if VIST2Model.isModelDirectory(try ModelStore.resolve(modelOptions.model)) {
                for path in doc { req.documents.append(try readText(path)) }
                req.fullText = fullText
                model = .vist2(try modelOptions.loadVIST2())
            } else {
                guard doc.isEmpty, !fullText else {
                    throw EngineError.badArgument(
                        "--doc and --full-text need a VIST2 model directory; \(modelOptions.model) is a plain language model")
                }
                model = .language(try modelOptions.load())
            }
            req.kvType = modelOptions.kvType
            let result = try GenerationTask.generate(req, model: model, onText: stream)
            if json { printJSON(result) }
            if !json {
                FileHandle.standardOutput.write(Data("\n".utf8))
            }
        }
    }

    /// The same request through the daemon: the documents are opened there (and closed after),
    /// text streams as it arrives, and --json prints the same fields as --local.
    func runOnDaemon() throws {
        let texts = doc.map { readDocument($0, json: json) }
        let c = socketOption.connect(json: json)
        do {
            var ids: [String] = []
            for (path, text) in zip(doc, texts) { ids.append(try c.openDocument(text: text, path: path).documentID) }
            let g = Vist2_V1_GenerateRequest.with {
                $0.instruction = prompt
                $0.chat = chat
                $0.documentIds = ids
                $0.fullText = fullText
                $0.shared = shared
                $0.maxTokens = UInt32(clamping: max(0, maxTokens))
                $0.stop = stop
                $0.sampling = .with {
                    $0.temperature = temperature
                    $0.topK = UInt32(clamping: max(0, topK))
                    $0.topP = topP
                    $0.minP = minP
                    $0.repetitionPenalty = repeatPenalty
                    $0.seed = seed
                }
            }
            let r = try c.generate(g) { piece in
                if !json { FileHandle.standardOutput.write(Data(piece.utf8)) }
            }
            for id in ids { try c.closeDocument(id: id) }
            if json {
                printJSON(JSONValue.object(generateResultFields(r)))
            } else {
                FileHandle.standardOutput.write(Data("\n".utf8))
            }
        } catch {
            fail("\(error)", code: daemonCode(error), json: json)
        }
    }
}

/// Type-erased Encodable for small JSON objects of mixed values.
struct AnyEncodable: Encodable {
    let encode: (Encoder) throws -> Void
    init<T: Encodable>(_ v: T) { encode = v.encode }
    func encode(to encoder: Encoder) throws { try encode(encoder) }
}
