import ArgumentParser
import Foundation
import VistEngine

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
        try requireLocal(local, "bench")
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
