import Crypto
import Foundation
import VistFormats
import VistRender

/// A VIST2 model directory's `config.json` (format version 1). Field names are snake_case on disk.
///
///     {
///       "format_version": 1, "model_type": "vist2",
///       "backbone": "default" | "path/to/model.gguf" | "path/to/hf-dir",
///       "vision": {"image_height": 224, "image_width": 448, "patch_size": 16, "num_channels": 1,
///                  "hidden_size": 192, "num_layers": 4, "num_heads": 3, "intermediate_size": 768,
///                  "layer_norm_eps": 1e-6},
///       "aligner": {"merge": 2},
///       "render": { RenderConfig },
///       "chunk": {"length": 392, "ratio": 4},
///       "special_tokens": {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}   (optional)
///       "ocr_prompt": "Transcribe:"   (optional: the instruction OCR was trained with)
///       "adapter": {"path": "adapter", "scope": "visual" | "all"}   (optional: a PEFT LoRA directory)
///     }
///
/// Relative paths (backbone, font) are relative to the model directory. The visual tokens per
/// chunk are m = (H/16)(W/16)/merge², and `chunk.length` must equal ratio * m.
public struct VIST2Config: Codable, Sendable, Equatable {
    public struct Vision: Codable, Sendable, Equatable {
        public var imageHeight: Int
        public var imageWidth: Int
        public var patchSize: Int
        public var numChannels: Int
        public var hiddenSize: Int
        public var numLayers: Int
        public var numHeads: Int
        public var intermediateSize: Int
        public var layerNormEps: Float

        enum CodingKeys: String, CodingKey {
            case imageHeight = "image_height", imageWidth = "image_width", patchSize = "patch_size"
            case numChannels = "num_channels", hiddenSize = "hidden_size", numLayers = "num_layers"
            case numHeads = "num_heads", intermediateSize = "intermediate_size", layerNormEps = "layer_norm_eps"
        }

        public var gridHeight: Int { imageHeight / patchSize }
        public var gridWidth: Int { imageWidth / patchSize }
        public var patches: Int { gridHeight * gridWidth }
        public var headDim: Int { hiddenSize / numHeads }
    }

    public struct Aligner: Codable, Sendable, Equatable {
        public var merge: Int
    }

    public struct ChunkSpec: Codable, Sendable, Equatable {
        public var length: Int
        public var ratio: Int
    }

    /// Optional boundary tokens around every visual block (like Qwen's `<|vision_start|>` /
    /// `<|vision_end|>`): token texts of the backbone's vocabulary. They are part of the block
    /// (bidirectional inside it) and take positions, so a finished chunk occupies
    /// m + (number of boundary tokens) positions.
    public struct SpecialTokens: Codable, Sendable, Equatable {
        public var visionStart: String?
        public var visionEnd: String?

        enum CodingKeys: String, CodingKey {
            case visionStart = "vision_start", visionEnd = "vision_end"
        }
    }

    /// A backbone adapter (LoRA, Hugging Face PEFT layout) and the rows it acts on: "visual"
    /// (the rows of visual blocks; text rows are the backbone's own) or "all" (docs/MODEL.md section 6).
    public struct Adapter: Codable, Sendable, Equatable {
        public var path: String
        public var scope: String
    }

    public var formatVersion: Int
    public var modelType: String
    public var backbone: String
    public var vision: Vision
    public var aligner: Aligner
    public var render: RenderConfig
    public var chunk: ChunkSpec
    public var specialTokens: SpecialTokens?
    /// The instruction the model was trained to transcribe a visual block after (`[ocr_prompt]
    /// V_i -> T_i`); `vist2ctl eval` measures OCR with it. Absent: no instruction.
    public var ocrPrompt: String?
    /// How the tokens of one visual block attend to each other: "bidirectional" (docs/MODEL.md
    /// section 3; the default when absent) or "causal" (each visual token sees the block's
    /// earlier ones only, as a causal backbone sees text: Training/EXPERIMENTS.md). Either way a
    /// block depends only on pixels, the instruction and earlier blocks, so its KV is cacheable.
    public var blockAttention: String?
    public var adapter: Adapter?

