import Foundation
import Testing
import VistEngine

/// Runs vist2ctl from the same build directory as this test bundle.
func vist2ctl(_ args: [String], env: [String: String] = [:]) throws -> (status: Int32, out: String, err: String) {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    // On Linux the test runner is <build>/vist2PackageTests.xctest; vist2ctl sits beside it.
    if !FileManager.default.fileExists(atPath: dir.appendingPathComponent("vist2ctl").path) {
        dir = Bundle.main.bundleURL.deletingLastPathComponent()
    }
    let p = Process()
    p.executableURL = dir.appendingPathComponent("vist2ctl")
    p.arguments = args
    var e = ProcessInfo.processInfo.environment
    for (k, v) in env { e[k] = v }
    p.environment = e
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let r = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: r, as: UTF8.self))
}

func json(_ s: String) throws -> [String: Any] {
    try #require(try JSONSerialization.jsonObject(with: Data(s.utf8)) as? [String: Any])
}

@Suite("vist2ctl as a user runs it", .serialized)
struct CLITests {
    @Test("generate --json reports text, token counts, timings and peak RSS")
    func generateJSON() throws {
        let r = try vist2ctl([
            "generate", "--local", "--model", "default", "--max-tokens", "12", "--temperature", "0", "--json", "The capital of France is",
        ])
        #expect(r.status == 0, "\(r.err)")
        let j = try json(r.out)
        #expect((j["text"] as? String)?.contains("Paris") == true)
        #expect(j["prompt_tokens"] as? Int == 5)
        #expect(j["generated_tokens"] as? Int == 12)
        for key in ["ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s"] {
            #expect(((j[key] as? Double) ?? 0) > 0, "\(key)")
        }
        #expect(((j["peak_rss_bytes"] as? Int) ?? 0) > 50_000_000)
    }

    @Test("generate streams the same text it reports, and --chat uses the template")
    func generateStreams() throws {
        let args = ["generate", "--local", "--max-tokens", "20", "--temperature", "0.7", "--seed", "7", "--chat", "Name three colors."]
        let streamed = try vist2ctl(args)
        let reported = try vist2ctl(args + ["--json"])
        #expect(streamed.status == 0 && reported.status == 0)
        let text = try json(reported.out)["text"] as? String
        #expect(streamed.out == (text ?? "") + "\n", "same seed, same text")
    }

    @Test("tokenize --json prints the ids")
    func tokenize() throws {
        let r = try vist2ctl(["tokenize", "--json", "Hello world"])
        #expect(r.status == 0)
        #expect(try json(r.out)["ids"] as? [Int] == [19556, 905])
    }

    @Test("perplexity --json follows llama-perplexity's windows")
    func perplexity() throws {
        let r = try vist2ctl(["perplexity", "--ctx", "128", "--json", "/usr/share/common-licenses/Apache-2.0"])
        #expect(r.status == 0, "\(r.err)")
        let j = try json(r.out)
        let tokens = try #require(j["tokens"] as? Int)
        #expect(j["windows"] as? Int == tokens / 128)
        #expect(j["scored_tokens"] as? Int == (tokens / 128) * (128 - 1 - 64))
        let ppl = try #require(j["perplexity"] as? Double)
        #expect(ppl > 1 && ppl < 100)
    }

    @Test("bench --json reports pp and tg throughput")
    func bench() throws {
        let r = try vist2ctl(["bench", "--local", "-p", "32", "-n", "8", "-r", "1", "--json"])
        #expect(r.status == 0, "\(r.err)")
        let j = try json(r.out)
        #expect(((j["pp_tokens_per_s"] as? Double) ?? 0) > 0 && ((j["tg_tokens_per_s"] as? Double) ?? 0) > 0)
    }

    @Test("Bad arguments and bad models fail with a clear message and a non-zero status")
    func errors() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let junk = dir.appendingPathComponent("junk.gguf")
        try Data("GGUF this is not really a model".utf8).write(to: junk)
        let model = try ModelStore.resolve("default")
        let cut = dir.appendingPathComponent("cut.gguf")
        try Data(try Data(contentsOf: model).prefix(5_000_000)).write(to: cut)

        var r = try vist2ctl(["generate", "--local", "--model", "/nonexistent/model.gguf", "hi"])
        #expect(r.status != 0 && r.err.contains("model_not_found") && r.err.contains("/nonexistent/model.gguf"))
        r = try vist2ctl(["generate", "--local", "--model", junk.path, "hi"])
        #expect(r.status != 0 && r.err.contains(junk.path), "\(r.err)")
        r = try vist2ctl(["generate", "--local", "--model", cut.path, "--json", "hi"])
        #expect(r.status != 0)
        let e = try json(r.err)["error"] as? [String: String]
        #expect(e?["code"] == "model_truncated", "\(r.err)")
        #expect(e?["message"]?.contains("cut.gguf") == true)
        r = try vist2ctl(["generate", "--local", "--temperature", "-1", "hi"])
        #expect(r.status != 0 && r.err.contains("temperature"))
        r = try vist2ctl(["generate", "--local", "--top-p", "1.5", "hi"])
        #expect(r.status != 0 && r.err.contains("top-p"))
        r = try vist2ctl(["generate", "--local", "--max-tokens=-3", "hi"])
        #expect(r.status != 0 && r.err.contains("max tokens"))
        r = try vist2ctl(["generate", "--local", "--threads", "0", "hi"])
        #expect(r.status != 0 && r.err.contains("--threads"))
        r = try vist2ctl(["generate", "hi"])
        #expect(r.status != 0 && r.err.contains("--local"))
        r = try vist2ctl(["perplexity", "--ctx", "100000", "/usr/share/common-licenses/GPL-3"])
        #expect(r.status != 0 && r.err.contains("--ctx"))
        r = try vist2ctl(["perplexity", "--ctx", "4096", "/usr/share/common-licenses/Apache-2.0"])
        #expect(r.status != 0 && r.err.contains("too_few_tokens"))
        r = try vist2ctl(["perplexity", "/nonexistent.txt"])
        #expect(r.status != 0 && r.err.contains("/nonexistent.txt"))
        r = try vist2ctl(["bench", "--local", "-p", "0", "-n", "0"])
        #expect(r.status != 0 && r.err.contains("-p"))
        r = try vist2ctl(["frobnicate"])
        #expect(r.status != 0)
    }
}
