import ArgumentParser
import Foundation
import VistBridge
import VistClient
import VistEngine
import VistTokenizer

@main
struct VistCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vist2ctl",
        abstract: "Control and use the vist2 context-compression engine.",
        discussion: """
            Models are named `default` (this project's trained VIST2 model on SmolLM2-135M) or \
            `smollm2-135m` (the plain backbone), both installed into the model store by \
            scripts/fetch-model.sh, or given as a path to a GGUF file, a Hugging Face directory or \
            a VIST2 model directory. Commands that need only a language model (tokenize, \
            perplexity, bench, generate without documents) use a VIST2 model's backbone. \
            The model store is $VIST2_MODELS, else $XDG_DATA_HOME/vist2/models, else \
            ~/.local/share/vist2/models.
            """,
        subcommands: [
            Status.self, Compress.self, Generate.self, Bridge.self, Render.self, Cache.self, Metrics.self, Tokenize.self, Perplexity.self,
            Bench.self,
            Eval.self, Dataset.self, ExportBackbone.self,
        ])
}

/// Options every model-using command shares.
struct ModelOptions: ParsableArguments {
    @Option(name: .long, help: "Model name or path.")
    var model = "default"

    @Option(name: .long, help: "Threads for the engine (default: the cores this process may use).")
    var threads: Int?

    @Option(name: .long, help: "Element type of the KV cache with --local: f16 (default, as vist2d) or f32.")
    var kvType: KVType = .f16

    func validate() throws {
        if let t = threads, !(1...256).contains(t) { throw ValidationError("--threads must be in 1...256, got \(t)") }
    }

    /// The language model: a GGUF / Hugging Face model, or a VIST2 model's backbone as the model
    /// runs text (with its adapter when the adapter's scope is "all").
    func load() throws -> LanguageModel {
        let url = try ModelStore.resolve(model)
        if VIST2Model.isModelDirectory(url) {
            let config: VIST2Config
            do { config = try VIST2Config.load(path: url.appendingPathComponent("config.json").path) } catch {
                throw EngineError.format(error)
            }
            if config.adapter?.scope == LoRAAdapter.Scope.all.rawValue { return try loadVIST2().language }
        }
        return try loadBackbone()
    }

    /// The backbone alone: a GGUF / Hugging Face model, or a VIST2 model's backbone without its adapter.
    func loadBackbone() throws -> LanguageModel {
        try LanguageModel(url: languageURL(), threads: threads ?? LanguageModel.defaultThreads)
    }

    func languageURL() throws -> URL {
        let url = try ModelStore.resolve(model)
        return VIST2Model.isModelDirectory(url) ? try VIST2Model.backboneURL(directory: url) : url
    }

    /// A VIST2 model directory (config.json with model_type "vist2", vision.safetensors).
    func loadVIST2() throws -> VIST2Model {
        let url = try ModelStore.resolve(model)
        guard VIST2Model.isModelDirectory(url) else {
            throw EngineError.badArgument("\(url.path) is not a VIST2 model directory (config.json with \"model_type\": \"vist2\")")
        }
        return try VIST2Model(directory: url, threads: threads ?? LanguageModel.defaultThreads)
    }

    /// Only the tokenizer, without mapping the weights or starting threads.
    func loadTokenizer() throws -> Tokenizer {
        try LanguageModel.loadTokenizer(url: languageURL())
    }
}

/// Runs a command body, turning engine errors into one clear line on stderr and exit status 1.
func runReportingErrors(json: Bool, _ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as EngineError {
        if json {
            printJSON(["error": ["code": e.code, "message": e.description]], to: .standardError)
        } else {
            FileHandle.standardError.write(Data("vist2ctl: error [\(e.code)]: \(e.description)\n".utf8))
        }
        throw ExitCode(1)
    }
}

enum Stream { case standardOutput, standardError }

func printJSON<T: Encodable>(_ value: T, to stream: Stream = .standardOutput) {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys]
    let data = (try? enc.encode(value)) ?? Data("{}".utf8)
    let h = stream == .standardOutput ? FileHandle.standardOutput : FileHandle.standardError
    h.write(data)
    h.write(Data("\n".utf8))
}

/// A UTF-8 text file (a document, a prompt file), or the engine error that says why not.
func readText(_ path: String) throws(EngineError) -> String {
    guard let data = FileManager.default.contents(atPath: path) else { throw .io("cannot read \(path)") }
    guard let text = String(data: data, encoding: .utf8) else { throw .badArgument("\(path) is not valid UTF-8") }
    return text
}

/// One clear line (or a JSON error object) on stderr, then exit status 1.
func fail(_ message: String, code: String, json: Bool) -> Never {
    // A server error's description carries its code in brackets; the code is printed separately.
    let message = message.replacingOccurrences(of: #" \[[A-Za-z]+\]$"#, with: "", options: .regularExpression)
    if json {
        printJSON(["error": ["code": code, "message": message]], to: .standardError)
    } else {
        FileHandle.standardError.write(Data("vist2ctl: error [\(code)]: \(message)\n".utf8))
    }
    Foundation.exit(1)
}

/// The stable code of a daemon-side failure: the protocol's error code name, lowercased.
func daemonCode(_ e: Error) -> String {
    guard let ce = e as? VistClient.ClientError else { return "io" }
    switch ce {
    case .server(let code, _): return errorCodeName(code)
    case .connect: return "daemon_unavailable"
    case .closed: return "connection_closed"
    case .protocolError: return "protocol"
    case .io: return "io"
    }
}

extension KVType: ExpressibleByArgument {}
