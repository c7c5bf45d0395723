import Foundation
import Synchronization

/// One engine, one worker thread, a bounded queue. Jobs run one at a time (the engine's run
/// state is shared); past `capacity` waiting jobs `submit` refuses at once, so a client gets BUSY
/// instead of hanging. Each job carries a cancel flag the engine checks between decode steps.
/// Fairness: the next job is the oldest one of the owner (connection) served longest ago, so a
/// client that queues many requests takes turns with the others instead of going first.
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
    private var turn: UInt64 = 0

    public init(capacity: Int) {
        self.capacity = max(1, capacity)
        let t = Thread { [unowned self] in self.loop() }
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

    /// For the watchdog: taking the worker's lock blocks if the worker is deadlocked, and then
    /// no keep-alive is sent and systemd restarts the daemon.
    public var isResponsive: Bool {
        lock.lock()
        lock.unlock()
        return true
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
        served[owner] = nil
    }

    /// Finishes the queued jobs, then stops the thread (SIGTERM drain).
    public func drain() {
        lock.lock()
        stopping = true
        lock.broadcast()
        while running != nil || !queue.isEmpty { lock.wait() }
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
            // Round robin over owners: the owner with the oldest last turn (never served first).
            var pick = 0
            var best = UInt64.max
            for (i, j) in queue.enumerated() {
                let last = j.owner.map { served[$0].map { $0 + 1 } ?? 0 } ?? 0
                if last < best {
                    best = last
                    pick = i
                }
            }
            let job = queue.remove(at: pick)
            turn += 1
            if let o = job.owner { served[o] = turn }
            running = job
            lock.unlock()
            job.run(job)
            lock.lock()
            running = nil
            lock.broadcast()
            lock.unlock()
        }
    }
}
