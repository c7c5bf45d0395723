import Foundation
import Testing
import VistClient
import VistProtocol

@testable import VistEngine
@testable import VistServer

/// Reads replies on `c` until `ids` all had their final one; returns the finals and, per id, the
/// text deltas and their arrival order across all ids (a global sequence number).
func collect(_ c: VistClient, _ ids: Set<UInt64>) throws -> (finals: [UInt64: Vist2_V1_ServerMessage], order: [(UInt64, String)]) {
    var finals: [UInt64: Vist2_V1_ServerMessage] = [:]
    var order: [(UInt64, String)] = []
    while finals.count < ids.count {
        let r = try c.receive()
        guard ids.contains(r.requestID) else { continue }
        if r.final { finals[r.requestID] = r } else if case .textDelta(let d) = r.body { order.append((r.requestID, d.text)) }
    }
    return (finals, order)
}

@Suite("Continuous batching in the daemon", .serialized)
struct BatchingTests {
    static let prompts = ["Once upon a time", "The license says", "1, 2, 3,", "def main():"]

    func request(_ prompt: String, tokens: UInt32) -> Vist2_V1_GenerateRequest {
        var g = generateRequest(prompt, tokens: tokens)
        g.ignoreEos = true
        return g
    }

    @Test("Concurrent greedy generations decode in the same steps and each gets exactly what it gets alone")
    func concurrentEqualsAlone() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        var alone: [Vist2_V1_GenerateResult] = []
        for p in Self.prompts { alone.append(try c.generate(request(p, tokens: 40))) }
        // All four on one connection at once, prepared while a job of the test's own holds the
        // engine (the tiny model writes 40 tokens in milliseconds, faster than the text queue
        // may prepare the next request), then released together: they run together.
        let gate = DispatchSemaphore(value: 0)
        // (A finished request's final reply goes out just before it leaves the worker.)
        #expect(try eventually { d.context.worker.isIdle })
        #expect(d.context.worker.submit(EngineWorker.Job { _ in gate.wait() }))
        #expect(try eventually { d.context.worker.activeCount == 1 })  // it holds the engine
        for (i, p) in Self.prompts.enumerated() {
            try c.send(
                .with {
                    $0.requestID = UInt64(i + 1)
                    $0.generate = request(p, tokens: 40)
                })
        }
        let w = d.context.worker
        #expect(try eventually { w.queueLength == 4 }, "queue \(w.queueLength), active \(w.activeCount)")
        Thread.sleep(forTimeInterval: 0.5)  // their preparation (tokenizing four words) is done
        gate.signal()
        let (finals, order) = try collect(c, Set(1...4))
        for i in 0..<4 {
            let r = finals[UInt64(i + 1)]!.generateResult
            #expect(r.tokenIds == alone[i].tokenIds, "prompt \(i)")
            #expect(r.text == alone[i].text && r.generatedTokens == 40)
            #expect(r.flops == alone[i].flops, "each request counts its own FLOPs")
        }
        // They interleaved: some request streamed between two deltas of another, and every
        // request had its first delta before any request had its last.
        let firsts = (1...4).map { id in order.firstIndex { $0.0 == UInt64(id) }! }
        let lasts = (1...4).map { id in order.lastIndex { $0.0 == UInt64(id) }! }
        #expect(firsts.max()! < lasts.min()!, "the four decoded at the same time")
    }

    @Test("Cancelling one request of a batch ends it at the next step; the others go on unchanged")
    func cancelInsideBatch() throws {
        let d = try TestDaemon()
        let c = try VistClient(socketPath: d.path)
        let alone = try c.generate(request(Self.prompts[0], tokens: 300))
        for (i, p) in Self.prompts.prefix(3).enumerated() {
            try c.send(
                .with {
                    $0.requestID = UInt64(i + 1)
                    $0.generate = request(p, tokens: 300)
                })
        }
        // Once request 2 streams, cancel it.
        while true {
            let r = try c.receive()
            if r.requestID == 2 && !r.final { break }
        }
        try c.send(
            .with {
                $0.requestID = 10
                $0.cancel = .with { $0.targetRequestID = 2 }
            })
        let (finals, _) = try collect(c, [1, 2, 3, 10])
        #expect(finals[2]?.error.code == .cancelled)
        #expect(finals[10]?.body == .ack(Vist2_V1_Ack()))
        #expect(finals[1]?.generateResult.tokenIds == alone.tokenIds)
        #expect(finals[3]?.generateResult.generatedTokens == 300)
        #expect(try eventually { d.context.worker.isIdle })
    }

    @Test("A long prefill does not freeze another client's decoding: it gets a token between the prefill's steps")
    func longPrefillInterleaves() throws {
        let d = try TestDaemon()
        let decoding = try VistClient(socketPath: d.path), reading = try VistClient(socketPath: d.path)
        try decoding.send(
            .with {
                $0.requestID = 1
                $0.generate = request("Keep writing", tokens: 5000)
            })
        _ = try decoding.receive()  // it is decoding
        // A document of ~40 chunks: ~45 prefill steps (encodings and visual blocks), no cache.
        let doc = try reading.openDocument(text: smallDoc)
        var g = greedy([doc.documentID], tokens: 4)
        g.instruction = "Read:"
        let counter = LogLines()
        nonisolated(unsafe) let dc = decoding
        let reader = Thread {
            while let r = try? dc.receive(), r.requestID == 1, !r.final { counter.add("t") }
        }
        reader.start()
        let before = counter.all.count
        let r = try reading.generate(g)
        let during = counter.all.count - before
        #expect(r.chunks >= 30)
        // One turn of the worker: a token for every decoding request, then one prefill step.
        #expect(during >= Int(r.chunks), "only \(during) tokens of the other client during \(r.chunks) blocks of prefill")
        try decoding.send(
            .with {
                $0.requestID = 2
                $0.cancel = .with { $0.targetRequestID = 1 }
            })
    }

    @Test("Connections take turns for prefill steps: two long jobs alternate, step by step")
    func prefillStepsAlternate() throws {
        let model = try VIST2Model(directory: TestDaemon.modelDir, threads: 1)
        let w = EngineWorker(capacity: 16, transformer: model.language.transformer)
        let order = LogLines()
        let a = NSObject(), b = NSObject(), c = NSObject()
        // Both jobs get their work while a job of a third connection holds the engine.
        let gate = DispatchSemaphore(value: 0)
        #expect(w.submit(EngineWorker.Job(owner: ObjectIdentifier(c)) { _ in gate.wait() }))
        Thread.sleep(forTimeInterval: 0.1)
        for (owner, name) in [(a, "a"), (b, "b")] {
            let job = EngineWorker.Job(owner: ObjectIdentifier(owner))
            #expect(w.submit(job))
            var step = 0
            w.start(
                job,
                .steps(
                    { _ in
                        step += 1
                        order.add("\(name)\(step)")
                        return step == 3
                    }, onEnd: { _ in }))
        }
        gate.signal()
        w.drain(deadline: .seconds(60))
        #expect(order.all == ["a1", "b1", "a2", "b2", "a3", "b3"])
    }

    @Test("A generation that ends in its chunk swap (the images no longer fit the context) leaves the worker, beside another")
    func generationEndingInASwap() throws {
        let model = try VIST2Model(directory: TestDaemon.modelDir, threads: 1)
        let tok = model.language.tokenizer
        // A letter and blank lines: each chunk of L tokens re-chunks into five images, more room
        // than the text it replaces, so near the end of the context the swap is what no longer
        // fits (this prompt puts the boundary there) and the generation ends in it, not in a
        // decode step.
        let ids = tok.encode(String(repeating: "a\n\n\n\n", count: 900), addSpecial: false)
        #expect(model.chunker.chunks(tok.decode(ids[0..<model.chunkLength])).count == 5)
        var r = GenerationRequest(prompt: "Count" + String(repeating: " on", count: 9) + ".")
        r.maxTokens = ids.count
        r.sampling = .greedy
        let forced = GenerationTask.Forced(tokens: ids, observe: { _, _ in }, onSwap: { _ in })
        let task = try GenerationTask(r, model: .vist2(model), forced: forced, compressOnly: false, isCancelled: nil)
        var other = GenerationRequest(prompt: "Hello")
        other.maxTokens = 4
        other.ignoreEOS = true
        let beside = try GenerationTask.prepare(other, model: .vist2(model))
        let w = EngineWorker(capacity: 4, transformer: model.language.transformer)
        let ended = DispatchSemaphore(value: 0)
        for t in [task, beside] {
            let job = EngineWorker.Job()
            #expect(w.submit(job))
            w.start(job, .generation(t, onText: { _ in }, onProgress: nil, onEnd: { _ in ended.signal() }))
        }
        #expect(ended.wait(timeout: .now() + 120) == .success && ended.wait(timeout: .now() + 120) == .success)
        w.drain(deadline: .seconds(10))
        #expect(w.isIdle)
        let result = task.result
        #expect(result.stop_reason == .contextFull && result.generated_tokens < ids.count)
        // It ended in the swap: the chunk it was writing is still there, whole.
        #expect(task.current.count >= model.chunkLength)
        #expect(beside.result.generated_tokens == 4)
    }
}
