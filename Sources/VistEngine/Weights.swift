import Foundation
import VistFormats
import VistKernels

/// One transformer block's weights. Matrices keep their file's element type (quantized blocks
/// stay quantized); norms are small and held as floats.
public struct LayerWeights: @unchecked Sendable {
    public var attnNorm: [Float]  // (dim)
    public var wq: WeightMatrix  // (heads*headDim, dim)
    public var wk: WeightMatrix  // (kvHeads*headDim, dim)
    public var wv: WeightMatrix  // (kvHeads*headDim, dim)
    public var wo: WeightMatrix  // (dim, heads*headDim)
    public var qNorm: [Float]?  // (headDim), Qwen3 only
    public var kNorm: [Float]?  // (headDim), Qwen3 only
    public var ffnNorm: [Float]  // (dim)
    public var gate: WeightMatrix  // (ffn, dim)
    public var up: WeightMatrix  // (ffn, dim)
    public var down: WeightMatrix  // (dim, ffn)
}

/// All weights of a decoder. `storage` keeps the mapped files alive as long as the matrices
/// that point into them.
public final class TransformerWeights: @unchecked Sendable {
    public let config: ModelConfig
    public let tokenEmbedding: WeightMatrix  // (vocab, dim)
    public let layers: [LayerWeights]
    public let outputNorm: [Float]  // (dim)
    public let output: WeightMatrix  // (vocab, dim); the embedding itself when tied
    let storage: [AnyObject]

    /// Block-type matrices are repacked into the interleaved layout the decoding kernels read
    /// fastest (`WeightArena.interleaved`); with `mapped`, their pages of the model file are
    /// released afterwards, so the copy does not double the resident memory.
    init(
        config: ModelConfig, tokenEmbedding: WeightMatrix, layers: [LayerWeights], outputNorm: [Float], output: WeightMatrix,
        storage: [AnyObject], mapped: Bool
    ) {
        let arena = WeightArena()
        func pack(_ w: WeightMatrix) -> WeightMatrix { arena.interleaved(w, releaseSource: mapped) }
        self.config = config
        self.tokenEmbedding = pack(tokenEmbedding)
        self.layers = layers.map { l in
            var l = l
            (l.wq, l.wk, l.wv, l.wo) = (pack(l.wq), pack(l.wk), pack(l.wv), pack(l.wo))
            (l.gate, l.up, l.down) = (pack(l.gate), pack(l.up), pack(l.down))
            return l
        }
        self.outputNorm = outputNorm
        self.output = config.tiedEmbeddings ? self.tokenEmbedding : pack(output)
        self.storage = storage + [arena]
    }

    /// Bytes of weight data (mapped from the file, or repacked from it) plus the float norms.
    public var weightBytes: Int {
        var n = tokenEmbedding.rows * tokenEmbedding.rowBytes + outputNorm.count * 4
        if !config.tiedEmbeddings { n += output.rows * output.rowBytes }
        for l in layers {
            for m in [l.wq, l.wk, l.wv, l.wo, l.gate, l.up, l.down] { n += m.rows * m.rowBytes }
            n += (l.attnNorm.count + l.ffnNorm.count + (l.qNorm?.count ?? 0) + (l.kNorm?.count ?? 0)) * 4
        }
        return n
    }

    // MARK: GGUF

