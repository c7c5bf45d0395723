import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The parts of the systemd service protocol vist2d speaks, without libsystemd:
/// readiness and status (sd_notify(3): a datagram to $NOTIFY_SOCKET), the watchdog
/// ($WATCHDOG_USEC), and socket activation (sd_listen_fds(3): $LISTEN_PID, $LISTEN_FDS, fds from 3).
public enum Systemd {
    /// Sends `state` (e.g. "READY=1\nSTATUS=serving") to the service manager; false when not
    /// under one (no NOTIFY_SOCKET) or the send failed.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        guard let path = ProcessInfo.processInfo.environment["NOTIFY_SOCKET"], !path.isEmpty else { return false }
        var bytes = Array(path.utf8)
        // "@name" is an abstract socket: a leading NUL byte.
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let msg = Array(state.utf8)
        let sent = withUnsafePointer(to: &addr) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                msg.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, len) }
            }
        }
        return sent == msg.count
    }

    /// Half the watchdog interval, in seconds, if the manager asked for keep-alives for this process.
    public static func watchdogPeriod() -> Double? {
        let env = ProcessInfo.processInfo.environment
        guard let usec = env["WATCHDOG_USEC"].flatMap(UInt64.init), usec > 0 else { return nil }
        if let pid = env["WATCHDOG_PID"].flatMap(Int32.init), pid != getpid() { return nil }
        return Double(usec) / 2e6
    }

    public enum ActivationError: Error, CustomStringConvertible {
        case invalid(String)
        public var description: String {
            switch self {
            case .invalid(let s): return s
            }
        }
    }

    /// The listening socket passed by socket activation, if any (and then LISTEN_* is removed
    /// from the environment so children do not inherit it). vist2d takes exactly one Unix stream
    /// socket.
    public static func listenFD() throws(ActivationError) -> Int32? {
        let env = ProcessInfo.processInfo.environment
        guard let pidText = env["LISTEN_PID"], let pid = Int32(pidText), pid == getpid() else { return nil }
        guard let n = env["LISTEN_FDS"].flatMap(Int.init), n >= 1 else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        guard n == 1 else { throw .invalid("systemd passed \(n) sockets; vist2d serves exactly one (a single ListenStream=)") }
        let fd: Int32 = 3
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        var type: Int32 = 0, domain: Int32 = 0, listening: Int32 = 0
        var len = socklen_t(4)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 else { throw .invalid("fd 3 from systemd is not a socket") }
        len = 4
        _ = getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len)
        len = 4
        _ = getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len)
        guard type == Int32(SOCK_STREAM.rawValue), domain == AF_UNIX, listening == 1 else {
            throw .invalid("the socket systemd passed is not a listening Unix stream socket (ListenStream=/path)")
        }
        return fd
    }

    /// The path a Unix socket is bound to (for logs).
    public static func boundPath(_ fd: Int32) -> String {
        var addr = sockaddr_un()
        var len = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        guard rc == 0 else { return "fd \(fd)" }
        return withUnsafeBytes(of: &addr.sun_path) { p in
            String(decoding: p.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }
}
