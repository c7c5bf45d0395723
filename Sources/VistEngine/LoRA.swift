import Foundation
import VistFormats
import VistKernels

/// A low-rank backbone adapter (LoRA) in the Hugging Face PEFT layout (docs/MODEL.md section 6):
///
///     adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, use_rslora,
///                                layers_to_transform (optional)
///     adapter_model.safetensors  base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight  (r, in)
///                                base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight  (out, r)
///
/// A projection y = x W^T of an adapted row becomes y + s (x A^T) B^T, s = lora_alpha / r (or
/// lora_alpha / sqrt(r) with use_rslora), computed at run time with f32 activations, so the
/// backbone's own (possibly quantized) weights stay as they are. The factors stay in the file's
/// type (F32, F16 or BF16), mapped, not copied: a BF16 adapter costs half the memory traffic.
/// The scope says which rows are adapted: `visual`, the rows of visual blocks only (text rows
/// are the backbone's exactly), or `all`.
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

    /// The low-rank factors of one projection: a (r, in) and b (out, r), row-major, mapped from
    /// the file, and bt = b^T (r, out) in the same type, owned: decoding combines bt's r rows,
    /// which is far faster than `out` dot products of length r.
    struct Pair {
        let a: WeightMatrix
        let b: WeightMatrix
        let bt: WeightMatrix
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
    /// The mapped tensors file the factors point into.
    let storage: SafetensorsFile
    /// The widest adapted projection's output (for scratch sizes).
    let maxOut: Int
    /// The memory of every bt.
    private var owned: [UnsafeMutableRawPointer] = []

    deinit { owned.forEach { $0.deallocate() } }

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

        let file = try SafetensorsFile(path: tensorsPath)
        let shapes: [Target: (out: Int, in: Int)] = [
            .q: (config.qDim, config.dim), .k: (config.kvDim, config.dim), .v: (config.kvDim, config.dim), .o: (config.dim, config.qDim),
            .gate: (config.ffnDim, config.dim), .up: (config.ffnDim, config.dim), .down: (config.dim, config.ffnDim),
        ]
        var expected = Set<String>()
        var factors: [(layer: Int, target: Target, a: WeightMatrix, b: WeightMatrix)] = []
        for l in layers {
            for t in targets {
                let (outDim, inDim) = shapes[t]!
                let prefix = "base_model.model.model.layers.\(l).\(t.block).\(t.module)"
                expected.insert(prefix + ".lora_A.weight")
                expected.insert(prefix + ".lora_B.weight")
                let a = try Self.factor(file, prefix + ".lora_A.weight", rows: r, cols: inDim)
                let b = try Self.factor(file, prefix + ".lora_B.weight", rows: outDim, cols: r)
                factors.append((l, t, a, b))
            }
        }
        if let extra = file.tensors.keys.filter({ !expected.contains($0) }).sorted().first {
            throw FormatError(
                file: tensorsPath, tensor: extra,
                problem: .invalid(
                    "not a LoRA factor of the layers and modules adapter_config.json names (\(file.tensors.count) tensors, \(expected.count) expected)"
                ))
        }
        // Everything is checked: now the transposed copies.
        var pairs = [[Pair?]](repeating: [Pair?](repeating: nil, count: Target.allCases.count), count: config.layers)
        for f in factors {
            let bt = Self.transposed(f.b)
            owned.append(UnsafeMutableRawPointer(mutating: bt.data))
            pairs[f.layer][f.target.rawValue] = Pair(a: f.a, b: f.b, bt: bt)
        }
        self.scope = scope
        rank = r
        scale = Float(rslora ? alpha / Double(r).squareRoot() : alpha / Double(r))
        self.targets = targets
        self.layers = layers
        self.pairs = pairs
        files = [configPath, tensorsPath]
        storage = file
        maxOut = targets.map { shapes[$0]!.out }.max() ?? 0
    }

    /// m^T in m's float type, in memory the caller owns (`data`, to deallocate).
    static func transposed(_ m: WeightMatrix) -> WeightMatrix {
        let e = m.rowBytes / max(1, m.cols)
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(1, m.rows * m.cols * e), alignment: 64)
        for i in 0..<m.rows {
            for j in 0..<m.cols { (p + (j * m.rows + i) * e).copyMemory(from: m.data + i * m.rowBytes + j * e, byteCount: e) }
        }
        return WeightMatrix(type: m.type, rows: m.cols, cols: m.rows, data: p)
    }

    /// A factor (F32, F16 or BF16) as a matrix over the mapped file, checking its shape and that
    /// every value is finite.
    static func factor(_ file: SafetensorsFile, _ name: String, rows: Int, cols: Int) throws(FormatError) -> WeightMatrix {
        guard let t = file.tensors[name] else { throw FormatError(file: file.path, tensor: name, problem: .missing("tensor")) }
        guard [.f32, .f16, .bf16].contains(t.type) else {
            throw FormatError(file: file.path, tensor: name, problem: .unsupportedType("\(t.type) (LoRA factors must be F32, F16 or BF16)"))
        }
        let m = try file.matrix(name, rows: rows, cols: cols)
        var row = [Float](repeating: 0, count: cols)
        for i in 0..<rows {
            row.withUnsafeMutableBufferPointer { m.dequantizeRows(i..<(i + 1), into: $0.baseAddress!) }
            guard row.allSatisfy(\.isFinite) else {
                throw FormatError(file: file.path, tensor: name, problem: .invalid("holds a NaN or infinity (row \(i))"))
            }
        }
        return m
    }

    /// An adapted projection's output buffer: projections that read the same input (q, k, v;
    /// gate, up) are adapted together.
    struct Slot {
        let target: Target
        let y: UnsafeMutablePointer<Float>
    }

    /// Multiply-adds below which one decode step of `apply` stays on the calling thread.
    nonisolated(unsafe) static var serialMACs = 1 << 15

    /// Floats of scratch `apply` needs for a batch of `n` rows and up to 3 slots.
    func scratchFloats(_ n: Int) -> Int { max(n * (rank + maxOut), 3 * (rank + maxOut)) }

    /// y (n, out) += s (x A^T) B^T for each slot's projection, rows 0..<n of x (n, in). Small
    /// batches (decoding) run row by row with all slots' A products in one parallel step and
    /// all their B products in another; larger ones use the engine's matrix products per slot.
    /// `scratch` holds scratchFloats(n). Returns the FLOPs done.
    func apply(
        _ layer: Int, _ slots: [Slot], x: UnsafePointer<Float>, n: Int, scratch: UnsafeMutablePointer<Float>, pool: ThreadPool,
        matmul: MatmulScratch
    ) -> Int {
        let r = rank, s = scale
        var flops = 0
        if n > Matmul.gemmThreshold {
            for slot in slots {
                guard let p = pairs[layer][slot.target.rawValue] else { continue }
                let u = scratch, d = scratch + n * r, out = p.b.rows, y = slot.y
                Matmul.forward(p.a, x: x, y: u, n: n, pool: pool, scratch: matmul)  // u = x A^T (n, r)
                Matmul.forward(p.b, x: u, y: d, n: n, pool: pool, scratch: matmul)  // d = u B^T (n, out)
                pool.parallel { ith, nth in
                    for t in ThreadPool.slice(n, ith, nth) {
                        let yt = y + t * out, dt = d + t * out
                        for i in 0..<out { yt[i] += s * dt[i] }
                    }
                }
                flops += 2 * n * r * (p.a.cols + out)
            }
            return flops
        }
        // Slot k's u rows are k*r..<(k+1)*r of one vector, its d rows follow each other.
        let pairs = slots.map { self.pairs[layer][$0.target.rawValue] }
        guard let inDim = pairs.compactMap({ $0 }).first?.a.cols else { return 0 }
        let outs = pairs.map { $0?.b.rows ?? 0 }
        let totalOut = outs.reduce(0, +)
        let u = scratch, d = scratch + slots.count * r
        // A step this small runs on the calling thread: waking the pool costs more than it saves.
        func step(macs: Int, _ body: (Int, Int) -> Void) { if macs < Self.serialMACs { body(0, 1) } else { pool.parallel(body) } }
        for t in 0..<n {
            let xt = x + t * inDim
            step(macs: slots.count * r * inDim) { ith, nth in
                let part = ThreadPool.slice(slots.count * r, ith, nth)
                for (k, p) in pairs.enumerated() {
                    guard let p else { continue }
                    let lo = max(part.lowerBound, k * r), hi = min(part.upperBound, (k + 1) * r)
                    if lo < hi { Matmul.floatRows(p.a, x: xt, y: u + k * r, rows: (lo - k * r)..<(hi - k * r)) }
                }
            }
            step(macs: totalOut * r) { ith, nth in
                let part = ThreadPool.slice(totalOut, ith, nth, align: 16)
                var base = 0
                for (k, p) in pairs.enumerated() {
                    defer { base += outs[k] }
                    guard let p else { continue }
                    let lo = max(part.lowerBound, base), hi = min(part.upperBound, base + outs[k])
                    guard lo < hi else { continue }
                    let rows = (lo - base)..<(hi - base)
                    let dk = d + base, yk = slots[k].y + t * outs[k]
                    Matmul.combineRows(p.bt, x: u + k * r, d: dk, columns: rows)
                    for i in rows { yk[i] += s * dk[i] }
                }
            }
        }
        for p in pairs { if let p { flops += 2 * n * r * (p.a.cols + p.b.rows) } }
        return flops
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
