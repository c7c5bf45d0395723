import Foundation
import Testing
import VistFormats

@testable import VistEngine

/// The backbone adapter (PEFT LoRA) on the tiny model: adapters written by Hugging Face PEFT
/// itself (Training/make_tiny_golden.py), checked against the reference, which the script checks
/// against transformers + PEFT.
@Suite("Backbone adapters (PEFT LoRA)", .serialized)
struct LoRATests {
    struct PEFTGolden: Decodable {
        let text: String
        let rows: Int
        let vocab: Int
    }

    static func adapterDir(_ name: String) -> URL { TinyVIST2Golden.directory.appendingPathComponent(name) }

    /// Logits of every row of `tokens` run as text through `model`'s backbone.
    static func textLogits(_ model: VIST2Model, _ tokens: [Int32]) -> [Float] {
        let tf = model.language.transformer
        let cache = tf.makeCache(capacity: tokens.count)
        let logits = tf.forward(tokens, cache: cache, workspace: tf.makeWorkspace(), logits: .all).logits
        return (0..<logits.rows).flatMap { Array(logits.row($0)) }
    }

    @Test("Adapters saved by PEFT load with their rank, scaling, modules and layers, and match the reference on every row")
    func peftAdapters() throws {
        for (name, rank, scale, targets, layers) in [
            ("adapter", 4, Float(2), LoRAAdapter.Target.allCases, [0, 1]),
            ("adapter-partial", 2, Float(3 / 2.0.squareRoot()), [.q, .v, .down], [1]),
            ("adapter-bf16", 4, Float(2), LoRAAdapter.Target.allCases, [0, 1]),
        ] as [(String, Int, Float, [LoRAAdapter.Target], [Int])] {
            let (model, dir) = try VIST2Tests.patchedModel(["adapter": ["path": name, "scope": "all"]])
            defer { try? FileManager.default.removeItem(at: dir) }
            let a = try #require(model.adapter)
            #expect(a.rank == rank && abs(a.scale - scale) < 1e-6 && a.targets == targets && a.layers == layers, "\(name)")
            // The factors keep the file's type.
            let p = try #require(a.pairs[layers[0]][targets[0].rawValue])
            #expect([p.a.type, p.b.type, p.bt.type] == Array(repeating: name.hasSuffix("bf16") ? .bf16 : .f32, count: 3), "\(name)")
            let g = try JSONDecoder().decode(
                PEFTGolden.self, from: Data(contentsOf: Self.adapterDir(name).appendingPathComponent("peft-logits.json")))
            let raw = try Data(contentsOf: Self.adapterDir(name).appendingPathComponent("peft-logits.f32"))
            let golden = raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            // The tiny vocabulary is byte-level without merges: token id = byte.
            let tokens = g.text.utf8.map { Int32($0) }
            #expect(tokens.count == g.rows && golden.count == g.rows * g.vocab)
            let got = Self.textLogits(model, tokens)
            var maxErr: Float = 0
            for i in 0..<golden.count { maxErr = max(maxErr, abs(got[i] - golden[i]) / max(1, abs(golden[i]))) }
            #expect(maxErr < 1e-4, "\(name): max relative logit error \(maxErr)")
            // One token at a time (the decode path, matrix-vector products) agrees as well, with
            // its small steps on the calling thread (as the tiny model's are) and split over the pool.
            let tf = model.language.transformer
            for serialMACs in [LoRAAdapter.serialMACs, 0] {
                let saved = LoRAAdapter.serialMACs
                LoRAAdapter.serialMACs = serialMACs
                defer { LoRAAdapter.serialMACs = saved }
                let cache = tf.makeCache(capacity: tokens.count)
                let ws = tf.makeWorkspace()
                var stepErr: Float = 0
                for (t, id) in tokens.enumerated() {
                    let row = tf.decode([id], caches: [cache], workspace: ws).logits.row(0)
                    for v in 0..<g.vocab {
                        stepErr = max(stepErr, abs(row[v] - golden[t * g.vocab + v]) / max(1, abs(golden[t * g.vocab + v])))
                    }
                }
                #expect(stepErr < 1e-4, "\(name): decode path (serial below \(serialMACs) MACs) max relative logit error \(stepErr)")
            }
        }
    }