    /// Whether visual blocks are prefilled causally (`block_attention` "causal").
    public var causalBlocks: Bool { blockAttention == "causal" }

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version", modelType = "model_type", backbone, vision, aligner, render, chunk
        case specialTokens = "special_tokens"
        case ocrPrompt = "ocr_prompt"
        case blockAttention = "block_attention"
        case adapter
    }

    public static let currentFormatVersion = 1

    /// Visual tokens per chunk.
    public var visualTokens: Int { vision.patches / (aligner.merge * aligner.merge) }

    public static func load(path: String) throws(FormatError) -> VIST2Config {
        guard let data = FileManager.default.contents(atPath: path) else { throw FormatError(file: path, problem: .io("cannot read")) }
        let c: VIST2Config
        do {
            c = try JSONDecoder().decode(VIST2Config.self, from: data)
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw FormatError(
                file: path, problem: .missing("field '\((ctx.codingPath.map(\.stringValue) + [key.stringValue]).joined(separator: "."))'"))
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw FormatError(
                file: path, problem: .invalid("field '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))' has the wrong type"))
        } catch let DecodingError.valueNotFound(_, ctx) {
            throw FormatError(file: path, problem: .invalid("field '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))' is null"))
        } catch {
            throw FormatError(file: path, problem: .invalid("not a valid VIST2 config.json: \(error)"))
        }
        try c.validate(source: path)
        return c
    }

    /// Checks every field, naming the one at fault.
    public func validate(source: String) throws(FormatError) {
        func bad(_ s: String) -> FormatError { FormatError(file: source, problem: .invalid(s)) }
        guard formatVersion == Self.currentFormatVersion else {
            throw FormatError(file: source, problem: .unsupportedVersion(UInt32(clamping: max(0, formatVersion))))
        }
        guard modelType == "vist2" else { throw bad("model_type must be \"vist2\", got \"\(modelType)\"") }
        guard !backbone.isEmpty else { throw bad("backbone is empty") }
        let v = vision
        guard v.patchSize == 16 else { throw bad("vision.patch_size must be 16, got \(v.patchSize)") }
        guard v.numChannels == 1 || v.numChannels == 3 else { throw bad("vision.num_channels must be 1 or 3, got \(v.numChannels)") }
        guard v.imageHeight > 0, v.imageWidth > 0, v.imageHeight % 16 == 0, v.imageWidth % 16 == 0, v.patches <= 16384 else {
            throw bad("vision.image_height/image_width must be positive multiples of 16 (at most 16384 patches)")
        }
        guard v.hiddenSize > 0, v.hiddenSize <= 8192, v.numHeads > 0, v.hiddenSize % v.numHeads == 0 else {
            throw bad("vision.hidden_size \(v.hiddenSize) must be a positive multiple of vision.num_heads \(v.numHeads)")
        }
        guard (1...256).contains(v.numLayers), v.intermediateSize > 0, v.intermediateSize <= 65536 else {
            throw bad("vision.num_layers must be in 1...256 and vision.intermediate_size positive")
        }
        guard v.layerNormEps > 0, v.layerNormEps < 1 else { throw bad("vision.layer_norm_eps must be in (0, 1)") }
        let s = aligner.merge
        guard s >= 1, s <= 8, v.gridHeight % s == 0, v.gridWidth % s == 0 else {
            throw bad("aligner.merge \(s) must divide the patch grid \(v.gridHeight)x\(v.gridWidth)")
        }
        guard render.width == v.imageWidth, render.height == v.imageHeight else {
            throw bad("render canvas \(render.width)x\(render.height) must equal the vision image size \(v.imageWidth)x\(v.imageHeight)")
        }
        do { try render.validate() } catch { throw bad(error.description) }
        // A tile holds whole regions of one visual token, so no visual token straddles two pages.
        if let tile = render.tile, tile % (v.patchSize * s) != 0 {
            throw bad(
                "render.tile \(tile) must be a multiple of the region one visual token sees, vision.patch_size x aligner.merge = \(v.patchSize * s)"
            )
        }
        if let a = blockAttention, a != "bidirectional", a != "causal" {
            throw bad("block_attention must be \"bidirectional\" or \"causal\", got \"\(a)\"")
        }
        if let a = adapter {
            guard !a.path.isEmpty else { throw bad("adapter.path is empty") }
            guard LoRAAdapter.Scope(rawValue: a.scope) != nil else {
                throw bad("adapter.scope must be \"visual\" or \"all\", got \"\(a.scope)\"")
            }
        }
        guard chunk.ratio >= 1, chunk.length == chunk.ratio * visualTokens else {
            throw bad("chunk.length \(chunk.length) must equal chunk.ratio \(chunk.ratio) x visual tokens per chunk \(visualTokens)")
        }
    }
}

/// A hex SHA-256 of data.
func sha256Hex<D: DataProtocol>(_ data: D) -> String { SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined() }

func hexBytes(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var it = s.utf8.makeIterator()
    func nib(_ c: UInt8) -> UInt8 { c >= 97 ? c - 87 : (c >= 65 ? c - 55 : c - 48) }
    while let a = it.next(), let b = it.next() { out.append(nib(a) << 4 | nib(b)) }
    return out
}
