import Dispatch
import Foundation
import Synchronization
import VistEngine

/// One engine, one worker thread that steps every running request together (continuous
/// batching; docs/ARCHITECTURE.md, "The daemon").
///
/// A request becomes a `Job` as soon as it is accepted (its text work may still be preparing it
/// elsewhere); once it has engine work (`start`), each turn of the loop:
///
/// 1. ends jobs that were cancelled (their clients get CANCELLED at once, not after the request);
/// 2. lets every generation whose logits are ready sample its next token and stream it;
/// 3. runs one batched decoding step over every generation waiting for a forward pass: the
///    weights are read once for all of them, each row attends to its own KV cache;
/// 4. gives one bounded step (a prefill slice, one visual block, a perplexity slice, a bench
///    pass) to one job that needs steps of its own, taking turns between connections.
///
/// So a long prefill never freezes others' decoding (they get a token between each of its
/// slices), a short request starts within one turn, and each request's state (KV cache, logits,
/// counters) is its own: nothing is paused, nested or subtracted.
///
/// Bounds: at most `maxActive` jobs run at once; up to `capacity` more wait (oldest job of the
/// connection served longest ago first), and past that `submit` refuses, so a client gets BUSY
/// instead of hanging.
public final class EngineWorker: @unchecked Sendable {
    public final class Job: @unchecked Sendable {
        public let owner: ObjectIdentifier?
        let cancelled = Atomic<Bool>(false)
        fileprivate var work: Work? = nil
        fileprivate var active = false

        public init(owner: ObjectIdentifier? = nil) { self.owner = owner }

        /// A job whose engine work is one step running `run` (tests, and work that is one piece).
        public convenience init(owner: ObjectIdentifier? = nil, run: @escaping (Job) -> Void) {
            self.init(owner: owner)
            work = .call { [unowned self] in run(self) }
        }

        public var isCancelled: Bool { cancelled.load(ordering: .acquiring) }
        public func cancel() { cancelled.store(true, ordering: .releasing) }
    }

    /// What a job runs on the engine thread. `onEnd(cancelled)` is called there once, when the
    /// job ends (done, or cancelled: then it stopped at a step boundary).
    public enum Work {
        /// A generation (or a compression, which ends with its prefill): prefill steps of its own,
        /// then batched decoding. `onText` receives each piece of text, `onProgress` the
        /// documents' blocks done and total after each prefill step that advanced them.
        case generation(
            GenerationTask, onText: (String) -> Void, onProgress: ((Int, Int) -> Void)?, onEnd: (Bool) -> Void)
        /// Steps until `step` returns true (perplexity windows, bench passes).
        case steps((Workspace) -> Bool, onEnd: (Bool) -> Void)
        /// One step that needs no model (`Job(owner:run:)`).
        case call(() -> Void)
    }

    public let capacity: Int
    /// Jobs that run at once (decode together, take turns for steps).
    public let maxActive: Int
    let transformer: Transformer?
    private let workspace: Workspace?
    private let lock = NSCondition()
    /// Every accepted job, in arrival order: preparing (no work yet), waiting, or active.
    private var jobs: [Job] = []
    private var stopping = false
    private var thread: Thread? = nil
    /// The turn at which each owner was last given a step of its own.
    private var served: [ObjectIdentifier: UInt64] = [:]
    private var turn: UInt64 = 0
    /// Where the next decoding batch starts when more generations run than a batch holds.
    private var batchStart = 0

    /// `transformer` runs generations (tests of the scheduling alone pass none).
    public init(capacity: Int, maxActive: Int = 32, transformer: Transformer? = nil) {
        self.capacity = max(1, capacity)
        self.maxActive = max(1, maxActive)
        self.transformer = transformer
        workspace = transformer?.makeWorkspace()
        // Weak: a worker released before its thread first runs (a Context that failed to start)
        // is gone, and the thread just ends; an unowned reference read then was a crash (seen
        // in CI). Once `loop` runs, the call keeps the worker alive until it stops.
        let t = Thread { [weak self] in self?.loop() }
        t.name = "vist2-engine"
        t.stackSize = 8 << 20
        thread = t
        t.start()
    }

