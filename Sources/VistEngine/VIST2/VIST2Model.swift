import Crypto
import Foundation
import VistFormats
import VistKernels
import VistRender
import VistTokenizer

/// A loaded VIST2 model: the backbone (a `LanguageModel`), the vision encoder and aligner,
/// the sketch renderer and the chunker, all configured by the model directory's config.json.
public final class VIST2Model: @unchecked Sendable {
    public let directory: URL
    public let config: VIST2Config
    /// sha256 over config.json, vision.safetensors, the backbone's and the adapter's files: identifies the model
    /// in caches and in the protocol.
    public let fingerprint: String
    public let language: LanguageModel
    public let vision: VisionEncoder
    public let renderer: SketchRenderer
    public let chunker: Chunker
    /// The backbone adapter named by config.json, attached to `language.transformer`.
    public let adapter: LoRAAdapter?

    /// Visual tokens per chunk (m).
    public var visualTokens: Int { config.visualTokens }
    /// What rendering `chunks` gives (every chunk an image, as `vist2ctl render` and the daemon's
    /// render request report it): their text tokens, visual tokens, and text tokens per visual
    /// token (0 without chunks).
    public func renderTotals(_ chunks: [Chunk]) -> (tokens: Int, visualTokens: Int, ratio: Double) {
        let tokens = chunks.map(\.tokens).reduce(0, +), visual = chunks.count * visualTokens
        return (tokens, visual, visual > 0 ? Double(tokens) / Double(visual) : 0)
    }

    /// Boundary token ids around each visual block (from `special_tokens`), if configured.
    public let visionStart: Int32?
    public let visionEnd: Int32?
    /// Positions (and KV entries) one finished chunk occupies: m plus its boundary tokens.
    public var blockSize: Int { Self.blockSize(visualTokens: visualTokens, start: visionStart, end: visionEnd) }

    static func blockSize(visualTokens: Int, start: Int32?, end: Int32?) -> Int {
        visualTokens + (start == nil ? 0 : 1) + (end == nil ? 0 : 1)
    }
    /// Text tokens per chunk (L).
    public var chunkLength: Int { config.chunk.length }
    /// The fingerprint as 32 bytes, and a sha256 of the render config (canonical JSON): the
    /// identity every persistent cache entry carries in its header.
    public let fingerprintBytes: [UInt8]
    public let renderConfigHash: [UInt8]

    /// `maxBatch`: rows per forward batch of the backbone (a visual block must fit one).
    public init(directory: URL, threads: Int = LanguageModel.defaultThreads, maxBatch: Int = 512) throws(EngineError) {
        self.directory = directory
        let configPath = directory.appendingPathComponent("config.json").path
        let visionPath = directory.appendingPathComponent("vision.safetensors").path
        do {
            config = try VIST2Config.load(path: configPath)
        } catch {
            throw .format(error)
        }
        let backboneURL = try Self.backboneURL(config: config, directory: directory)
        language = try LanguageModel(url: backboneURL, threads: threads, maxBatch: maxBatch)
        if let spec = config.adapter, let scope = LoRAAdapter.Scope(rawValue: spec.scope) {
            let url = spec.path.hasPrefix("/") ? URL(fileURLWithPath: spec.path) : directory.appendingPathComponent(spec.path)
            do {
                let a = try LoRAAdapter(directory: url, scope: scope, config: language.config)
                language.transformer.attach(a)
                adapter = a
            } catch {
                throw .format(error)
            }
        } else {
            adapter = nil
        }
        do {
            let file = try SafetensorsFile(path: visionPath)
            vision = try VisionEncoder(
                file: file, config: config.vision, merge: config.aligner.merge, outputDim: language.config.dim,
                pool: language.transformer.pool)
        } catch {
            throw .format(error)
        }
        do {
            renderer = try SketchRenderer(config: config.render, baseDirectory: directory)
        } catch {
            throw .badArgument("\(configPath): \(error.description)")
        }
        let tokenizer = language.tokenizer
        func special(_ text: String?, _ field: String) throws(EngineError) -> Int32? {
            guard let text else { return nil }
            let ids = tokenizer.encode(text, addSpecial: false, parseSpecial: true)
            guard ids.count == 1 else {
                throw .format(
                    FormatError(
                        file: configPath,
                        problem: .invalid("special_tokens.\(field) '\(text)' is not one token of the backbone's vocabulary")))
            }
            return ids[0]
        }
        visionStart = try special(config.specialTokens?.visionStart, "vision_start")
        visionEnd = try special(config.specialTokens?.visionEnd, "vision_end")
        // A block attends to itself in both directions, so it is prefilled in one batch.
        // (Checked before the fingerprint hashes the files; `blockSize` needs every property set.)
        let block = Self.blockSize(visualTokens: config.visualTokens, start: visionStart, end: visionEnd)
        guard block <= language.transformer.maxBatch else {
            throw .format(
                FormatError(
                    file: configPath,
                    problem: .invalid(
                        "a visual block takes \(block) positions, more than one forward batch of \(language.transformer.maxBatch) rows")))
        }
        chunker = Chunker(renderer: renderer, maxTokens: config.chunk.length) { tokenizer.encode(String($0), addSpecial: false).count }
        fingerprint = Self.fingerprint(files: [configPath, visionPath] + Self.backboneFiles(backboneURL) + (adapter?.files ?? []))
        fingerprintBytes = hexBytes(fingerprint)
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        renderConfigHash = Array(SHA256.hash(data: (try? enc.encode(config.render)) ?? Data()))
    }

