import Foundation
import Testing
import VistEngine

/// Runs vist2ctl from the same build directory as this test bundle (as `user`, through setpriv,
/// when given: the test then runs as root).
func vist2ctl(_ args: [String], env: [String: String] = [:], user: String? = nil) throws -> (status: Int32, out: String, err: String) {
    try tool("vist2ctl", args, env: env, user: user)
}

/// Runs one of the package's executables (vist2ctl, vist2-render) from this test bundle's build
/// directory.
func tool(
    _ name: String, _ args: [String], env: [String: String] = [:], user: String? = nil
) throws -> (status: Int32, out: String, err: String) {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    // On Linux the test runner is <build>/vist2PackageTests.xctest; the executables sit beside it.
    if !FileManager.default.fileExists(atPath: dir.appendingPathComponent(name).path) {
        dir = Bundle.main.bundleURL.deletingLastPathComponent()
    }
    let p = Process()
    p.executableURL = dir.appendingPathComponent(name)
    p.arguments = args
    if let user {
        // A copy other users can reach (the build directory may lie under a private home).
        let copy = "/tmp/\(name)-tests-\(getpid())"
        if !FileManager.default.fileExists(atPath: copy) {
            try FileManager.default.copyItem(atPath: p.executableURL!.path, toPath: copy)
            chmod(copy, 0o755)
        }
        guard let pw = getpwnam(user) else { throw CocoaError(.fileNoSuchFile, userInfo: [NSFilePathErrorKey: "user \(user)"]) }
        p.arguments = ["--reuid=\(pw.pointee.pw_uid)", "--regid=\(pw.pointee.pw_gid)", "--clear-groups", copy] + args
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
    }
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
        let r = try vist2ctl(["tokenize", "--local", "--json", "Hello world"])
        #expect(r.status == 0)
        #expect(try json(r.out)["ids"] as? [Int] == [19556, 905])
    }

    @Test("A VIST2 model's text commands run its backbone adapter when its scope is all, and the bare backbone when visual")
    func adapterScopes() throws {
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2lora-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: dir) }
        func ppl(_ model: String) throws -> Double {
            let r = try vist2ctl(["perplexity", "--local", "--model", model, "--ctx", "32", "--json", "/usr/share/common-licenses/BSD"])
            #expect(r.status == 0, "\(r.err)")
            return try #require(try json(r.out)["perplexity"] as? Double)
        }
        var models: [String: String] = [:]
        for scope in ["visual", "all"] {
            let m = dir.appendingPathComponent(scope)
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try FileManager.default.copyItem(at: URL(fileURLWithPath: Self.tinyVIST2), to: m)
            let cfgURL = m.appendingPathComponent("config.json")
            var cfg = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: cfgURL)) as? [String: Any])
            cfg["adapter"] = ["path": "adapter", "scope": scope]
            try JSONSerialization.data(withJSONObject: cfg).write(to: cfgURL)
            models[scope] = m.path
        }
        let bare = try ppl(Self.tinyVIST2)
        #expect(try ppl(models["visual"]!) == bare)
        #expect(try ppl(models["all"]!) != bare)
    }

    @Test("perplexity --json follows llama-perplexity's windows")
    func perplexity() throws {
        let r = try vist2ctl(["perplexity", "--local", "--ctx", "128", "--json", "/usr/share/common-licenses/Apache-2.0"])
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

    /// The tiny VIST2 model of the engine tests' fixtures (its font is Debian's DejaVu Sans Mono).
    static var tinyVIST2: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("VistEngineTests/Fixtures/tiny-vist2").path
    }

    @Test("eval --json reports OCR accuracy and the three perplexities with retention; bad arguments are refused")
    func eval() throws {
        let doc = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-eval-\(UUID().uuidString).txt")
        defer { try? FileManager.default.removeItem(at: doc) }
        let text = try String(contentsOfFile: "/usr/share/common-licenses/Apache-2.0", encoding: .utf8)
        try String(text.prefix(1500)).write(to: doc, atomically: true, encoding: .utf8)
        let r = try vist2ctl(["eval", "--model", Self.tinyVIST2, "--context-chunks", "2", "--max-chunks", "5", "--json", doc.path])
        #expect(r.status == 0, "\(r.err)")
        let j = try json(r.out)
        for key in ["ocr_char_accuracy", "ppl_none", "ppl_text", "ppl_visual", "retention", "chunks"] {
            #expect(j.keys.contains(key), "\(key)")
        }
        #expect(j["chunks"] as? Int == 5 && j["pairs"] as? Int == 4 && j["context_chunks"] as? Int == 2)
        let acc = try #require(j["ocr_char_accuracy"] as? Double)
        #expect((0...1).contains(acc))
        for key in ["ppl_none", "ppl_text", "ppl_visual"] { #expect(((j[key] as? Double) ?? 0) > 1, "\(key)") }
        // The retention is what its definition says of the three perplexities (or null).
        if let ret = j["retention"] as? Double {
            let (a, b, c) = (j["ppl_none"] as! Double, j["ppl_text"] as! Double, j["ppl_visual"] as! Double)
            #expect(abs(ret - (a - c) / (a - b)) < 1e-9)
        } else {
            #expect(j["retention"] is NSNull)
        }
        #expect(!j.keys.contains("transcriptions"))
        // --show: one transcription per chunk, the same numbers.
        let shown = try json(
            try vist2ctl(["eval", "--model", Self.tinyVIST2, "--context-chunks", "2", "--max-chunks", "5", "--show", "--json", doc.path])
                .out)
        #expect((shown["transcriptions"] as? [String])?.count == 5 && shown["ocr_char_accuracy"] as? Double == acc)
        let text5 = try vist2ctl(["eval", "--model", Self.tinyVIST2, "--max-chunks", "2", "--show", doc.path])
        #expect(text5.status == 0 && text5.out.contains("--- chunk 1 as read from its sketch image"))
        let plain = try vist2ctl(["eval", "--model", "smollm2-135m", "--json", doc.path])
        #expect(plain.status == 1 && plain.err.contains("not a VIST2 model directory"))
        let bad = try vist2ctl(["eval", "--model", Self.tinyVIST2, "--context-chunks", "0", doc.path])
        #expect(bad.status != 0 && bad.err.contains("--context-chunks"))
        let missing = try vist2ctl(["eval", "--model", Self.tinyVIST2, "--json", doc.path + ".missing"])
        #expect(missing.status == 1 && missing.err.contains("\"io\""))
    }

    @Test(
        "dataset writes every chunk's image, token ids and character cells (or text only, which vist2-render renders into the same files); export-backbone writes a loadable checkpoint"
    )
    func trainingData() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-ds-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let text = try String(contentsOfFile: "/usr/share/common-licenses/Apache-2.0", encoding: .utf8)
        let lines = [["id": "a", "text": String(text.prefix(900))], ["id": "b", "text": "short\ttext\n"]].map {
            String(data: try! JSONSerialization.data(withJSONObject: $0), encoding: .utf8)!
        }
        let corpus = dir.appendingPathComponent("c.jsonl")
        // A blank line between the documents, and no newline after the last one.
        try lines.joined(separator: "\n\n").write(to: corpus, atomically: true, encoding: .utf8)
        let out = dir.appendingPathComponent("ds").path
        let r = try vist2ctl(["dataset", "--model", Self.tinyVIST2, "--out", out, "--json", corpus.path])
        #expect(r.status == 0, "\(r.err)")
        let meta = try json(r.out)
        let n = try #require(meta["chunks"] as? Int)
        #expect(meta["documents"] as? Int == 2 && n > 2)
        let images = try Data(contentsOf: URL(fileURLWithPath: out + "/images.u8"))
        #expect(images.count == n * 64 * 128)
        let records = try String(contentsOfFile: out + "/chunks.jsonl", encoding: .utf8).split(separator: "\n").map { try json(String($0)) }
        #expect(records.count == n)
        #expect(records.filter { $0["doc"] as? String == "a" }.compactMap { $0["text"] as? String }.joined() == String(text.prefix(900)))
        let last = records[n - 1]
        #expect(last["text"] as? String == "short\ttext\n" && last["index"] as? Int == 0)
        // Token ids are the backbone's; cells are [scalar, x, y, advance] of the 9 drawn characters.
        let tk = try json(try vist2ctl(["tokenize", "--local", "--model", Self.tinyVIST2, "--no-special", "--json", "short\ttext\n"]).out)
        #expect((last["tokens"] as? [Int]) == (tk["ids"] as? [Int]))
        let cells = try #require(last["cells"] as? [Int])
        #expect(cells.count == 4 * 9 && cells[0] == 0 && cells[4 * 5] == 6)

        // Cut and tokenized here, rendered by vist2-render (a training machine without Swift):
        // the same files, byte for byte.
        let textOnly = dir.appendingPathComponent("text").path
        let t = try vist2ctl(["dataset", "--model", Self.tinyVIST2, "--out", textOnly, "--text-only", "--json", corpus.path])
        #expect(t.status == 0, "\(t.err)")
        #expect(try json(t.out)["text_only"] as? Bool == true && !FileManager.default.fileExists(atPath: textOnly + "/images.u8"))
        #expect(!(try String(contentsOfFile: textOnly + "/chunks.jsonl", encoding: .utf8)).contains("\"cells\""))
        let font = dir.appendingPathComponent("font.ttf").path
        try FileManager.default.copyItem(atPath: "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", toPath: font)
        let config = Self.tinyVIST2 + "/config.json"
        let rendered = dir.appendingPathComponent("rendered").path
        let v = try tool("vist2-render", ["dataset", "--config", config, "--font", font, "--out", rendered, textOnly])
        #expect(v.status == 0, "\(v.err)")
        for f in ["images.u8", "chunks.jsonl", "meta.json"] {
            #expect(FileManager.default.contents(atPath: out + "/" + f) == FileManager.default.contents(atPath: rendered + "/" + f), "\(f)")
        }
        // Refused, each with its code: a rendered directory, another geometry, another font,
        // records that disagree with meta.json.
        let again = try tool("vist2-render", ["dataset", "--config", config, "--out", rendered + "2", out])
        #expect(again.status == 1 && again.err.contains("[bad_dataset]") && again.err.contains("already rendered"))
        let other = dir.appendingPathComponent("other.json").path
        var cfg = try json(try String(contentsOfFile: config, encoding: .utf8))
        var render = try #require(cfg["render"] as? [String: Any])
        render["line_height"] = 10
        render["font"] = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
        cfg["render"] = render
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: other))
        let geometry = try tool("vist2-render", ["dataset", "--config", other, "--out", rendered + "2", textOnly])
        #expect(geometry.status == 1 && geometry.err.contains("another geometry"))
        let wrongFont = try tool(
            "vist2-render",
            ["dataset", "--config", config, "--font", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "--out", rendered + "2", textOnly])
        #expect(wrongFont.status == 1 && wrongFont.err.contains("[font_mismatch]"))
        let written = try String(contentsOfFile: textOnly + "/chunks.jsonl", encoding: .utf8)
        try String(written.split(separator: "\n").dropLast().joined(separator: "\n")).write(
            toFile: textOnly + "/chunks.jsonl", atomically: true, encoding: .utf8)
        let short = try tool("vist2-render", ["dataset", "--config", config, "--out", rendered + "2", textOnly])
        #expect(short.status == 1 && short.err.contains("meta.json says"))
        let png = try tool("vist2-render", ["png", "--config", config, "--out", dir.appendingPathComponent("a.png").path, corpus.path])
        #expect(
            png.status == 0
                && (FileManager.default.contents(atPath: dir.appendingPathComponent("a.png").path)?.prefix(4)).map(Array.init) == [
                    0x89, 0x50, 0x4E, 0x47,
                ])

        let bad = dir.appendingPathComponent("bad.jsonl")
        try "{\"id\": 1}\n".write(to: bad, atomically: true, encoding: .utf8)
        let before = ["images.u8", "chunks.jsonl", "meta.json"].map { FileManager.default.contents(atPath: out + "/" + $0) }
        let b = try vist2ctl(["dataset", "--model", Self.tinyVIST2, "--out", out, bad.path])
        #expect(b.status == 1 && b.err.contains("bad.jsonl:1"))
        // The dataset already there is as it was, and no partial file is left behind.
        #expect(["images.u8", "chunks.jsonl", "meta.json"].map { FileManager.default.contents(atPath: out + "/" + $0) } == before)
        #expect(try FileManager.default.contentsOfDirectory(atPath: out).sorted() == ["chunks.jsonl", "images.u8", "meta.json"])

        let hf = dir.appendingPathComponent("hf").path
        let e = try vist2ctl(["export-backbone", "--model", Self.tinyVIST2, "--json", hf])
        #expect(e.status == 0, "\(e.err)")
        try FileManager.default.copyItem(atPath: Self.tinyVIST2 + "/backbone/tokenizer.json", toPath: hf + "/tokenizer.json")
        let p1 = try vist2ctl(["perplexity", "--local", "--model", hf, "--ctx", "64", "--json", "/usr/share/common-licenses/Apache-2.0"])
        let p2 = try vist2ctl([
            "perplexity", "--local", "--model", Self.tinyVIST2, "--ctx", "64", "--json", "/usr/share/common-licenses/Apache-2.0",
        ])
        #expect(p1.status == 0 && p2.status == 0, "\(p1.err) \(p2.err)")
        #expect(try json(p1.out)["perplexity"] as? Double == (try json(p2.out)["perplexity"] as? Double))
    }

    @Test("render writes one PNG per chunk, a contact sheet, raw tensors and the statistics")
    func render() throws {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-render-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: out) }
        let r = try vist2ctl([
            "render", "--local", "--model", Self.tinyVIST2, "--out", out, "--raw", "--json", "/usr/share/common-licenses/Apache-2.0",
        ])
        #expect(r.status == 0, "\(r.err)")
        let j = try json(r.out)
        let chunks = try #require(j["chunks"] as? Int)
        #expect(chunks > 10)
        #expect(j["visual_tokens"] as? Int == chunks * 8)
        #expect(((j["ratio"] as? Double) ?? 0) > 1)
        #expect(j["characters"] as? Int == (try String(contentsOfFile: "/usr/share/common-licenses/Apache-2.0", encoding: .utf8)).count)
        for name in ["chunk-000.png", "chunk-000.f32", "contact-sheet.png", "chunks.json", String(format: "chunk-%03d.png", chunks - 1)] {
            #expect(FileManager.default.fileExists(atPath: out + "/" + name), "\(name)")
        }
        let raw = try Data(contentsOf: URL(fileURLWithPath: out + "/chunk-000.f32"))
        #expect(raw.count == 64 * 128 * 4)
        // The chunks put together are the document.
        let list = try #require(j["chunk_list"] as? [[String: Any]])
        #expect(
            list.compactMap { $0["text"] as? String }.joined()
                == (try String(contentsOfFile: "/usr/share/common-licenses/Apache-2.0", encoding: .utf8)))
        let bad = try vist2ctl(["render", "--local", "--model", "smollm2-135m", "/usr/share/common-licenses/Apache-2.0"])
        #expect(bad.status != 0 && bad.err.contains("not a VIST2 model directory"))
    }

    @Test("generate --doc reports compression figures; --full-text reads the same documents as text")
    func generateWithDocuments() throws {
        let doc = "/usr/share/common-licenses/GPL-3"
        let text = try String(contentsOfFile: doc, encoding: .utf8)
        let small = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-doc-\(UUID().uuidString).txt")
        try String(text.prefix(300)).write(to: small, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: small) }
        let base = ["generate", "--local", "--model", Self.tinyVIST2, "--doc", small.path, "--max-tokens", "70", "--ignore-eos", "--json"]
        let c = try vist2ctl(base + ["Summarize:"])
        #expect(c.status == 0, "\(c.err)")
        let cj = try json(c.out)
        for key in [
            "doc_text_tokens", "visual_tokens", "compression_ratio", "kv_bytes", "kv_bytes_final", "flops", "render_ms", "vision_ms",
            "ttft_ms", "swaps", "swap_ms",
        ] {
            #expect(cj[key] != nil, "\(key)")
        }
        #expect(cj["mode"] as? String == "vist2" && (cj["visual_tokens"] as? Int ?? 0) > 0)
        #expect(cj["generated_tokens"] as? Int == 70 && (cj["swaps"] as? Int ?? 0) >= 1)
        // The swaps' time is part of the decoding time.
        let swapMs = cj["swap_ms"] as? Double ?? 0
        #expect(swapMs > 0 && swapMs <= cj["decode_ms"] as? Double ?? 0)
        let f = try vist2ctl(base + ["--full-text", "Summarize:"])
        #expect(f.status == 0, "\(f.err)")
        let fj = try json(f.out)
        #expect(fj["mode"] as? String == "full-text")
        #expect((fj["kv_bytes"] as? Int ?? 0) > (cj["kv_bytes"] as? Int ?? 0))
        let e = try vist2ctl(["generate", "--local", "--model", "smollm2-135m", "--doc", small.path, "hi"])
        #expect(e.status != 0 && e.err.contains("VIST2 model directory"))
    }

    /// vist2d (beside this test bundle) on the tiny model, started and listening on `socket`.
    static func startDaemon(socket: String, cacheDir: URL, extra: [String] = []) throws -> Process {
        let d = Process()
        var exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("vist2d")
        if !FileManager.default.fileExists(atPath: exe.path) {
            exe = Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("vist2d")
        }
        d.executableURL = exe
        d.arguments = ["--model", tinyVIST2, "--socket", socket, "--threads", "1", "--cache-dir", cacheDir.path] + extra
        d.standardError = FileHandle.nullDevice
        try d.run()
        var waited = 0
        while !FileManager.default.fileExists(atPath: socket) && waited < 300 {
            usleep(100_000)
            waited += 1
        }
        return d
    }

    @Test("vist2d serves vist2ctl status and generate over its socket, and exits 0 on SIGTERM")
    func daemon() throws {
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2cli-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: dir) }
        let sock = dir.appendingPathComponent("vist2.sock").path
        let d = try Self.startDaemon(socket: sock, cacheDir: dir.appendingPathComponent("cache"))
        defer { if d.isRunning { d.terminate() } }
        let s = try vist2ctl(["status", "--socket", sock, "--json"])
        #expect(s.status == 0, "\(s.err)")
        #expect(try json(s.out)["state"] as? String == "ready")
        let g = try vist2ctl(["generate", "--socket", sock, "--max-tokens", "12", "--temperature", "0", "--json", "Hello"])
        #expect(g.status == 0, "\(g.err)")
        #expect(try json(g.out)["generated_tokens"] as? Int == 12)
        // Documents: compress fills the cache, generate --doc then reads every block from it.
        let doc = dir.appendingPathComponent("doc.txt")
        try Data(try Data(contentsOf: URL(fileURLWithPath: "/usr/share/common-licenses/Apache-2.0")).prefix(1000)).write(to: doc)
        let c1 = try vist2ctl(["compress", "--socket", sock, "--json", doc.path])
        #expect(c1.status == 0, "\(c1.err)")
        let cj = try json(c1.out)
        let finished = (cj["chunks"] as? Int ?? 0) - 1
        #expect(finished > 10 && cj["chunks_encoded"] as? Int == finished)
        // The same compression in this process: the same figures and keys, nothing cached.
        let cl = try vist2ctl(["compress", "--local", "--model", Self.tinyVIST2, "--json", doc.path])
        let clj = try json(cl.out)
        #expect(cl.status == 0 && Set(clj.keys) == Set(cj.keys), "\(cl.err)")
        for key in ["chunks", "text_tokens", "visual_tokens", "chunks_encoded"] { #expect(clj[key] as? Int == cj[key] as? Int, "\(key)") }
        #expect(clj["prefix_cache_hits"] as? Int == 0 && clj["file"] as? String == doc.path)
        let gd = try vist2ctl(["generate", "--socket", sock, "--doc", doc.path, "--max-tokens", "8", "--temperature", "0", "--json", ""])
        #expect(gd.status == 0, "\(gd.err)")
        let gj = try json(gd.out)
        let kvBytes = gj["kv_bytes"] as? Int ?? 0
        #expect(gj["prefix_cache_hits"] as? Int == finished && gj["mode"] as? String == "vist2" && kvBytes > 0)
        let st = try vist2ctl(["cache", "stats", "--socket", sock, "--json"])
        let entries = try json(st.out)["entries"] as? Int
        #expect(st.status == 0 && entries == 2 * finished)
        let ls = try vist2ctl(["cache", "ls", "--socket", sock, "--json", "--limit", "2"])
        let listed = (try json(ls.out)["entries"] as? [Any])?.count
        #expect(ls.status == 0 && listed == 2)
        let mt = try vist2ctl(["metrics", "--socket", sock])
        #expect(mt.status == 0 && mt.out.contains("vist2_cache_hits_total{level=\"prefix\"} \(finished)"))
        // Either backend, one output: the same JSON keys from the daemon as from --local, and
        // render writes the same files (the PNGs decode to the same pixels: the .f32 tensors match).
        let gl = try vist2ctl([
            "generate", "--local", "--model", Self.tinyVIST2, "--kv-type", "f16", "--doc", doc.path, "--max-tokens", "8",
            "--temperature", "0", "--json", "",
        ])
        let glj = try json(gl.out)
        #expect(gl.status == 0 && Set(glj.keys) == Set(gj.keys), "\(gl.err)")
        #expect(glj["text"] as? String == gj["text"] as? String && glj["kv_bytes"] as? Int == kvBytes)
        let plain = try vist2ctl(["generate", "--socket", sock, "--max-tokens", "4", "--temperature", "0", "--json", "Hi"])
        let plainLocal = try vist2ctl([
            "generate", "--local", "--model", Self.tinyVIST2, "--max-tokens", "4", "--temperature", "0", "--json", "Hi",
        ])
        #expect(Set(try json(plain.out).keys) == Set(try json(plainLocal.out).keys), "\(plain.err) \(plainLocal.err)")
        let rdOut = dir.appendingPathComponent("r").path, rlOut = dir.appendingPathComponent("rl").path
        let rd = try vist2ctl(["render", "--socket", sock, "--out", rdOut, "--raw", "--json", doc.path])
        let rl = try vist2ctl(["render", "--local", "--model", Self.tinyVIST2, "--out", rlOut, "--raw", "--json", doc.path])
        let rdj = try json(rd.out), rlj = try json(rl.out)
        #expect(rd.status == 0 && rdj["chunks"] as? Int == finished + 1, "\(rd.err)")
        #expect(rl.status == 0 && rlj["characters"] as? Int == rdj["characters"] as? Int, "\(rl.err)")
        func chunkList(_ j: [String: Any]) -> [String] {
            (j["chunk_list"] as? [[String: Any]] ?? []).map {
                "\($0["text"] ?? "") \($0["tokens"] ?? "") \($0["rows"] ?? "") \($0["missing_glyphs"] ?? "")"
            }
        }
        #expect(!chunkList(rdj).isEmpty && chunkList(rdj) == chunkList(rlj))
        for name in ["contact-sheet.png", "chunks.json", "chunk-000.f32", String(format: "chunk-%03d.f32", finished)] {
            let a = FileManager.default.contents(atPath: rdOut + "/" + name), b = FileManager.default.contents(atPath: rlOut + "/" + name)
            #expect(a != nil && (name == "chunks.json" || a == b), "\(name)")
        }
        let tk = try vist2ctl(["tokenize", "--socket", sock, "--json", "Hello world"])
        let tkl = try vist2ctl(["tokenize", "--local", "--model", Self.tinyVIST2 + "/backbone", "--json", "Hello world"])
        #expect(tk.status == 0 && tk.out == tkl.out, "\(tk.err) \(tkl.err)")
        let bn = try vist2ctl(["bench", "--socket", sock, "-p", "16", "-n", "4", "-r", "1", "--json"])
        #expect(bn.status == 0, "\(bn.err)")
        #expect(try json(bn.out)["tg_tokens"] as? Int == 4)
        let pp = try vist2ctl(["perplexity", "--socket", sock, "--ctx", "64", "--json", doc.path])
        #expect(pp.status == 0, "\(pp.err)")
        let ppl = try json(pp.out)["perplexity"] as? Double ?? 0
        #expect(ppl > 1)
        // A second daemon on the same cache directory refuses to start, and says why.
        let second = Process()
        second.executableURL = d.executableURL
        second.arguments = [
            "--model", Self.tinyVIST2, "--socket", dir.appendingPathComponent("second.sock").path, "--threads", "1",
            "--cache-dir", dir.appendingPathComponent("cache").path,
        ]
        let secondErr = Pipe()
        second.standardError = secondErr
        try second.run()
        second.waitUntilExit()
        let why = String(decoding: secondErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(second.terminationStatus == 1 && why.contains("using the cache directory"), "\(why)")
        let rm = try vist2ctl(["cache", "rm", "--socket", sock, "--all", "--json"])
        let removed = try json(rm.out)["removed"] as? Int
        #expect(rm.status == 0 && removed == 2 * finished)
        d.terminate()  // SIGTERM
        d.waitUntilExit()
        #expect(d.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: sock))
        let none = try vist2ctl(["status", "--socket", sock])
        #expect(none.status != 0 && none.err.contains(sock))
    }

    @Test(
        "Cache entries belong to the peer's uid: another user gets no hits and cannot evict them; --shared entries are common",
        .enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")),
        .enabled(if: getpwnam("nobody") != nil && getpwnam("daemon") != nil))
    func cacheOwnership() throws {
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2own-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        chmod(dir.path, 0o755)
        defer {
            try? FileManager.default.removeItem(at: dir)
            try? FileManager.default.removeItem(atPath: "/tmp/vist2ctl-tests-\(getpid())")
        }
        let sock = dir.appendingPathComponent("vist2.sock").path
        let d = try Self.startDaemon(
            socket: sock, cacheDir: dir.appendingPathComponent("cache"), extra: ["--allow-user", "nobody", "--allow-user", "daemon"])
        defer { if d.isRunning { d.terminate() } }
        chmod(sock, 0o666)  // the daemon makes it owner-only; here the allow list is what admits
        let doc = dir.appendingPathComponent("doc.txt")
        try Data(try Data(contentsOf: URL(fileURLWithPath: "/usr/share/common-licenses/Apache-2.0")).prefix(1000)).write(to: doc)
        chmod(doc.path, 0o644)
        func run(_ user: String?, _ args: [String]) throws -> [String: Any] {
            let r = try vist2ctl(args + ["--socket", sock, "--json"], user: user)
            #expect(r.status == 0, "\(user ?? "root") \(args): \(r.err)")
            return try json(r.out)
        }
        func entries(_ user: String?) throws -> [[String: Any]] { try run(user, ["cache", "ls"])["entries"] as? [[String: Any]] ?? [] }
        let nobody = Int(getpwnam("nobody").pointee.pw_uid), daemon = Int(getpwnam("daemon").pointee.pw_uid)

        // nobody compresses; daemon compressing the same text finds none of nobody's entries.
        let first = try run("nobody", ["compress", doc.path])
        let finished = (first["chunks"] as? Int ?? 0) - 1
        #expect(finished > 5 && first["chunks_encoded"] as? Int == finished)
        let other = try run("daemon", ["compress", doc.path])
        #expect(other["chunks_encoded"] as? Int == finished && other["chunk_cache_hits"] as? Int == 0)
        #expect(other["prefix_cache_hits"] as? Int == 0)
        #expect(try run("nobody", ["compress", doc.path])["prefix_cache_hits"] as? Int == finished)
        // Each sees only their own entries (and their own hit counts); root sees both users'.
        let mine = try entries("nobody")
        #expect(mine.count == 2 * finished && mine.allSatisfy { $0["owner_uid"] as? Int == nobody && $0["shared"] as? Bool == false })
        #expect(try entries("daemon").allSatisfy { $0["owner_uid"] as? Int == daemon })
        #expect(try run("daemon", ["cache", "stats"])["hits"] as? Int == 0)
        #expect(Set(try entries(nil).compactMap { $0["owner_uid"] as? Int }) == [nobody, daemon])
        // daemon cannot evict nobody's entries, one by one or with --all.
        let key = mine[0]["key"] as? String ?? ""
        let denied = try vist2ctl(["cache", "rm", "--socket", sock, key], user: "daemon")
        #expect(denied.status != 0 && denied.err.contains("another user"), "\(denied.err)")
        #expect(try run("daemon", ["cache", "rm", "--all"])["removed"] as? Int == 2 * finished)
        #expect(try entries("nobody").count == 2 * finished)
        // Shared: nobody fills the shared namespace, daemon's generate --shared starts from it.
        let shared = try run("nobody", ["compress", "--shared", doc.path])
        #expect(shared["chunks_encoded"] as? Int == finished)
        let g = try run("daemon", ["generate", "--shared", "--doc", doc.path, "--max-tokens", "2", "--temperature", "0", ""])
        #expect(g["prefix_cache_hits"] as? Int == finished)
        let seen = try entries("daemon")
        #expect(seen.count == 2 * finished && seen.allSatisfy { $0["shared"] as? Bool == true && $0["owner_uid"] as? Int == nobody })
        #expect(try run("daemon", ["cache", "rm", "--all"])["removed"] as? Int == 0)
        // The owner of shared entries, and root, may evict them.
        #expect(try run("nobody", ["cache", "rm", "--all"])["removed"] as? Int == 4 * finished)
        #expect(try run(nil, ["cache", "stats"])["entries"] as? Int == 0)
        d.terminate()
        d.waitUntilExit()
        #expect(d.terminationStatus == 0)
    }

    @Test("Bad arguments and bad models fail with a clear message and a non-zero status")
    func errors() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let junk = dir.appendingPathComponent("junk.gguf")
        try Data("GGUF this is not really a model".utf8).write(to: junk)
        let model = try ModelStore.resolve("smollm2-135m")
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
        r = try vist2ctl(["generate", "--socket", "/tmp/no-vist2-here/vist2.sock", "hi"])
        #expect(r.status != 0 && r.err.contains("/tmp/no-vist2-here/vist2.sock") && r.err.contains("vist2d"))
        r = try vist2ctl(["bench", "--socket", "/tmp/no-vist2-here/vist2.sock", "-p", "8", "-n", "0"])
        #expect(r.status != 0 && r.err.contains("/tmp/no-vist2-here/vist2.sock"))
        // With --json, no daemon is an error object like every other, for every daemon command.
        for command in [["status"], ["metrics"], ["cache", "stats"], ["cache", "ls"], ["generate", "hi"], ["tokenize", "hi"]] {
            r = try vist2ctl(command + ["--socket", "/tmp/no-vist2-here/vist2.sock", "--json"])
            let e = try json(r.err)["error"] as? [String: String]
            #expect(r.status == 1 && e?["code"] == "daemon_unavailable", "\(command): \(r.err)")
            #expect(e?["message"]?.contains("/tmp/no-vist2-here/vist2.sock") == true)
        }
        r = try vist2ctl(["perplexity", "--local", "--ctx", "100000", "/usr/share/common-licenses/GPL-3"])
        #expect(r.status != 0 && r.err.contains("--ctx"))
        r = try vist2ctl(["perplexity", "--local", "--ctx", "4096", "/usr/share/common-licenses/Apache-2.0"])
        #expect(r.status != 0 && r.err.contains("too_few_tokens"))
        r = try vist2ctl(["perplexity", "--local", "/nonexistent.txt"])
        #expect(r.status != 0 && r.err.contains("/nonexistent.txt"))
        r = try vist2ctl(["bench", "--local", "-p", "0", "-n", "0"])
        #expect(r.status != 0 && r.err.contains("-p"))
        r = try vist2ctl(["frobnicate"])
        #expect(r.status != 0)
        // With --json, arguments the parser refuses are JSON errors too; options of the local
        // engine are refused when the daemon would answer (it runs its own model).
        for args in [
            ["generate", "--json"], ["bench", "-p", "x", "--json"], ["cache", "rm", "--json"], ["status", "--bogus", "--json"],
        ] {
            r = try vist2ctl(args)
            let e = try json(r.err)["error"] as? [String: String]
            #expect(r.status != 0 && e?["code"] == "bad_argument" && e?["message"]?.isEmpty == false, "\(args): \(r.err)")
        }
        for option in [["--model", "default"], ["--threads", "1"], ["--kv-type", "f32"]] {
            r = try vist2ctl(["tokenize", "--socket", "/tmp/no-vist2-here/vist2.sock", "--json", "hi"] + option)
            let e = try json(r.err)["error"] as? [String: String]
            #expect(r.status == 1 && e?["code"] == "bad_argument" && e?["message"]?.contains(option[0]) == true, "\(r.err)")
        }
        r = try vist2ctl(["generate", "--local", "--shared", "--json", "hi"])
        var code = (try json(r.err)["error"] as? [String: String])?["code"]
        #expect(r.status == 1 && code == "bad_argument", "\(r.err)")
        r = try vist2ctl(["render", "--local", "--out", "/proc/no-such-dir/x", "--json", "/usr/share/common-licenses/Apache-2.0"])
        code = (try json(r.err)["error"] as? [String: String])?["code"]
        #expect(r.status == 1 && code == "io", "\(r.err)")
    }
}
