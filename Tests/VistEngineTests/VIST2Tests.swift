import Foundation
import Testing

@testable import VistEngine
@testable import VistRender

/// The tiny random VIST2 model and golden logits of Training/make_tiny_golden.py (PyTorch
/// reference: the whole interleaved sequence at once, with the VIST2 mask and positions).
struct TinyVIST2Golden: Decodable {
    let magic: String
    let version: Int
    let instruction: String
    let document: String
    let continuation: String
    let chunk_length: Int
    let visual_tokens: Int
    let document_chunks: Int
    let rows: Int
    let vocab: Int
    let kv_after_swaps: [Int]
    let special_tokens: [String: String]?
    let block_attention: String?
    let adapter: [String: String]?

    static let directory: URL = Bundle.module.url(forResource: "Fixtures/tiny-vist2", withExtension: nil)!

    static func load(_ name: String = "golden") throws -> (TinyVIST2Golden, [Float]) {
        let g = try JSONDecoder().decode(TinyVIST2Golden.self, from: Data(contentsOf: directory.appendingPathComponent(name + ".json")))
        #expect(g.magic == "vist2-golden" && g.version == 1, "stale fixture: rerun Training/make_tiny_golden.py")
        let raw = try Data(contentsOf: directory.appendingPathComponent(name + ".f32"))
        let floats = raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        #expect(floats.count == g.rows * g.vocab)
        return (g, floats)
    }
}

@Suite("VIST2 inference against the PyTorch reference", .serialized)
struct VIST2Tests {
    static let model: Result<VIST2Model, Error> = Result { try VIST2Model(directory: TinyVIST2Golden.directory, threads: 2) }

    func request(_ g: TinyVIST2Golden, documents: [String]) -> GenerationRequest {
        GenerationRequest(prompt: g.instruction, documents: documents)
    }

    @Test("Logits match the reference through chunk-boundary swaps, and the KV cache holds instruction + m per chunk + live text")
    func goldenLogits() throws {
        try checkGolden(model: try Self.model.get(), name: "golden")
    }

    @Test("With boundary tokens around each block, logits and KV counts still match the reference")
    func goldenBoundaryTokens() throws {
        try checkPatchedGolden("golden-boundary")
    }

    @Test("With causal attention inside each block (block_attention \"causal\"), logits still match the reference")
    func goldenCausalBlocks() throws {
        let (g, causalLogits) = try TinyVIST2Golden.load("golden-causal")
        #expect(g.block_attention == "causal")
        try checkPatchedGolden("golden-causal")
        // The same model and scenario with bidirectional blocks: the two attentions really differ.
        let (bidirectional, bidirectionalLogits) = try TinyVIST2Golden.load("golden-boundary")
        #expect(bidirectional.block_attention == nil)
        #expect(causalLogits != bidirectionalLogits)
    }

    @Test("With a PEFT LoRA adapter on visual rows only, logits match the reference")
    func goldenAdapterVisual() throws {
        try checkPatchedGolden("golden-lora-visual")
    }

    @Test("With a PEFT LoRA adapter on every row, logits match the reference")
    func goldenAdapterAll() throws {
        try checkPatchedGolden("golden-lora-all")
        // The two scopes and the bare model really differ on this scenario.
        let (_, bare) = try TinyVIST2Golden.load("golden")
        let (_, visual) = try TinyVIST2Golden.load("golden-lora-visual")
        let (_, all) = try TinyVIST2Golden.load("golden-lora-all")
        #expect(bare != visual && visual != all)
    }