    // MARK: cache keys (docs/MODEL.md section 5)

    /// Key of a chunk's aligner output: its text, the render config and the model. It does not
    /// depend on where the chunk sits, so it survives edits elsewhere in the document.
    public func chunkKey(_ text: Substring) -> [UInt8] {
        var h = SHA256()
        h.update(data: Array("vist2/chunk/v1\0".utf8))
        h.update(data: fingerprintBytes)
        h.update(data: renderConfigHash)
        h.update(data: Array(text.utf8))
        return Array(h.finalize())
    }

    /// Root of the prefix chain: the model, the text prefilled before the first visual block
    /// (visual tokens attend to it, and its length sets the blocks' positions) and the KV
    /// cache's element type (an f16 entry holds other bytes than an f32 one), under the version of
    /// the engine's arithmetic: v2 prefills with 8-bit activations (the integer kernels at every
    /// batch size), so entries v1 wrote with f32 activations are other bytes and are not served.
    public func prefixRoot(_ instruction: [Int32], kvType: KVType = .f32) -> [UInt8] {
        var h = SHA256()
        h.update(data: Array("vist2/prefix/v2\0".utf8))
        if kvType != .f32 { h.update(data: Array("kv=\(kvType.rawValue)\0".utf8)) }
        h.update(data: fingerprintBytes)
        var n = UInt32(instruction.count).littleEndian
        withUnsafeBytes(of: &n) { h.update(bufferPointer: $0) }
        instruction.withUnsafeBytes { h.update(bufferPointer: $0) }
        return Array(h.finalize())
    }

    /// Key of the KV entries of chunk i's visual block: hash(key of block i-1, chunk key i), so
    /// it names the instruction and every chunk up to and including i.
    public func prefixKey(_ previous: [UInt8], _ chunk: [UInt8]) -> [UInt8] {
        var h = SHA256()
        h.update(data: previous)
        h.update(data: chunk)
        return Array(h.finalize())
    }

    /// The backbone a VIST2 model directory names: a known model name, or a path relative to
    /// the directory.
    public static func backboneURL(directory: URL) throws(EngineError) -> URL {
        let config: VIST2Config
        do { config = try VIST2Config.load(path: directory.appendingPathComponent("config.json").path) } catch { throw .format(error) }
        return try backboneURL(config: config, directory: directory)
    }

    static func backboneURL(config: VIST2Config, directory: URL) throws(EngineError) -> URL {
        let backbone = config.backbone
        if ModelStore.known.contains(where: { $0.names.contains(backbone.lowercased()) }) {
            return try ModelStore.resolve(backbone)
        }
        let p = backbone.hasPrefix("/") ? backbone : directory.appendingPathComponent(backbone).path
        guard FileManager.default.fileExists(atPath: p) else {
            throw .modelNotFound("\(directory.appendingPathComponent("config.json").path): backbone '\(backbone)' not found at \(p)")
        }
        let url = URL(fileURLWithPath: p)
        guard !isModelDirectory(url) else { throw .badArgument("backbone '\(backbone)' is itself a VIST2 model directory") }
        return url
    }

    /// Whether `url` is a directory whose config.json says `"model_type": "vist2"`.
    public static func isModelDirectory(_ url: URL) -> Bool {
        guard let data = FileManager.default.contents(atPath: url.appendingPathComponent("config.json").path),
            let obj = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        else { return false }
        return obj["model_type"] as? String == "vist2"
    }

    static func backboneFiles(_ url: URL) -> [String] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir), isDir.boolValue else { return [url.path] }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: url.path)) ?? []
        return names.filter { $0.hasSuffix(".json") || $0.hasSuffix(".safetensors") }.sorted().map { url.appendingPathComponent($0).path }
    }

    /// sha256 of the concatenated sha256s of the files, in order.
    static func fingerprint(files: [String]) -> String {
        var all = Data()
        for f in files {
            let data = (try? Data(contentsOf: URL(fileURLWithPath: f), options: .alwaysMapped)) ?? Data()
            all.append(contentsOf: Array(sha256Hex(data).utf8))
        }
        return sha256Hex(all)
    }

    /// Renders chunk texts and encodes them into visual tokens: (chunks * m, dim).
    public func encodeChunks(_ texts: [Substring]) -> (embeddings: [Float], renderNs: UInt64, visionNs: UInt64) {
        let t0 = DispatchTime.now().uptimeNanoseconds
        let images = texts.map { renderer.render($0).image.normalized() }
        let t1 = DispatchTime.now().uptimeNanoseconds
        let e = vision.encode(images)
        let t2 = DispatchTime.now().uptimeNanoseconds
        return (e, t1 - t0, t2 - t1)
    }
}