    /// Loads a Llama or Qwen3 model from GGUF. Tensor names are llama.cpp's (`blk.N.attn_q.weight`...).
    public static func load(gguf: GGUFFile) throws(FormatError) -> TransformerWeights {
        let path = gguf.path
        let archName = try gguf.string("general.architecture")
        guard let arch = Architecture(rawValue: archName) else {
            throw FormatError(file: path, problem: .unsupportedType("architecture '\(archName)' (supported: llama, qwen3)"))
        }
        let p = archName + "."
        let dim = try gguf.int(p + "embedding_length")
        let heads = try gguf.int(p + "attention.head_count")
        let headDim =
            gguf.metadata[p + "attention.key_length"] != nil ? try gguf.int(p + "attention.key_length") : (heads > 0 ? dim / heads : 0)
        if gguf.metadata[p + "rope.dimension_count"] != nil {
            let rd = try gguf.int(p + "rope.dimension_count")
            guard rd == headDim else {
                throw FormatError(
                    file: path, problem: .unsupportedType("partial rotary embeddings (rope.dimension_count \(rd) != head dim \(headDim))"))
            }
        }
        guard let embInfo = gguf.info("token_embd.weight"), embInfo.dims.count == 2 else {
            throw FormatError(file: path, tensor: "token_embd.weight", problem: .missing("tensor (or it is not 2-D)"))
        }
        let vocab = gguf.metadata[p + "vocab_size"] != nil ? try gguf.int(p + "vocab_size") : embInfo.dims[1]
        let tied = gguf.info("output.weight") == nil
        let config = ModelConfig(
            architecture: arch, vocabSize: vocab, dim: dim, layers: try gguf.int(p + "block_count"),
            heads: heads,
            kvHeads: gguf.metadata[p + "attention.head_count_kv"] != nil ? try gguf.int(p + "attention.head_count_kv") : heads,
            headDim: headDim, ffnDim: try gguf.int(p + "feed_forward_length"),
            contextLength: try gguf.int(p + "context_length"),
            ropeBase: Float(gguf.metadata[p + "rope.freq_base"] != nil ? try gguf.float(p + "rope.freq_base") : 10000),
            // GGUF's llama converter permutes Q/K rows for interleaved pairs; Qwen3 keeps HF's halves.
            ropeStyle: arch == .llama ? .interleaved : .halves,
            normEps: Float(try gguf.float(p + "attention.layer_norm_rms_epsilon")),
            tiedEmbeddings: tied)
        try config.validate(source: path)
        let c = config
        var layers: [LayerWeights] = []
        for i in 0..<c.layers {
            let b = "blk.\(i)."
            layers.append(
                LayerWeights(
                    attnNorm: try gguf.vector(b + "attn_norm.weight", count: c.dim),
                    wq: try gguf.matrix(b + "attn_q.weight", rows: c.qDim, cols: c.dim),
                    wk: try gguf.matrix(b + "attn_k.weight", rows: c.kvDim, cols: c.dim),
                    wv: try gguf.matrix(b + "attn_v.weight", rows: c.kvDim, cols: c.dim),
                    wo: try gguf.matrix(b + "attn_output.weight", rows: c.dim, cols: c.qDim),
                    qNorm: c.hasQKNorm ? try gguf.vector(b + "attn_q_norm.weight", count: c.headDim) : nil,
                    kNorm: c.hasQKNorm ? try gguf.vector(b + "attn_k_norm.weight", count: c.headDim) : nil,
                    ffnNorm: try gguf.vector(b + "ffn_norm.weight", count: c.dim),
                    gate: try gguf.matrix(b + "ffn_gate.weight", rows: c.ffnDim, cols: c.dim),
                    up: try gguf.matrix(b + "ffn_up.weight", rows: c.ffnDim, cols: c.dim),
                    down: try gguf.matrix(b + "ffn_down.weight", rows: c.dim, cols: c.ffnDim)))
        }
        let emb = try gguf.matrix("token_embd.weight", rows: c.vocabSize, cols: c.dim)
        return TransformerWeights(
            config: c, tokenEmbedding: emb, layers: layers,
            outputNorm: try gguf.vector("output_norm.weight", count: c.dim),
            output: tied ? emb : try gguf.matrix("output.weight", rows: c.vocabSize, cols: c.dim),
            storage: [gguf], mapped: true)
    }

    // MARK: Hugging Face safetensors