    @Test("A visual-scope adapter leaves text rows bit-identical to the bare backbone and changes visual rows; scope all changes text rows")
    func scopes() throws {
        // Its own bare model: VIST2Tests' shared one runs in that suite at the same time.
        let bare = try VIST2Model(directory: TinyVIST2Golden.directory, threads: 2)
        let (visual, vdir) = try VIST2Tests.patchedModel(["adapter": ["path": "adapter", "scope": "visual"]])
        defer { try? FileManager.default.removeItem(at: vdir) }
        let (all, adir) = try VIST2Tests.patchedModel(["adapter": ["path": "adapter", "scope": "all"]])
        defer { try? FileManager.default.removeItem(at: adir) }
        let tokens = Array("Text rows are the backbone's own.\n".utf8).map { Int32($0) }
        let bareText = Self.textLogits(bare, tokens)
        #expect(Self.textLogits(visual, tokens) == bareText)
        #expect(Self.textLogits(all, tokens) != bareText)
        // A visual block (embeddings, bidirectional) after the same text: the adapter acts on
        // it; with scope all, the text before it was adapted too.
        func blockLogits(_ m: VIST2Model, after text: [Int32]) -> [Float] {
            let tf = m.language.transformer
            let cache = tf.makeCache(capacity: text.count + 8)
            let ws = tf.makeWorkspace()
            if !text.isEmpty { _ = tf.forward(text, cache: cache, workspace: ws, logits: .none) }
            let rows = (0..<(8 * tf.config.dim)).map { Float(sin(Double($0) * 0.37)) * 0.5 }
            let logits = tf.forward(embeddings: rows, cache: cache, workspace: ws, causal: false, logits: .all).logits
            return (0..<logits.rows).flatMap { Array(logits.row($0)) }
        }
        let bareBlock = blockLogits(bare, after: tokens)
        let visualBlock = blockLogits(visual, after: tokens)
        #expect(visualBlock != bareBlock)
        #expect(blockLogits(all, after: tokens) != visualBlock)
        #expect(blockLogits(visual, after: []) == blockLogits(all, after: []))
        // The fingerprint names the adapter and its scope.
        #expect(Set([bare.fingerprint, visual.fingerprint, all.fingerprint]).count == 3)
    }

    @Test("The fingerprint covers the adapter's weights")
    func fingerprint() throws {
        let (a, adir) = try VIST2Tests.patchedModel(["adapter": ["path": "adapter", "scope": "visual"]])
        defer { try? FileManager.default.removeItem(at: adir) }
        // Same config, one changed byte in a factor: another model.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-fp-\(UUID().uuidString)")
        try FileManager.default.copyItem(at: adir, to: dir)
        defer { try? FileManager.default.removeItem(at: dir) }
        let f = dir.appendingPathComponent("adapter/adapter_model.safetensors")
        var bytes = try Data(contentsOf: f)
        bytes[bytes.count - 2] ^= 0x01
        try bytes.write(to: f)
        let b = try VIST2Model(directory: dir, threads: 1)
        #expect(a.fingerprint != b.fingerprint)
    }

