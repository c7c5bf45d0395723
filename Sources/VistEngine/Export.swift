import Foundation
import VistFormats
import VistKernels

extension TransformerWeights {
    /// Writes these weights as a Hugging Face checkpoint directory (`config.json`,
    /// `model.safetensors`, F32), each matrix dequantized by the engine's own kernels — the
    /// training code loads exactly the numbers the engine multiplies with. Q and K rows that a
    /// GGUF llama converter permuted for interleaved RoPE are put back in Hugging Face's
    /// rotate-half order, so the directory loads like any Hugging Face checkpoint (this engine
    /// included). The tokenizer is not written.
    public func exportHuggingFace(to dir: URL) throws(FormatError) {
        let c = config
        do {
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        } catch {
            throw FormatError(file: dir.path, problem: .io("cannot create: \(error.localizedDescription)"))
        }
        var hf: [String: Any] = [
            "model_type": c.architecture.rawValue, "vocab_size": c.vocabSize, "hidden_size": c.dim,
            "intermediate_size": c.ffnDim, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "num_key_value_heads": c.kvHeads, "head_dim": c.headDim, "max_position_embeddings": c.contextLength,
            "rope_theta": Double(c.ropeBase), "rms_norm_eps": Double(c.normEps), "tie_word_embeddings": c.tiedEmbeddings,
            "hidden_act": "silu", "torch_dtype": "float32",
        ]
        hf["architectures"] = [c.architecture == .llama ? "LlamaForCausalLM" : "Qwen3ForCausalLM"]
        let configPath = dir.appendingPathComponent("config.json").path
        guard let json = try? JSONSerialization.data(withJSONObject: hf, options: [.sortedKeys, .prettyPrinted]),
            FileManager.default.createFile(atPath: configPath, contents: json)
        else { throw FormatError(file: configPath, problem: .io("cannot write")) }

        typealias Item = (name: String, shape: [Int], values: () -> [Float])
        func matrix(_ w: WeightMatrix, rope: Bool = false) -> [Float] {
            var out = [Float](repeating: 0, count: w.rows * w.cols)
            out.withUnsafeMutableBufferPointer { w.dequantizeRows(0..<w.rows, into: $0.baseAddress!) }
            guard rope, c.ropeStyle == .interleaved else { return out }
            // Interleaved row 2i (2i+1) of a head is rotate-half row i (i + half).
            let hd = c.headDim, half = hd / 2, cols = w.cols
            var hfOrder = out
            for h in 0..<(w.rows / hd) {
                for i in 0..<half {
                    for (src, dst) in [(2 * i, i), (2 * i + 1, i + half)] {
                        let s = (h * hd + src) * cols, d = (h * hd + dst) * cols
                        hfOrder.replaceSubrange(d..<(d + cols), with: out[s..<(s + cols)])
                    }
                }
            }
            return hfOrder
        }
        var items: [Item] = [("model.embed_tokens.weight", [c.vocabSize, c.dim], { matrix(self.tokenEmbedding) })]
        for (i, l) in layers.enumerated() {
            let p = "model.layers.\(i)."
            items.append((p + "input_layernorm.weight", [c.dim], { l.attnNorm }))
            items.append((p + "self_attn.q_proj.weight", [c.qDim, c.dim], { matrix(l.wq, rope: true) }))
            items.append((p + "self_attn.k_proj.weight", [c.kvDim, c.dim], { matrix(l.wk, rope: true) }))
            items.append((p + "self_attn.v_proj.weight", [c.kvDim, c.dim], { matrix(l.wv) }))
            items.append((p + "self_attn.o_proj.weight", [c.dim, c.qDim], { matrix(l.wo) }))
            if let q = l.qNorm, let k = l.kNorm {
                items.append((p + "self_attn.q_norm.weight", [c.headDim], { q }))
                items.append((p + "self_attn.k_norm.weight", [c.headDim], { k }))
            }
            items.append((p + "post_attention_layernorm.weight", [c.dim], { l.ffnNorm }))
            items.append((p + "mlp.gate_proj.weight", [c.ffnDim, c.dim], { matrix(l.gate) }))
            items.append((p + "mlp.up_proj.weight", [c.ffnDim, c.dim], { matrix(l.up) }))
            items.append((p + "mlp.down_proj.weight", [c.dim, c.ffnDim], { matrix(l.down) }))
        }
        items.append(("model.norm.weight", [c.dim], { self.outputNorm }))
        if !c.tiedEmbeddings { items.append(("lm_head.weight", [c.vocabSize, c.dim], { matrix(self.output) })) }
        let path = dir.appendingPathComponent("model.safetensors").path
        var writer = try SafetensorsWriter(
            path: path, entries: items.map { .init(name: $0.name, shape: $0.shape) }, metadata: ["format": "pt"])
        for item in items { try writer.write(item.values()) }
        try writer.finish()
    }
}
