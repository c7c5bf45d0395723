import Foundation
import VistEngine
import VistProtocol

/// Generate, Compress, Perplexity and Bench: requests that run on the engine. Each is validated
/// here, prepared on the text queue (tokenizing, chunking) and then stepped by the engine worker
/// together with every other running request.
enum EngineHandlers {
    static func generate(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .generate(let g) = body else { return }
        let limits = s.limits, ctx = s.context
        var req = GenerationRequest(prompt: g.instruction)
        req.chat = g.chat
        // A VIST2 model can write past the backbone's context (finished chunks shrink to visual
        // tokens), so the bound is a sanity limit, not the context.
        guard g.maxTokens <= UInt32(clamping: limits.maxTokens) else {
            return s.error(id, .badRequest, "max_tokens \(g.maxTokens) is over the limit of \(limits.maxTokens)")
        }
        req.maxTokens = g.maxTokens == 0 ? limits.defaultMaxTokens : Int(g.maxTokens)
        guard g.stop.count <= limits.maxStopStrings, g.stop.allSatisfy({ $0.utf8.count <= limits.maxStopBytes }) else {
            return s.error(id, .badRequest, "at most \(limits.maxStopStrings) stop strings of at most \(limits.maxStopBytes) bytes")
        }
        req.stop = g.stop
        req.ignoreEOS = g.ignoreEos
        if g.hasSampling {
            req.sampling.temperature = g.sampling.temperature
            req.sampling.topK = Int(g.sampling.topK)
            req.sampling.topP = g.sampling.topP == 0 ? 1 : g.sampling.topP
            req.sampling.minP = g.sampling.minP
            req.sampling.repetitionPenalty = g.sampling.repetitionPenalty == 0 ? 1 : g.sampling.repetitionPenalty
            req.sampling.seed = g.sampling.seed
        }
        do { try req.validate() } catch { return s.error(id, .badRequest, error.description) }
        guard let docs = s.texts(id, g.documentIds) else { return }
        if !docs.isEmpty && s.vist2 == nil {
            return s.error(
                id, .unsupported, "the loaded model (\(ctx.modelName)) is a plain language model; documents need a VIST2 model")
        }
        req.documents = docs
        req.fullText = g.fullText
        let owner = s.cacheOwner(shared: g.shared)
        req.cache = ctx.blockCache(for: owner)
        req.sharingScope = owner.sharingScope
        req.previousChunking = s.chunking(g.documentIds)
        req.kvType = ctx.kvType
        let request = req, docIDs = g.documentIds
        guard let job = s.begin(id) else { return }
        s.textWork(id, job) { () throws(EngineError) in
            let task = try GenerationTask.prepare(request, model: ctx.model, isCancelled: { job.isCancelled })
            s.keep(task.chunking, for: docIDs)
            return .generation(
                task,
                onText: { piece in s.reply(id, final: false) { $0.textDelta = .with { $0.text = piece } } },
                onProgress: nil,
                onEnd: { cancelled in
                    let r = task.result
                    if let c = r.compression {
                        ctx.metrics.blocks(encoded: c.chunks_encoded, chunkHits: c.chunk_cache_hits, prefixHits: c.prefix_cache_hits)
                    }
                    ctx.metrics.generation(
                        prompt: r.prompt_tokens, generated: r.generated_tokens, prefillMs: r.prefill_ms, decodeMs: r.decode_ms,
                        kvPeak: r.kv_bytes, decodeTPS: r.decode_tokens_per_s)
                    s.end(id, job) {
                        if cancelled || r.stop_reason == .cancelled { return s.error(id, .cancelled, "cancelled") }
                        s.reply(id) { $0.generateResult = Conversions.generateResult(r) }
                    }
                })
        }
    }

    static func compress(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .compress(let c) = body else { return }
        let ctx = s.context
        guard let model = s.vist2 else {
            return s.error(id, .unsupported, "the loaded model (\(ctx.modelName)) has no vision encoder; compress needs a VIST2 model")
        }
        guard let text = s.texts(id, [c.documentID]) else { return }
        var req = GenerationRequest(prompt: c.instruction, documents: text)
        req.chat = c.chat
        req.cache = ctx.blockCache(for: s.cacheOwner(shared: c.shared))
        req.previousChunking = s.chunking([c.documentID])
        req.kvType = ctx.kvType
        let request = req
        guard let job = s.begin(id) else { return }
        s.textWork(id, job) { () throws(EngineError) in
            let task = try GenerationTask.prepareCompression(request, model: model, isCancelled: { job.isCancelled })
            s.keep(task.chunking, for: [c.documentID])
            return .generation(
                task, onText: { _ in },
                onProgress: { done, total in
                    s.reply(id, final: false) {
                        $0.compressProgress = .with {
                            $0.chunksDone = UInt32(done)
                            $0.chunksTotal = UInt32(total)
                        }
                    }
                },
                onEnd: { cancelled in
                    let r = task.compressionResult
                    ctx.metrics.blocks(encoded: r.chunks_encoded, chunkHits: r.chunk_cache_hits, prefixHits: r.prefix_cache_hits)
                    if !cancelled {
                        s.lock.lock()
                        s.documents[c.documentID]?.chunks = r.chunks
                        s.lock.unlock()
                    }
                    s.end(id, job) {
                        if cancelled { return s.error(id, .cancelled, "cancelled") }
                        s.reply(id) { $0.compressResult = Conversions.compressResult(r) }
                    }
                })
        }
    }

    static func perplexity(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .perplexity(let p) = body else { return }
        guard let text = s.texts(id, [p.documentID]) else { return }
        let lm = s.context.language, kvType = s.context.kvType
        let ctx = p.ctx == 0 ? s.limits.defaultPerplexityContext : Int(p.ctx)
        guard let job = s.begin(id) else { return }
        s.textWork(id, job) { () throws(EngineError) in
            let task = try PerplexityTask(
                model: lm, text: text[0], ctx: ctx, sliced: true, kvType: kvType, isCancelled: { job.isCancelled })
            var reported = 0
            return .steps(
                { ws in
                    let done = task.step(ws)
                    let p = task.progress
                    if p.windows != reported {
                        reported = p.windows
                        s.reply(id, final: false) {
                            $0.perplexityProgress = .with {
                                $0.windowsDone = UInt32(p.windows)
                                $0.windowsTotal = UInt32(task.windows)
                                $0.perplexity = p.perplexity
                            }
                        }
                    }
                    return done
                },
                onEnd: { cancelled in
                    s.end(id, job) {
                        if cancelled { return s.error(id, .cancelled, "cancelled") }
                        s.reply(id) { $0.perplexityResult = Conversions.perplexityResult(task.result) }
                    }
                })
        }
    }

    static func bench(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .bench(let b) = body else { return }
        let lm = s.context.language, kvType = s.context.kvType
        let repetitions = b.repetitions == 0 ? s.limits.defaultBenchRepetitions : Int(b.repetitions)
        let task: BenchTask
        do {
            task = try BenchTask(
                model: lm, prompt: Int(b.promptTokens), generate: Int(b.generatedTokens), repetitions: repetitions, sliced: true,
                kvType: kvType)
        } catch {
            return s.error(id, error)
        }
        guard let job = s.begin(id) else { return }
        s.context.worker.start(
            job,
            .steps(
                { ws in task.step(ws) },
                onEnd: { cancelled in
                    s.end(id, job) {
                        if cancelled { return s.error(id, .cancelled, "cancelled") }
                        s.reply(id) { $0.benchResult = Conversions.benchResult(task.result) }
                    }
                }))
    }
}