    /// A copy of the tiny model's directory (the caller removes it) with config.json patched by `patch`.
    static func patchedCopy(_ patch: [String: Any]) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-patched-\(UUID().uuidString)")
        try FileManager.default.copyItem(at: TinyVIST2Golden.directory, to: dir)
        let cfgURL = dir.appendingPathComponent("config.json")
        var cfg = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: cfgURL)) as? [String: Any])
        for (k, v) in patch { cfg[k] = v }
        try JSONSerialization.data(withJSONObject: cfg).write(to: cfgURL)
        return dir
    }

    /// A copy of the tiny model with config.json patched by `patch`, loaded.
    static func patchedModel(_ patch: [String: Any], threads: Int = 2) throws -> (VIST2Model, URL) {
        let dir = try patchedCopy(patch)
        do {
            return (try VIST2Model(directory: dir, threads: threads), dir)
        } catch {
            try? FileManager.default.removeItem(at: dir)
            throw error
        }
    }

    /// The tiny model with the golden's config patch (boundary tokens, block attention, adapter)
    /// applied in a copy, checked against that golden.
    func checkPatchedGolden(_ name: String) throws {
        let (g, _) = try TinyVIST2Golden.load(name)
        var patch: [String: Any] = [:]
        if let s = g.special_tokens { patch["special_tokens"] = s }
        if let a = g.block_attention { patch["block_attention"] = a }
        if let a = g.adapter { patch["adapter"] = a }
        #expect(!patch.isEmpty)
        let (model, dir) = try Self.patchedModel(patch)
        defer { try? FileManager.default.removeItem(at: dir) }
        #expect(model.blockSize == model.visualTokens + (g.special_tokens == nil ? 0 : 2))
        #expect(model.config.causalBlocks == (g.block_attention == "causal"))
        #expect(model.adapter?.scope.rawValue == g.adapter?["scope"])
        try checkGolden(model: model, name: name)
    }

    func checkGolden(model: VIST2Model, name: String) throws {
        let (g, golden) = try TinyVIST2Golden.load(name)
        #expect(model.visualTokens == g.visual_tokens && model.chunkLength == g.chunk_length)
        let ids = model.language.tokenizer.encode(g.continuation, addSpecial: false)
        #expect(ids.count == g.rows)
        var maxErr: Float = 0
        var swaps: [Int] = []
        let r = try GenerationTask.teacherForce(
            GenerationRequest(prompt: g.instruction, documents: [g.document]), model: model, tokens: ids,
            observe: { j, logits in
                for v in 0..<g.vocab {
                    let ref = golden[j * g.vocab + v]
                    maxErr = max(maxErr, abs(logits[v] - ref) / max(1, abs(ref)))
                }
            }, onSwap: { swaps.append($0) })
        #expect(maxErr < 1e-4, "max relative logit error \(maxErr)")
        let c = try #require(r.compression)
        #expect(c.chunks == g.document_chunks - 1 + g.kv_after_swaps.count)
        #expect(swaps == g.kv_after_swaps, "KV entries after each swap")
        #expect(c.swaps == g.kv_after_swaps.count && c.swaps >= 2 && c.swap_ms > 0)
        // Final cache: instruction + m per finished chunk + the live text of the last chunk (the
        // last forced token is never run: nothing follows it).
        let len0 = model.language.tokenizer.encode(String(model.chunker.chunks(g.document).last!.text), addSpecial: false).count
        let live = len0 + ids.count - 1 - c.swaps * g.chunk_length
        #expect(r.kv_bytes_final == 2 * model.language.config.layers * model.language.config.kvDim * 4 * (g.kv_after_swaps.last! + live))
        #expect(c.visual_tokens == c.chunks * g.visual_tokens)
    }

    @Test("A chunk swap goes through the block cache like the documents: the same generation again finds its blocks, same logits")
    func swapsThroughBlockCache() throws {
        let (g, _) = try TinyVIST2Golden.load()
        let model = try Self.model.get()
        let ids = model.language.tokenizer.encode(g.continuation, addSpecial: false)
        let store = MemoryBlockCache()
        func run(_ cache: VIST2BlockCache?) throws -> (GenerationResult, [[Float]]) {
            var req = request(g, documents: [g.document])
            req.cache = cache
            var rows: [[Float]] = []
            let r = try GenerationTask.teacherForce(req, model: model, tokens: ids, observe: { _, l in rows.append(Array(l)) })
            return (r, rows)
        }
        let (first, firstRows) = try run(store)
        let c1 = try #require(first.compression)
        let documentBlocks = g.document_chunks - 1
        #expect(c1.swaps >= 2 && c1.prefix_cache_hits == 0 && c1.chunks_encoded == documentBlocks + c1.swaps)
        // Every block, the documents' and the swaps', stored at both levels.
        #expect(store.blocks.count == documentBlocks + c1.swaps && store.outputs.count == documentBlocks + c1.swaps)
        let (second, secondRows) = try run(store)
        let c2 = try #require(second.compression)
        #expect(c2.swaps == c1.swaps && c2.prefix_cache_hits == documentBlocks + c2.swaps && c2.chunks_encoded == 0)
        #expect(secondRows == firstRows, "a block from the cache is the block computed")
        // Without a block cache, the same numbers.
        let (_, plainRows) = try run(nil)
        #expect(plainRows == firstRows)
    }

    @Test(
        "Identical requests over the same documents, decoded together, share attention parts through their swaps and get exactly their own logits"
    )
    func sharedDocumentsBatched() throws {
        let (g, _) = try TinyVIST2Golden.load()
        let model = try Self.model.get()
        let tf = model.language.transformer, ws = tf.makeWorkspace()
        var req = request(g, documents: [Array(repeating: g.document, count: 8).joined(separator: "\n")])
        req.kvType = .f16
        req.maxTokens = 2 * model.chunkLength + 4
        req.sampling = .greedy
        req.ignoreEOS = true
        let one = try GenerationTask.prepare(req, model: .vist2(model))
        let alone = runAlone(one, ws: ws)
        #expect(ws.sharedParts == 0)
        let swaps = try #require(one.result.compression).swaps
        // The lineage covers every block: the documents' and the swaps'.
        let lineage = try #require(one.cache.lineage)
        #expect(swaps >= 2 && lineage.positions >= Transformer.attentionPart && lineage.positions == one.base)
        let tasks = try (0..<3).map { _ in try GenerationTask.prepare(req, model: .vist2(model)) }
        let batched = runBatched(tasks, tf: tf, ws: ws)
        for (i, t) in tasks.enumerated() {
            #expect(batched[i] == alone, "request \(i)")
            #expect(t.result.token_ids == one.result.token_ids && t.cache.lineage == lineage)
        }
        #expect(ws.sharedParts > 0)
    }

    @Test("Earlier chunks given as images or as text give identical logits: their text never reaches the model otherwise")
    func imagesOnly() throws {
        let (g, _) = try TinyVIST2Golden.load()
        let model = try Self.model.get()
        let chunks = model.chunker.chunks(g.document)
        let images = chunks.dropLast().map { model.renderer.render($0.text).image.normalized() }
        let ids = Array(model.language.tokenizer.encode(g.continuation, addSpecial: false).prefix(20))
        func logits(_ req: GenerationRequest) throws -> [[Float]] {
            var rows: [[Float]] = []
            _ = try GenerationTask.teacherForce(req, model: model, tokens: ids, observe: { _, l in rows.append(Array(l)) })
            return rows
        }
        let fromText = try logits(request(g, documents: [g.document]))
        var imageReq = request(g, documents: [String(chunks.last!.text)])
        imageReq.images = images
        let fromImages = try logits(imageReq)
        #expect(fromText == fromImages)
        // A different image for the first chunk changes them: the model really reads the pixels.
        imageReq.images[0] = model.renderer.render("completely different words\n").image.normalized()
        #expect(try logits(imageReq) != fromText)
    }

    @Test("Full-text mode reads the same documents with more KV and FLOPs than VIST2")
    func fullTextMode() throws {
        let (g, _) = try TinyVIST2Golden.load()
        let model = try Self.model.get()
        var req = request(g, documents: [g.document, g.document, g.document])
        req.maxTokens = 40
        req.sampling = .greedy
        let compressed = try GenerationTask.generate(req, model: .vist2(model))
        req.fullText = true
        let full = try GenerationTask.generate(req, model: .vist2(model))
        let (cc, fc) = (try #require(compressed.compression), try #require(full.compression))
        #expect(fc.mode == "full-text" && cc.mode == "vist2")
        #expect(fc.visual_tokens == 0 && cc.visual_tokens > 0)
        #expect(compressed.kv_bytes < full.kv_bytes)
        #expect(compressed.flops < full.flops)
        #expect(cc.compression_ratio > 1)
        #expect(fc.doc_text_tokens == cc.doc_text_tokens)
    }

    @Test("A model whose visual block does not fit one forward batch is refused at load, not trapped on at prefill")
    func blockLargerThanBatch() throws {
        let m = try Self.model.get()
        #expect(throws: Never.self) { _ = try VIST2Model(directory: TinyVIST2Golden.directory, threads: 1, maxBatch: m.blockSize) }
        do {
            _ = try VIST2Model(directory: TinyVIST2Golden.directory, threads: 1, maxBatch: m.blockSize - 1)
            Issue.record("a block of \(m.blockSize) positions loaded with batches of \(m.blockSize - 1)")
        } catch {
            guard case .format(let f) = error else {
                Issue.record("expected a format error, got \(error)")
                return
            }
            #expect(f.description.contains("visual block takes \(m.blockSize) positions"), "\(f)")
        }
    }

    @Test("A vision checkpoint with a missing or misshapen tensor names it; a wrong font is refused")
    func badVisionWeights() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-vis-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.copyItem(at: TinyVIST2Golden.directory, to: dir)
        // Rewrite vision.safetensors without one tensor and with another reshaped.
        let path = dir.appendingPathComponent("vision.safetensors").path
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let n = Int(bytes.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        var header = try #require(try JSONSerialization.jsonObject(with: bytes[8..<(8 + n)]) as? [String: Any])
        let body = bytes[(8 + n)...]
        func write(_ h: [String: Any]) throws {
            let hj = try JSONSerialization.data(withJSONObject: h)
            var out = Data()
            withUnsafeBytes(of: UInt64(hj.count).littleEndian) { out.append(contentsOf: $0) }
            out.append(hj)
            out.append(body)
            try out.write(to: URL(fileURLWithPath: path))
        }
        func loadError() -> String {
            do {
                _ = try VIST2Model(directory: dir, threads: 1)
                return "accepted"
            } catch { return error.description }
        }
        let missing = "vision_model.encoder.layers.1.mlp.fc2.weight"
        let saved = header.removeValue(forKey: missing)
        try write(header)
        #expect(loadError().contains(missing))
        header[missing] = saved
        var t = header["aligner.weight"] as! [String: Any]
        t["shape"] = [32, 128]
        header["aligner.weight"] = t
        try write(header)
        #expect(loadError().contains("aligner.weight"))

        // A config naming another font file hash.
        try FileManager.default.removeItem(atPath: path)
        try FileManager.default.copyItem(
            at: TinyVIST2Golden.directory.appendingPathComponent("vision.safetensors"), to: URL(fileURLWithPath: path))
        let cfgURL = dir.appendingPathComponent("config.json")
        var cfg = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: cfgURL)) as? [String: Any])
        var render = cfg["render"] as! [String: Any]
        render["font_sha256"] = String(repeating: "0", count: 64)
        cfg["render"] = render
        try JSONSerialization.data(withJSONObject: cfg).write(to: cfgURL)
        #expect(loadError().contains("sha256"))
    }

    @Test("Damaged VIST2 configs name the field at fault")
    func badConfig() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-cfg-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let good =
            try JSONSerialization.jsonObject(with: Data(contentsOf: TinyVIST2Golden.directory.appendingPathComponent("config.json")))
            as! [String: Any]
        func error(_ edit: (inout [String: Any]) -> Void) throws -> String {
            var c = good
            edit(&c)
            let path = dir.appendingPathComponent("config.json").path
            try JSONSerialization.data(withJSONObject: c).write(to: URL(fileURLWithPath: path))
            do {
                _ = try VIST2Config.load(path: path)
                return "accepted"
            } catch { return error.description }
        }
        #expect(try error { $0["format_version"] = 7 }.contains("version 7"))
        #expect(try error { $0["model_type"] = "llava" }.contains("model_type"))
        #expect(try error { $0["chunk"] = ["length": 31, "ratio": 4] }.contains("chunk.length"))
        #expect(
            try error {
                var v = $0["vision"] as! [String: Any]; v["patch_size"] = 14; $0["vision"] = v
            }.contains("patch_size"))
        #expect(try error { $0["aligner"] = ["merge": 3] }.contains("aligner.merge"))
        #expect(try error { $0.removeValue(forKey: "render") }.contains("render"))
        #expect(
            try error {
                var r = $0["render"] as! [String: Any]; r["width"] = 256; $0["render"] = r
            }.contains("render canvas"))
        // A tiled layout's tile holds whole regions of one visual token (32 x 32 pixels here).
        #expect(
            try error {
                var r = $0["render"] as! [String: Any]; r["tile"] = 16; $0["render"] = r
            }.contains("render.tile 16 must be a multiple of the region"))
        #expect(
            try error {
                var r = $0["render"] as! [String: Any]; r["tile"] = 64; $0["render"] = r
            } == "accepted")
        #expect(try error { $0["block_attention"] = "sideways" }.contains("block_attention"))
        #expect(try error { $0["block_attention"] = "causal" } == "accepted")
    }

    @Test("Generated short lines that re-chunk into several images per swap grow the KV cache, then end cleanly at the context")
    func swapsThatNeedMoreBlocksThanPlanned() throws {
        let model = try Self.model.get()
        let tok = model.language.tokenizer
        // One number per line: a chunk of L tokens holds more lines than a canvas has rows, so
        // every swap becomes several images, more blocks than the generation planned for.
        let text = (1...400).map { "\($0)\n" }.joined()
        let ids = tok.encode(text, addSpecial: false)
        let L = model.chunkLength
        #expect(model.chunker.chunks(tok.decode(ids[0..<L])).count > 1)
        var swaps: [Int] = []
        let req = GenerationRequest(prompt: "Count.")
        let some = try GenerationTask.teacherForce(
            req, model: model, tokens: Array(ids[0...(6 * L)]), observe: { _, _ in }, onSwap: { swaps.append($0) })
        #expect(some.generated_tokens == 6 * L + 1 && some.stop_reason == .maxTokens && swaps.count == 6)
        #expect((some.compression?.chunks ?? 0) > swaps.count)
        // Far past what the context holds: the generation stops at the context, no trap.
        let all = try GenerationTask.teacherForce(req, model: model, tokens: ids, observe: { _, _ in })
        #expect(all.stop_reason == .contextFull && all.generated_tokens < ids.count)
        #expect(all.kv_bytes <= model.language.config.contextLength * 2 * model.language.config.layers * model.language.config.kvDim * 4)
    }
}

/// A `VIST2BlockCache` in memory: both levels as dictionaries.
final class MemoryBlockCache: VIST2BlockCache, @unchecked Sendable {
    var outputs: [[UInt8]: [Float]] = [:]
    var blocks: [[UInt8]: [UInt8]] = [:]
    func alignerOutput(key: [UInt8]) -> [Float]? { outputs[key] }
    func storeAlignerOutput(key: [UInt8], _ values: ArraySlice<Float>) { outputs[key] = Array(values) }
    func blockKV(key: [UInt8]) -> [UInt8]? { blocks[key] }
    func storeBlockKV(key: [UInt8], _ bytes: [UInt8]) { blocks[key] = bytes }
}