    /// Loads a Llama or Qwen3 checkpoint from a Hugging Face directory: `config.json` plus
    /// `model.safetensors` or a sharded `model.safetensors.index.json`.
    public static func load(huggingFaceDirectory dir: URL) throws(FormatError) -> TransformerWeights {
        let configPath = dir.appendingPathComponent("config.json").path
        let hf = try HFConfig.load(path: configPath)
        let config = try hf.modelConfig(source: configPath)
        var files: [String: SafetensorsFile] = [:]
        var owner: [String: String] = [:]
        let single = dir.appendingPathComponent("model.safetensors").path
        let index = dir.appendingPathComponent("model.safetensors.index.json").path
        if FileManager.default.fileExists(atPath: single) {
            let f = try SafetensorsFile(path: single)
            files[single] = f
            for name in f.tensors.keys { owner[name] = single }
        } else if FileManager.default.fileExists(atPath: index) {
            guard let data = FileManager.default.contents(atPath: index),
                let obj = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
                let map = obj["weight_map"] as? [String: String]
            else { throw FormatError(file: index, problem: .invalid("weight_map is missing or not an object of strings")) }
            for (name, shard) in map {
                guard !shard.contains("/") else {
                    throw FormatError(file: index, tensor: name, problem: .invalid("shard '\(shard)' is not a file name in this directory"))
                }
                let p = dir.appendingPathComponent(shard).path
                if files[p] == nil { files[p] = try SafetensorsFile(path: p) }
                owner[name] = p
            }
        } else {
            throw FormatError(file: dir.path, problem: .missing("model.safetensors or model.safetensors.index.json"))
        }
        func file(_ name: String) throws(FormatError) -> SafetensorsFile {
            guard let p = owner[name], let f = files[p] else {
                throw FormatError(file: dir.path, tensor: name, problem: .missing("tensor"))
            }
            return f
        }
        func mat(_ name: String, _ rows: Int, _ cols: Int) throws(FormatError) -> WeightMatrix {
            try file(name).matrix(name, rows: rows, cols: cols)
        }
        func vec(_ name: String, _ n: Int) throws(FormatError) -> [Float] { try file(name).floats(name, shape: [n]) }
        let c = config
        var layers: [LayerWeights] = []
        for i in 0..<c.layers {
            let b = "model.layers.\(i)."
            layers.append(
                LayerWeights(
                    attnNorm: try vec(b + "input_layernorm.weight", c.dim),
                    wq: try mat(b + "self_attn.q_proj.weight", c.qDim, c.dim),
                    wk: try mat(b + "self_attn.k_proj.weight", c.kvDim, c.dim),
                    wv: try mat(b + "self_attn.v_proj.weight", c.kvDim, c.dim),
                    wo: try mat(b + "self_attn.o_proj.weight", c.dim, c.qDim),
                    qNorm: c.hasQKNorm ? try vec(b + "self_attn.q_norm.weight", c.headDim) : nil,
                    kNorm: c.hasQKNorm ? try vec(b + "self_attn.k_norm.weight", c.headDim) : nil,
                    ffnNorm: try vec(b + "post_attention_layernorm.weight", c.dim),
                    gate: try mat(b + "mlp.gate_proj.weight", c.ffnDim, c.dim),
                    up: try mat(b + "mlp.up_proj.weight", c.ffnDim, c.dim),
                    down: try mat(b + "mlp.down_proj.weight", c.dim, c.ffnDim)))
        }
        let emb = try mat("model.embed_tokens.weight", c.vocabSize, c.dim)
        let out = c.tiedEmbeddings ? emb : try mat("lm_head.weight", c.vocabSize, c.dim)
        return TransformerWeights(
            config: c, tokenEmbedding: emb, layers: layers, outputNorm: try vec("model.norm.weight", c.dim),
            output: out, storage: Array(files.values), mapped: true)
    }
}

/// The fields of a Hugging Face `config.json` that a Llama/Qwen3 decoder needs.
public struct HFConfig: Decodable, Sendable {
    public var model_type: String
    public var vocab_size: Int
    public var hidden_size: Int
    public var intermediate_size: Int
    public var num_hidden_layers: Int
    public var num_attention_heads: Int
    public var num_key_value_heads: Int?
    public var head_dim: Int?
    public var max_position_embeddings: Int?
    public var rope_theta: Double?
    public var rms_norm_eps: Double?
    public var tie_word_embeddings: Bool?
    public var hidden_act: String?

    public static func load(path: String) throws(FormatError) -> HFConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FormatError(file: path, problem: .io("cannot read"))
        }
        do {
            return try JSONDecoder().decode(HFConfig.self, from: data)
        } catch let DecodingError.keyNotFound(key, _) {
            throw FormatError(file: path, problem: .missing("field '\(key.stringValue)'"))
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw FormatError(
                file: path, problem: .invalid("field '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))' has the wrong type"))
        } catch {
            throw FormatError(file: path, problem: .invalid("not a valid config.json: \(error)"))
        }
    }

    public func modelConfig(source: String) throws(FormatError) -> ModelConfig {
        guard let arch = Architecture(rawValue: model_type) else {
            throw FormatError(file: source, problem: .unsupportedType("model_type '\(model_type)' (supported: llama, qwen3)"))
        }
        if let act = hidden_act, act != "silu" {
            throw FormatError(file: source, problem: .unsupportedType("hidden_act '\(act)' (only silu)"))
        }
        let c = ModelConfig(
            architecture: arch, vocabSize: vocab_size, dim: hidden_size, layers: num_hidden_layers,
            heads: num_attention_heads, kvHeads: num_key_value_heads ?? num_attention_heads,
            headDim: head_dim ?? (num_attention_heads > 0 ? hidden_size / num_attention_heads : 0),
            ffnDim: intermediate_size, contextLength: max_position_embeddings ?? 2048,
            ropeBase: Float(rope_theta ?? 10000), ropeStyle: .halves, normEps: Float(rms_norm_eps ?? 1e-6),
            tiedEmbeddings: tie_word_embeddings ?? (arch == .qwen3 ? false : false))
        try c.validate(source: source)
        return c
    }
}
