import ArgumentParser
import Foundation
import VistEngine

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Prompt-processing and generation throughput, measured like llama-bench.")

    @OptionGroup var modelOptions: ModelOptions

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Run the engine in this process with --model instead of asking the daemon.")
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
        if !local {
            guard p >= 0, n >= 0, r >= 0, p <= Int(UInt32.max), n <= Int(UInt32.max), r <= 1000 else {
                fail("-p, -n and -r must be >= 0 (r <= 1000)", code: "bad_argument", json: json)
            }
            let c = socketOption.connect(json: json)
            do {
                let b = try c.bench(prompt: UInt32(p), generate: UInt32(n), repetitions: UInt32(r))
                if json {
                    printJSON([
                        "pp_tokens": AnyEncodable(Int(b.ppTokens)), "tg_tokens": AnyEncodable(Int(b.tgTokens)),
                        "threads": AnyEncodable(Int(b.threads)), "repetitions": AnyEncodable(Int(b.repetitions)),
                        "pp_tokens_per_s": AnyEncodable(b.ppTokensPerS), "pp_stddev": AnyEncodable(b.ppStddev),
                        "tg_tokens_per_s": AnyEncodable(b.tgTokensPerS), "tg_stddev": AnyEncodable(b.tgStddev),
                        "peak_rss_bytes": AnyEncodable(Int(b.peakRssBytes)), "model_bytes": AnyEncodable(Int(b.modelBytes)),
                        "simd": AnyEncodable(b.simd),
                    ])
                } else {
                    print(String(format: "pp%d: %.1f ± %.1f tokens/s", b.ppTokens, b.ppTokensPerS, b.ppStddev))
                    print(String(format: "tg%d: %.1f ± %.1f tokens/s", b.tgTokens, b.tgTokensPerS, b.tgStddev))
                    print("threads \(b.threads), simd \(b.simd) (the daemon's engine)")
                }
            } catch { fail("\(error)", code: daemonCode(error), json: json) }
            return
        }
        try runReportingErrors(json: json) {
            let model = try modelOptions.load()
            let b = try model.bench(prompt: p, generate: n, repetitions: r, kvType: modelOptions.kvType)
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
