import ArgumentParser
import Foundation
import VistEngine
import VistFormats

/// `vist2ctl export-backbone`: the backbone as the engine sees it, for the training code.
struct ExportBackbone: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-backbone",
        abstract: "Write a model's decoder as a Hugging Face directory of F32 weights, dequantized by the engine.",
        discussion: """
            The training code (Training/) freezes the backbone; it loads this directory so that it \
            trains against exactly the weights the engine multiplies with (a quantized GGUF is \
            dequantized by the engine's own kernels). For a VIST2 model directory the backbone it \
            names is exported. Writes OUT/config.json and OUT/model.safetensors.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Flag(help: "Print one JSON object with what was written.")
    var json = false

    @Argument(help: "Output directory (created if missing).")
    var out: String

    func run() throws {
        try Output(json: json).run {
            // A VIST2 model directory's backbone, without its vision encoder or adapter.
            let lm = try modelOptions.loadBackbone()
            let written = Result { () throws(FormatError) in try lm.weights.exportHuggingFace(to: URL(fileURLWithPath: out)) }
            if case .failure(let e) = written { throw EngineError.format(e) }
            let c = lm.config
            if json {
                printJSON(["out": out, "source": lm.source.path, "architecture": c.architecture.rawValue, "layers": "\(c.layers)"])
            } else {
                print(
                    "wrote \(out)/config.json and \(out)/model.safetensors (\(c.architecture.rawValue), \(c.layers) layers) from \(lm.source.path)"
                )
            }
        }
    }
}
