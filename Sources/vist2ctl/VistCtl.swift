import ArgumentParser
import Foundation
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

    /// Parses and runs a command like ArgumentParser's own `main`, except that with `--json` an
    /// argument the parser or a command's `validate` refuses is reported as every other error
    /// is: a JSON error object (code `bad_argument`) on stderr.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let exit = exitCode(for: error)
            if CommandLine.arguments.dropFirst().contains("--json"), !(error is ExitCode), exit != .success {
                Output.reportFailure(code: "bad_argument", message: message(for: error), json: true)
                Foundation.exit(exit.rawValue)
            }
            self.exit(withError: error)
        }
    }
}

/// Options every model-using command shares.
struct ModelOptions: ParsableArguments {
    @Option(name: .long, help: "Model name or path (default: default).")
    var model: String?

    @Option(name: .long, help: "Threads for the engine (default: the cores this process may use).")
    var threads: Int?

    @Option(name: .long, help: "Element type of the KV cache: f16 (default, as vist2d) or f32.")
    var kvType: KVType?

    /// The model's name or path.
    var name: String { model ?? "default" }

    /// The options given on the command line (the daemon backend refuses them).
    var given: [String] {
        [model.map { _ in "--model" }, threads.map { _ in "--threads" }, kvType.map { _ in "--kv-type" }].compactMap { $0 }
    }

    func validate() throws {
        if let t = threads, !(1...256).contains(t) { throw ValidationError("--threads must be in 1...256, got \(t)") }
    }

    /// The language model: a GGUF / Hugging Face model, or a VIST2 model's backbone as the model
    /// runs text (with its adapter when the adapter's scope is "all").
    func load() throws -> LanguageModel {
        let url = try ModelStore.resolve(name)
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
        let url = try ModelStore.resolve(name)
        return VIST2Model.isModelDirectory(url) ? try VIST2Model.backboneURL(directory: url) : url
    }

    /// A VIST2 model directory (config.json with model_type "vist2", vision.safetensors).
    func loadVIST2() throws -> VIST2Model {
        let url = try ModelStore.resolve(name)
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

extension KVType: ExpressibleByArgument {}
