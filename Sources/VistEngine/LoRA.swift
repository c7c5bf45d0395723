import CBLAS
import Foundation
import VistFormats
import VistKernels

/// A low-rank backbone adapter (LoRA) in the Hugging Face PEFT layout (VIST2.md section 6):
///
///     adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, use_rslora,
///                                layers_to_transform (optional)
///     adapter_model.safetensors  base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight  (r, in)
///                                base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight  (out, r)
///
/// A projection y = x W^T of an adapted row becomes y + s (x A^T) B^T, s = lora_alpha / r (or
/// lora_alpha / sqrt(r) with use_rslora), computed at run time in f32 so the backbone's own
/// (possibly quantized) weights stay as they are. The scope says which rows are adapted:
/// `visual`, the rows of visual blocks only (text rows are the backbone's exactly), or `all`.
public final class LoRAAdapter: @unchecked Sendable {
    public enum Scope: String, Codable, Sendable, CaseIterable {
        case visual, all
    }

    /// The projections of a layer, in PEFT's module names.
    public enum Target: Int, CaseIterable, Sendable {
        case q, k, v, o, gate, up, down

        public var module: String { ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][rawValue] }
        var block: String { rawValue < 4 ? "self_attn" : "mlp" }
    }

    /// The low-rank factors of one projection, as f32: a (r, in) and b (out, r), row-major.
    struct Pair {
        let a: [Float]
        let b: [Float]
        let inDim: Int
        let outDim: Int
    }

    public let scope: Scope
    public let rank: Int
    public let scale: Float
    public let targets: [Target]
    /// The adapted layers (all when adapter_config.json has no layers_to_transform).
    public let layers: [Int]
    /// pairs[layer][target.rawValue], nil where that projection is not adapted.
    let pairs: [[Pair?]]
    /// The two files, for the model's fingerprint.
    public let files: [String]

    /// adapter_config.json fields that change the arithmetic or the base weights (DoRA, per-module
    /// ranks, biases, extra trained modules, ...): refused when set rather than silently ignored.
    static let unsupported = [
        "alpha_pattern", "rank_pattern", "use_dora", "lora_bias", "layer_replication", "modules_to_save", "trainable_token_indices",
        "target_parameters", "alora_invocation_tokens", "use_qalora", "arrow_config", "use_bdlora", "exclude_modules",
        "fan_in_fan_out",
    ]

    /// Reads and checks the adapter in `directory` for a backbone of shape `config`.
    public init(directory: URL, scope: Scope, config: ModelConfig) throws(FormatError) {
        let configPath = directory.appendingPathComponent("adapter_config.json").path
        let tensorsPath = directory.appendingPathComponent("adapter_model.safetensors").path
        func bad(_ s: String) -> FormatError { FormatError(file: configPath, problem: .invalid(s)) }
        guard let data = FileManager.default.contents(atPath: configPath) else {
            throw FormatError(file: configPath, problem: .io("cannot read (a PEFT adapter directory has adapter_config.json)"))
        }
        guard case .object(let c) = try? JSONDecoder().decode(JSONValue.self, from: data) else { throw bad("not a JSON object") }
        if let t = c["peft_type"], t != .string("LORA") { throw bad("peft_type must be \"LORA\", got \(t)") }
        for key in Self.unsupported where c[key]?.isSet == true {
            throw bad("\(key) is set; this engine applies plain LoRA only")
        }
        if let b = c["bias"], b != .null, b != .string("none") { throw bad("bias must be \"none\"") }
        switch c["init_lora_weights"] {
        case nil, .null, .bool, .string("gaussian"), .string("eva"): break
        case let i?:
            // PiSSA, OLoRA, LoftQ, CorDA... rewrite the base weights: the adapter alone is not the model then.
            throw bad("init_lora_weights \(i) changes the base weights; convert the adapter to plain LoRA first")
        }
        guard case .number(let rValue) = c["r"], let r = Int(exactly: rValue), (1...4096).contains(r) else {
            throw bad("r must be an integer in 1...4096")
        }
        guard case .number(let alpha) = c["lora_alpha"], alpha.isFinite, alpha > 0, alpha <= 1e6 else {
            throw bad("lora_alpha must be a positive number")
        }
        var rslora = false
        switch c["use_rslora"] {
        case nil, .null: break
        case .bool(let b): rslora = b
        default: throw bad("use_rslora must be true or false")
        }
        var names: [String] = []
        switch c["target_modules"] {
        case .string("all-linear"): names = Target.allCases.map(\.module)
        case .string(let s):
            throw bad("target_modules \"\(s)\" is a regular expression; list the module names (q_proj ... down_proj) instead")
        case .array(let list) where !list.isEmpty:
            for v in list {
                guard case .string(let n) = v else { throw bad("target_modules must list module names") }
                names.append(n)
            }
        default: throw bad("target_modules must be a non-empty list of module names")
        }
        var targets: [Target] = []
        for n in names {
            guard let t = Target.allCases.first(where: { $0.module == n }) else {
                throw bad("target_modules: '\(n)' is not one of \(Target.allCases.map(\.module).joined(separator: ", "))")
            }
            if !targets.contains(t) { targets.append(t) }
        }
        targets.sort { $0.rawValue < $1.rawValue }
        var layers = Array(0..<config.layers)
        if let l = c["layers_to_transform"], l != .null {
            let list: [JSONValue]
            if case .array(let a) = l { list = a } else { list = [l] }
            var chosen: [Int] = []
            for x in list {
                guard case .number(let d) = x, let i = Int(exactly: d), (0..<config.layers).contains(i) else {
                    throw bad("layers_to_transform must list layers in 0..<\(config.layers)")
                }
                if !chosen.contains(i) { chosen.append(i) }
            }
            guard !chosen.isEmpty else { throw bad("layers_to_transform is empty") }
            layers = chosen.sorted()
        }

        let file: SafetensorsFile
        do { file = try SafetensorsFile(path: tensorsPath) } catch { throw error }
        let shapes: [Target: (out: Int, in: Int)] = [
            .q: (config.qDim, config.dim), .k: (config.kvDim, config.dim), .v: (config.kvDim, config.dim), .o: (config.dim, config.qDim),
            .gate: (config.ffnDim, config.dim), .up: (config.ffnDim, config.dim), .down: (config.dim, config.ffnDim),
        ]
        var expected = Set<String>()
        var pairs = [[Pair?]](repeating: [Pair?](repeating: nil, count: Target.allCases.count), count: config.layers)
        for l in layers {
            for t in targets {
                let (outDim, inDim) = shapes[t]!
                let prefix = "base_model.model.model.layers.\(l).\(t.block).\(t.module)"
                expected.insert(prefix + ".lora_A.weight")
                expected.insert(prefix + ".lora_B.weight")
                let a = try Self.floats(file, prefix + ".lora_A.weight", shape: [r, inDim])
                let b = try Self.floats(file, prefix + ".lora_B.weight", shape: [outDim, r])
                pairs[l][t.rawValue] = Pair(a: a, b: b, inDim: inDim, outDim: outDim)
            }
        }
        if let extra = file.tensors.keys.filter({ !expected.contains($0) }).sorted().first {
            throw FormatError(
                file: tensorsPath, tensor: extra,
                problem: .invalid(
                    "not a LoRA factor of the layers and modules adapter_config.json names (\(file.tensors.count) tensors, \(expected.count) expected)"
                ))
        }
        self.scope = scope
        rank = r
        scale = Float(rslora ? alpha / Double(r).squareRoot() : alpha / Double(r))
        self.targets = targets
        self.layers = layers
        self.pairs = pairs
        files = [configPath, tensorsPath]
    }

    /// A factor as f32 (stored as F32, F16 or BF16), checking its shape and that every value is finite.
    static func floats(_ file: SafetensorsFile, _ name: String, shape: [Int]) throws(FormatError) -> [Float] {
        guard let t = file.tensors[name] else { throw FormatError(file: file.path, tensor: name, problem: .missing("tensor")) }
        guard [.f32, .f16, .bf16].contains(t.type) else {
            throw FormatError(file: file.path, tensor: name, problem: .unsupportedType("\(t.type) (LoRA factors must be F32, F16 or BF16)"))
        }
        let v = try file.floats(name, shape: shape)
        guard v.allSatisfy(\.isFinite) else {
            throw FormatError(file: file.path, tensor: name, problem: .invalid("holds a NaN or infinity"))
        }
        return v
    }

    /// Parameters of the adapter (for reports).
    public var parameterCount: Int { pairs.joined().compactMap { $0 }.reduce(0) { $0 + $1.a.count + $1.b.count } }

    /// Whether the projection is adapted.
    func pair(_ layer: Int, _ target: Target) -> Pair? { pairs[layer][target.rawValue] }

    /// y (n, out) += s (x A^T) B^T for rows 0..<n of x (n, in), rows split over the pool; `u` holds
    /// at least n * rank floats. FLOPs done are returned.
    func apply(
        _ layer: Int, _ target: Target, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, n: Int, u: UnsafeMutablePointer<Float>,
        pool: ThreadPool
    ) -> Int {
        guard let p = pair(layer, target) else { return 0 }
        let r = rank, s = scale
        p.a.withUnsafeBufferPointer { a in
            p.b.withUnsafeBufferPointer { b in
                let a = a.baseAddress!, b = b.baseAddress!
                if n == 1 {
                    // u = A x (r), y += s B u (out).
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(r), Int32(p.inDim), 1, a, Int32(p.inDim), x, 1, 0, u, 1)
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(p.outDim), Int32(r), s, b, Int32(r), u, 1, 1, y, 1)
                    return
                }
                pool.parallel { ith, nth in
                    let rows = ThreadPool.slice(n, ith, nth)
                    guard !rows.isEmpty else { return }
                    let t0 = rows.lowerBound, m = rows.count
                    // u[t0..] = x[t0..] A^T (m, r); y[t0..] += s u B^T (m, out).
                    cblas_sgemm(
                        CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(r), Int32(p.inDim), 1, x + t0 * p.inDim, Int32(p.inDim), a,
                        Int32(p.inDim), 0, u + t0 * r, Int32(r))
                    cblas_sgemm(
                        CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(p.outDim), Int32(r), s, u + t0 * r, Int32(r), b, Int32(r),
                        1,
                        y + t0 * p.outDim, Int32(p.outDim))
                }
            }
        }
        return 2 * n * r * (p.inDim + p.outDim)
    }
}

/// A JSON value as adapter_config.json holds it (keeps booleans apart from numbers).
enum JSONValue: Decodable, Equatable, CustomStringConvertible {
    case null, bool(Bool), number(Double), string(String), array([JSONValue]), object([String: JSONValue])

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let d = try? c.decode(Double.self) {
            self = .number(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    /// Whether a field holds something other than null, false, {} or [].
    var isSet: Bool {
        switch self {
        case .null, .bool(false): return false
        case .object(let o): return !o.isEmpty
        case .array(let a): return !a.isEmpty
        default: return true
        }
    }

    var description: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return "\(b)"
        case .number(let d): return "\(d)"
        case .string(let s): return "\"\(s)\""
        case .array(let a): return "[" + a.map(\.description).joined(separator: ", ") + "]"
        case .object: return "{...}"
        }
    }
}