    /// Loads the tiny model with `adapter/` changed by `edit` (config JSON object, tensors path);
    /// the error's description.
    func loadError(
        scope: String = "visual", path: String = "adapter", config edit: (inout [String: Any]) -> Void = { _ in },
        tensors: ((URL) throws -> Void)? = nil
    ) throws -> String? {
        let dir = try VIST2Tests.patchedCopy(["adapter": ["path": path, "scope": scope]])
        defer { try? FileManager.default.removeItem(at: dir) }
        let acfg = dir.appendingPathComponent("adapter/adapter_config.json")
        var a = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: acfg)) as? [String: Any])
        edit(&a)
        try JSONSerialization.data(withJSONObject: a).write(to: acfg)
        try tensors?(dir.appendingPathComponent("adapter/adapter_model.safetensors"))
        do {
            _ = try VIST2Model(directory: dir, threads: 1)
            return nil
        } catch {
            #expect(error.code.hasPrefix("model_"), "\(error.code)")
            return error.description
        }
    }

    /// Rewrites the adapter's tensors: each kept one with its values passed through `values`,
    /// those whose name ends with `drop` left out, and zero-filled `extra` ones added.
    static func rewrite(
        _ url: URL, values: (String, [Float]) -> [Float] = { $1 }, drop: String? = nil, extra: [(String, [Int])] = []
    ) throws {
        let file = try SafetensorsFile(path: url.path)
        let names = file.tensors.keys.sorted().filter { drop == nil || !$0.hasSuffix(drop!) }
        var data: [[Float]] = []
        for n in names { data.append(values(n, try file.floats(n, shape: file.tensors[n]!.shape))) }
        let entries =
            names.map { SafetensorsWriter.Entry(name: $0, shape: file.tensors[$0]!.shape) } + extra.map { .init(name: $0.0, shape: $0.1) }
        let tmp = url.path + ".new"
        var w = try SafetensorsWriter(path: tmp, entries: entries)
        for d in data { try w.write(d) }
        for e in extra { try w.write([Float](repeating: 0, count: e.1.reduce(1, *))) }
        try w.finish()
        #expect(rename(tmp, url.path) == 0)
    }

    @Test("Bad adapters and adapter settings fail with a clear error naming the field or tensor")
    func validation() throws {
        let cases: [(String, String?, () throws -> String?)] = [
            ("scope", "adapter.scope", { try loadError(scope: "text") }),
            ("missing directory", "adapter_config.json", { try loadError(path: "nope") }),
            ("peft_type", "peft_type", { try loadError(config: { $0["peft_type"] = "IA3" }) }),
            ("DoRA", "use_dora", { try loadError(config: { $0["use_dora"] = true }) }),
            ("per-module alpha", "alpha_pattern", { try loadError(config: { $0["alpha_pattern"] = ["q_proj": 4] }) }),
            ("bias", "bias", { try loadError(config: { $0["bias"] = "all" }) }),
            ("PiSSA", "init_lora_weights", { try loadError(config: { $0["init_lora_weights"] = "pissa" }) }),
            ("regex targets", "regular expression", { try loadError(config: { $0["target_modules"] = "q_proj|v_proj" }) }),
            ("unknown module", "lm_head", { try loadError(config: { $0["target_modules"] = ["q_proj", "lm_head"] }) }),
            ("rank", "lora_A.weight", { try loadError(config: { $0["r"] = 3 }) }),
            ("rank type", "r must be", { try loadError(config: { $0["r"] = "4" }) }),
            ("alpha", "lora_alpha", { try loadError(config: { $0["lora_alpha"] = -1 }) }),
            ("layer", "layers_to_transform", { try loadError(config: { $0["layers_to_transform"] = [5] }) }),
            (
                "fewer modules than tensors", "not a LoRA factor",
                { try loadError(config: { $0["target_modules"] = ["q_proj"] }) }
            ),
            (
                "missing tensor", "layers.1.mlp.down_proj.lora_B.weight",
                { try loadError(tensors: { try Self.rewrite($0, drop: "layers.1.mlp.down_proj.lora_B.weight") }) }
            ),
            (
                "extra tensor", "lora_embedding_A",
                {
                    try loadError(tensors: {
                        try Self.rewrite($0, extra: [("base_model.model.model.embed_tokens.lora_embedding_A", [4, 288])])
                    })
                }
            ),
            (
                "NaN", "NaN",
                {
                    try loadError(tensors: {
                        try Self.rewrite(
                            $0, values: { n, v in n.contains("layers.0.self_attn.k_proj.lora_A") ? [.nan] + v.dropFirst() : v })
                    })
                }
            ),
            ("not a safetensors file", "adapter_model.safetensors", { try loadError(tensors: { try Data("junk".utf8).write(to: $0) }) }),
            ("the shipped adapter loads", nil, { try loadError() }),
        ]
        for (what, expected, run) in cases {
            let message = try run()
            if let expected {
                #expect(message?.contains(expected) == true, "\(what): \(message ?? "loaded")")
            } else {
                #expect(message == nil, "\(what): \(message ?? "")")
            }
        }
    }
}
