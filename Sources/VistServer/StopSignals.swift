import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The write end of the self-pipe, read by the signal handler. A file-scope global with a
/// constant initial value, so the handler reads it without any lazy-initialization path.
nonisolated(unsafe) private var stopPipeWrite: Int32 = -1

/// SIGTERM and SIGINT, caught from the moment `install` returns, for the whole life of the
/// process. The handler only writes the signal number into a pipe (async-signal-safe); a thread
/// reads it. Before `serving()` a signal calls `beforeServing` (a daemon still loading its model
/// has nothing to drain); after it, `wait()` returns.
///
/// A DispatchSource signal source is not enough here: it registers asynchronously, and with the
/// signal ignored until then (which it needs), a SIGTERM that arrives right after start-up is
/// dropped and the daemon never stops (seen in CI: SIGTERM just after READY=1 was lost).
public final class StopSignals: @unchecked Sendable {
    private let lock = NSLock()
    private var isServing = false
    private var stopped = false
    private let stop = DispatchSemaphore(value: 0)
    private let beforeServing: @Sendable (Int32) -> Void

    public struct InstallError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Installs the handlers (once per process) and starts the reading thread.
    public init(beforeServing: @escaping @Sendable (Int32) -> Void) throws(InstallError) {
        self.beforeServing = beforeServing
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw InstallError(description: "pipe: \(String(cString: strerror(errno)))") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        // A full pipe must never block the handler: further signals are redundant anyway.
        _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
        stopPipeWrite = fds[1]
        let readFD = fds[0]
        for sig in [SIGTERM, SIGINT] {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { signo in
                let saved = errno
                var byte = UInt8(truncatingIfNeeded: signo)
                _ = write(stopPipeWrite, &byte, 1)
                errno = saved
            }
            sigemptyset(&action.sa_mask)
            action.sa_flags = Int32(SA_RESTART)
            guard sigaction(sig, &action, nil) == 0 else {
                throw InstallError(description: "sigaction(\(sig)): \(String(cString: strerror(errno)))")
            }
        }
        // A blocked signal never reaches a handler, and the mask is inherited: a parent that
        // spawned vist2d from a thread with SIGTERM blocked (a libdispatch worker does that)
        // would leave it deaf. Threads started from here on inherit this thread's mask.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        sigaddset(&unblock, SIGTERM)
        sigaddset(&unblock, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        let thread = Thread { [self] in
            var byte: UInt8 = 0
            while true {
                let n = read(readFD, &byte, 1)
                if n == 1 {
                    arrived(Int32(byte))
                } else if n < 0 && errno == EINTR {
                    continue
                } else {
                    return
                }
            }
        }
        thread.name = "vist2d-signals"
        thread.start()
    }

    private func arrived(_ signo: Int32) {
        let (serving, first) = lock.withLock { () -> (Bool, Bool) in
            let first = !stopped
            if isServing { stopped = true }
            return (isServing, first)
        }
        if !serving {
            beforeServing(signo)
        } else if first {
            stop.signal()
        }
    }

    /// From now on a stop signal ends `wait()` instead of calling `beforeServing`.
    public func serving() { lock.withLock { isServing = true } }

    /// Blocks until SIGTERM or SIGINT arrives after `serving()`.
    public func wait() { stop.wait() }
}
