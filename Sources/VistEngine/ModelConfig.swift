import Foundation
import VistFormats
import VistKernels

/// Decoder families the engine runs. Both are pre-norm transformers with RMSNorm, RoPE, GQA and
/// SwiGLU; Qwen3 adds an RMSNorm over each query and key head before RoPE.
public enum Architecture: String, Sendable, Codable {
    case llama
    case qwen3
}

/// Hyper-parameters of a decoder, read from GGUF metadata or a Hugging Face config.json.
public struct ModelConfig: Sendable, Codable, Equatable {
    public var architecture: Architecture
    public var vocabSize: Int
    /// Residual width (GGUF embedding_length, HF hidden_size).
    public var dim: Int
    public var layers: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int
    /// SwiGLU hidden width (feed_forward_length / intermediate_size).
    public var ffnDim: Int
    public var contextLength: Int
    public var ropeBase: Float
    public var ropeStyle: RopeStyle
    public var normEps: Float
    public var tiedEmbeddings: Bool

    public var qDim: Int { heads * headDim }
    public var kvDim: Int { kvHeads * headDim }
    public var hasQKNorm: Bool { architecture == .qwen3 }

    /// Checks the invariants the forward pass relies on, naming the field at fault.
    public func validate(source: String) throws(FormatError) {
        func bad(_ s: String) -> FormatError { FormatError(file: source, problem: .invalid(s)) }
        guard vocabSize > 0, dim > 0, layers > 0, heads > 0, kvHeads > 0, headDim > 0, ffnDim > 0 else {
            throw bad(
                "model sizes must be positive (vocab \(vocabSize), dim \(dim), layers \(layers), heads \(heads), kv heads \(kvHeads), head dim \(headDim), ffn \(ffnDim))"
            )
        }
        guard heads % kvHeads == 0 else { throw bad("head_count \(heads) is not a multiple of head_count_kv \(kvHeads)") }
        guard headDim % 2 == 0 else { throw bad("head dimension \(headDim) must be even for RoPE") }
        guard dim % 32 == 0, ffnDim % 32 == 0, qDim % 32 == 0 else {
            throw bad("dim \(dim), ffn \(ffnDim) and heads x head_dim \(qDim) must be multiples of 32")
        }
        guard contextLength > 0, contextLength <= 1 << 20 else { throw bad("context length \(contextLength) is out of range") }
        guard ropeBase > 0, ropeBase.isFinite, normEps > 0, normEps.isFinite else {
            throw bad("rope base and norm epsilon must be positive")
        }
        guard layers <= 1024, dim <= 65536, vocabSize <= 1 << 22 else { throw bad("model sizes are out of range") }
    }
}