    /// Accepts a job (its work now, or later through `start`); false when `capacity` jobs are
    /// already waiting or the worker is stopping.
    public func submit(_ job: Job) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard !stopping, jobs.count(where: { !$0.active }) < capacity else { return false }
        jobs.append(job)
        lock.signal()
        return true
    }

    /// Gives a submitted job its engine work (its text work is done).
    public func start(_ job: Job, _ work: Work) {
        lock.lock()
        job.work = work
        lock.signal()
        lock.unlock()
    }

    /// Forgets a submitted job that will have no engine work (it failed while preparing, or
    /// was text work only); its session replies itself.
    public func withdraw(_ job: Job) {
        lock.lock()
        jobs.removeAll { $0 === job }
        lock.broadcast()
        lock.unlock()
    }

    /// When the engine last made progress (uptime ns): a turn of the loop ended, or a job
    /// started or ended.
    private let lastProgress = Atomic<UInt64>(DispatchTime.now().uptimeNanoseconds)

    private func heartbeat() { lastProgress.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed) }

    /// For the watchdog and Status: seconds since the engine last made progress while it has
    /// work; 0 when idle. A stuck engine (a step that never returns, or a worker that no longer
    /// takes jobs) shows here as a growing number.
    public var stalledSeconds: Double {
        lock.lock()
        let busy = jobs.contains { $0.work != nil }
        lock.unlock()
        guard busy else { return 0 }
        let now = DispatchTime.now().uptimeNanoseconds, last = lastProgress.load(ordering: .relaxed)
        return now > last ? Double(now - last) / 1e9 : 0
    }

    /// No job accepted and not ended.
    public var isIdle: Bool {
        lock.lock()
        defer { lock.unlock() }
        return jobs.isEmpty
    }

    /// Jobs accepted but not yet running (preparing or waiting for a place).
    public var queueLength: Int {
        lock.lock()
        defer { lock.unlock() }
        return jobs.count(where: { !$0.active })
    }

    /// Jobs running now.
    public var activeCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return jobs.count(where: \.active)
    }

    /// Cancels every job of `owner` (a connection that went away).
    public func cancelAll(owner: ObjectIdentifier) {
        lock.lock()
        for j in jobs where j.owner == owner { j.cancel() }
        served[owner] = nil
        lock.signal()
        lock.unlock()
    }

    /// Stops taking new jobs and lets the accepted ones finish until `deadline`; then cancels
    /// what is left (each ends at its next step with its CANCELLED reply) and waits up to
    /// `grace` more. Returns the jobs that were cancelled, or nil if some job was still there
    /// after the grace period (SIGTERM drain).
    @discardableResult
    public func drain(deadline: Duration, grace: Duration = .seconds(10)) -> Int? {
        lock.lock()
        defer { lock.unlock() }
        stopping = true
        lock.broadcast()
        func waitIdle(_ d: Duration) -> Bool {
            let until = Date().addingTimeInterval(d.asSeconds)
            while !jobs.isEmpty {
                if !lock.wait(until: until) { return jobs.isEmpty }
            }
            return true
        }
        if waitIdle(deadline) { return 0 }
        var cancelled = 0
        for j in jobs where !j.isCancelled {
            j.cancel()
            cancelled += 1
        }
        lock.broadcast()
        return waitIdle(grace) ? cancelled : nil
    }

    /// Fills free places with waiting jobs that have work: the oldest job of the owner served
    /// longest ago (never served first). With the lock held.
    private func admit() {
        var running = jobs.count(where: \.active)
        while running < maxActive {
            var pick: Job? = nil
            var best = UInt64.max
            for j in jobs where !j.active && j.work != nil {
                let last = j.owner.map { served[$0].map { $0 + 1 } ?? 0 } ?? 0
                if last < best {
                    best = last
                    pick = j
                }
            }
            guard let job = pick else { return }
            job.active = true
            running += 1
        }
    }

    private func loop() {
        while true {
            lock.lock()
            admit()
            var active = jobs.filter(\.active)
            // Preparing jobs have no work yet; a cancelled one still needs ending.
            while active.isEmpty {
                if stopping && jobs.isEmpty {
                    lock.broadcast()
                    lock.unlock()
                    return
                }
                lock.wait()
                admit()
                active = jobs.filter(\.active)
            }
            lock.unlock()
            runTurn(active)
            heartbeat()
        }
    }

    /// One turn over the running jobs (see the type's comment).
    private func runTurn(_ active: [Job]) {
        var live: [Job] = []
        for job in active {
            if job.isCancelled {
                if case .generation(let task, _, _, _) = job.work { task.cancel() }
                end(job, cancelled: true)
            } else {
                live.append(job)
            }
        }
        emitReady(live)
        if let tf = transformer, let ws = workspace {
            // One decoding step over every generation waiting for a forward pass.
            var batch: [(Job, GenerationTask)] = []
            for job in live {
                if case .generation(let task, _, _, _) = job.work, case .decoding = task.state { batch.append((job, task)) }
            }
            if batch.count > ws.rows {
                // More than a batch holds: take turns.
                batchStart %= batch.count
                batch = Array((batch[batchStart...] + batch[..<batchStart]).prefix(ws.rows))
                batchStart += ws.rows
            }
            if !batch.isEmpty {
                var tokens: [Int32] = []
                for (_, task) in batch { if case .decoding(let t) = task.state { tokens.append(t) } }
                let (logits, flops) = tf.decode(tokens, caches: batch.map(\.1.cache), workspace: ws)
                for (i, (_, task)) in batch.enumerated() { task.accept(logits, row: i, flops: flops[i], ws: ws) }
                emitReady(batch.map(\.0))
            }
        }
        // One step of a job that needs steps of its own, by turns between connections.
        lock.lock()
        var pick: Job? = nil
        var best = UInt64.max
        for job in live where needsStep(job) {
            let last = job.owner.map { served[$0].map { $0 + 1 } ?? 0 } ?? 0
            if last < best {
                best = last
                pick = job
            }
        }
        if let job = pick {
            turn += 1
            if let o = job.owner { served[o] = turn }
        }
        lock.unlock()
        guard let job = pick else { return }
        switch job.work {
        case .generation(let task, _, let onProgress, _):
            guard let ws = workspace else { return end(job, cancelled: true) }
            let before = task.documentProgress.done
            let done = task.prefillStep(ws)
            let p = task.documentProgress
            if p.done != before { onProgress?(p.done, p.total) }
            if done {
                // A compression ends with its prefill; a generation samples its first token now.
                if task.compressOnly { end(job, cancelled: false) } else { emitReady([job]) }
            }
        case .steps(let step, _):
            guard let ws = workspace else { return end(job, cancelled: true) }
            if step(ws) { end(job, cancelled: false) }
        case .call(let body):
            body()
            end(job, cancelled: false)
        case nil:
            break
        }
    }

    private func needsStep(_ job: Job) -> Bool {
        switch job.work {
        case .generation(let task, _, _, _): return task.state == .prefilling || task.state == .swapping
        case .steps, .call: return true
        case nil: return false
        }
    }

    /// Lets each generation with ready logits sample and stream its next token; ends those
    /// that finished (there, or in a step of their own: a chunk swap that found the context full).
    private func emitReady(_ jobs: [Job]) {
        for job in jobs {
            guard case .generation(let task, let onText, _, _) = job.work else { continue }
            if task.state == .ready, let piece = task.emit(), !piece.isEmpty { onText(piece) }
            if case .finished = task.state {
                let rest = task.takeLeftover()
                if !rest.isEmpty { onText(rest) }
                end(job, cancelled: false)
            }
        }
    }

    /// Ends a job: its final reply first (a drain waiting for the queue to empty returns only
    /// after every final reply is on its way), then it leaves the worker.
    private func end(_ job: Job, cancelled: Bool) {
        switch job.work {
        case .generation(_, _, _, let onEnd): onEnd(cancelled)
        case .steps(_, let onEnd): onEnd(cancelled)
        case .call, nil: break
        }
        lock.lock()
        jobs.removeAll { $0 === job }
        job.work = nil
        lock.broadcast()
        lock.unlock()
        heartbeat()
    }
}
