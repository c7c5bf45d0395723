import Dispatch
import Foundation
import Synchronization

/// One engine, one worker thread, a bounded queue. Jobs run one at a time (the engine's run
/// state is shared); past `capacity` waiting jobs `submit` refuses at once, so a client gets BUSY
/// instead of hanging. Each job carries a cancel flag the engine checks between decode steps.
/// Fairness: the next job is the oldest one of the owner (connection) served longest ago, so a
/// client that queues many requests takes turns with the others instead of going first. And a
/// long job does not hold the engine for its whole length: between its steps it calls
/// `yieldToOthers`, which runs one waiting job of another client right there (on the same
/// thread, while the long job's run state is idle), so a short request waits for at most one
/// decode step plus the jobs queued before it, not for a 1000-token generation to end.
public final class EngineWorker: @unchecked Sendable {
    public final class Job: @unchecked Sendable {
        let run: (Job) -> Void
        let cancelled = Atomic<Bool>(false)
        public let owner: ObjectIdentifier?

        public init(owner: ObjectIdentifier? = nil, run: @escaping (Job) -> Void) {
            self.owner = owner
            self.run = run
        }

        public var isCancelled: Bool { cancelled.load(ordering: .acquiring) }
        public func cancel() { cancelled.store(true, ordering: .releasing) }
    }

    public let capacity: Int
    private let lock = NSCondition()
    private var queue: [Job] = []
    private var running: Job? = nil
    private var stopping = false
    private var thread: Thread? = nil
    private var served: [ObjectIdentifier: UInt64] = [:]
    private var nested: Job? = nil
    private var turn: UInt64 = 0

    public init(capacity: Int) {
        self.capacity = max(1, capacity)
        // Weak: a worker released before its thread first runs (a Context that failed to start)
        // is gone, and the thread just ends; an unowned reference read then was a crash (seen
        // in CI). Once `loop` runs, the call keeps the worker alive until it stops.
        let t = Thread { [weak self] in self?.loop() }
        t.name = "vist2-engine"
        t.stackSize = 8 << 20
        thread = t
        t.start()
    }

    /// Queues a job; false when the queue is full or the worker is stopping.
    public func submit(_ job: Job) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard !stopping, queue.count < capacity else { return false }
        queue.append(job)
        lock.signal()
        return true
    }

    /// When the engine last made progress (uptime ns): a job started or ended, or a running job
    /// reported a step through `heartbeat` (every decode step, visual block, perplexity window
    /// and bench run does, through `yieldToOthers` or directly).
    private let lastProgress = Atomic<UInt64>(DispatchTime.now().uptimeNanoseconds)

    /// A running job made progress.
    public func heartbeat() { lastProgress.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed) }

    /// For the watchdog and Status: seconds since the engine last made progress while it has
    /// work (a running or queued job); 0 when idle. A stuck engine (a job that stopped making
    /// progress, or a worker that no longer takes jobs) shows here as a growing number.
    public var stalledSeconds: Double {
        guard !isIdle else { return 0 }
        let now = DispatchTime.now().uptimeNanoseconds, last = lastProgress.load(ordering: .relaxed)
        return now > last ? Double(now - last) / 1e9 : 0
    }

    /// No job running or waiting.
    public var isIdle: Bool {
        lock.lock()
        defer { lock.unlock() }
        return running == nil && queue.isEmpty
    }

    /// Jobs waiting (not counting the running one).
    public var queueLength: Int {
        lock.lock()
        defer { lock.unlock() }
        return queue.count
    }

    /// Cancels every queued or running job of `owner` (a connection that went away).
    public func cancelAll(owner: ObjectIdentifier) {
        lock.lock()
        defer { lock.unlock() }
        for j in queue where j.owner == owner { j.cancel() }
        if let r = running, r.owner == owner { r.cancel() }
        if let n = nested, n.owner == owner { n.cancel() }
        served[owner] = nil
    }

    /// Stops taking new jobs and lets the queued and running ones finish until `deadline`; then
    /// cancels what is left (queued jobs end at once with their CANCELLED reply, running ones at
    /// their next step) and waits up to `grace` more for them. Returns the jobs that were
    /// cancelled, or nil if some job was still running after the grace period (SIGTERM drain).
    @discardableResult
    public func drain(deadline: Duration, grace: Duration = .seconds(10)) -> Int? {
        lock.lock()
        defer { lock.unlock() }
        stopping = true
        lock.broadcast()
        func waitIdle(_ d: Duration) -> Bool {
            let until = Date().addingTimeInterval(d.asSeconds)
            while running != nil || !queue.isEmpty {
                if !lock.wait(until: until) { return running == nil && queue.isEmpty }
            }
            return true
        }
        if waitIdle(deadline) { return 0 }
        var cancelled = 0
        for j in queue + [running, nested].compactMap({ $0 }) where !j.isCancelled {
            j.cancel()
            cancelled += 1
        }
        return waitIdle(grace) ? cancelled : nil
    }

    /// Round robin over owners: the queued job whose owner had its last turn longest ago (never
    /// served first; oldest job first within an owner). With the lock held.
    private func pick(excluding owner: ObjectIdentifier?) -> Int? {
        var pick: Int? = nil
        var best = UInt64.max
        for (i, j) in queue.enumerated() where owner == nil || j.owner != owner {
            let last = j.owner.map { served[$0].map { $0 + 1 } ?? 0 } ?? 0
            if last < best {
                best = last
                pick = i
            }
        }
        return pick
    }

    /// With the lock held.
    private func take(at i: Int) -> Job {
        let job = queue.remove(at: i)
        turn += 1
        if let o = job.owner { served[o] = turn }
        return job
    }

    /// A long job's pause between its steps: `yieldToOthers`, then whether `job` may go on
    /// (false once it is cancelled).
    public func pause(_ job: Job) -> Bool {
        yieldToOthers(from: job)
        return !job.isCancelled
    }

    /// Called by the running job between its steps: runs one waiting job of another owner to
    /// completion, if there is one. Nested jobs do not yield further (the depth stays one).
    public func yieldToOthers(from job: Job) {
        heartbeat()
        lock.lock()
        guard running === job, nested == nil, let i = pick(excluding: job.owner) else {
            lock.unlock()
            return
        }
        let other = take(at: i)
        nested = other
        lock.unlock()
        other.run(other)
        lock.lock()
        nested = nil
        turn += 1
        if let o = job.owner { served[o] = turn }
        lock.broadcast()
        lock.unlock()
    }

    private func loop() {
        while true {
            lock.lock()
            while queue.isEmpty && !stopping { lock.wait() }
            if queue.isEmpty && stopping {
                lock.broadcast()
                lock.unlock()
                return
            }
            guard let next = pick(excluding: nil) else {
                lock.unlock()
                continue
            }
            let job = take(at: next)
            running = job
            heartbeat()
            lock.unlock()
            job.run(job)
            lock.lock()
            heartbeat()
            running = nil
            lock.broadcast()
            lock.unlock()
        }
    }
}
