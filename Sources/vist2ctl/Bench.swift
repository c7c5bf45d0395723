import ArgumentParser
import Foundation

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Prompt-processing and generation throughput, measured like llama-bench.")

    @OptionGroup var target: BackendOptions

    @Option(name: .short, help: "Prompt tokens (pp).")
    var p = 512

    @Option(name: .short, help: "Generated tokens (tg).")
    var n = 128

    @Option(name: .short, help: "Timed repetitions after one warm-up.")
    var r = 5

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let b = try target.backend().bench(prompt: p, generate: n, repetitions: r)
            output.result(
                b,
                text: [
                    String(format: "pp%d: %.1f ± %.1f tokens/s", b.pp_tokens, b.pp_tokens_per_s, b.pp_stddev),
                    String(format: "tg%d: %.1f ± %.1f tokens/s", b.tg_tokens, b.tg_tokens_per_s, b.tg_stddev),
                    "threads \(b.threads), simd \(b.simd), peak RSS \(b.peak_rss_bytes / 1_048_576) MiB, weights \(b.model_bytes / 1_048_576) MiB"
                        + (target.local ? "" : " (the daemon's engine)"),
                ].joined(separator: "\n"))
        }
    }
}
