import Foundation
import Testing
import VistClient

#if canImport(Glibc)
    import Glibc
#endif

func binary(_ name: String) -> String {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    if !FileManager.default.fileExists(atPath: dir.appendingPathComponent(name).path) {
        dir = Bundle.main.bundleURL.deletingLastPathComponent()
    }
    return dir.appendingPathComponent(name).path
}

/// A child process started with posix_spawn and reaped with waitpid on its own pid. (Foundation's
/// Process stops reaping its children on Linux while a child it started has exec'd into something
/// long-running, as systemd-socket-activate does, so these tests do not use it.)
final class Child {
    let pid: pid_t
    var status: Int32? = nil

    init(_ argv: [String], env: [String: String] = [:], output: String? = nil) throws {
        var environment = ProcessInfo.processInfo.environment
        for (k, v) in env { environment[k] = v }
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        let out = output ?? "/dev/null"
        posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
        try #require(rc == 0, "cannot start \(argv[0]): \(rc)")
        self.pid = pid
    }

    /// Waits up to `seconds`; the exit status, or nil if still running.
    @discardableResult
    func wait(seconds: Double) -> Int32? {
        if let status { return status }
        let end = Date().addingTimeInterval(seconds)
        repeat {
            var st: Int32 = 0
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid {
                status = (st & 0x7F) == 0 ? (st >> 8) & 0xFF : 128 + (st & 0x7F)
                return status
            }
            if r < 0 { return -1 }
            usleep(20_000)
        } while Date() < end
        return nil
    }

    func signal(_ sig: Int32) { if status == nil { kill(pid, sig) } }

    deinit {
        if wait(seconds: 0) == nil {
            kill(pid, SIGKILL)
            wait(seconds: 5)
        }
    }
}

/// A NOTIFY_SOCKET stand-in: a datagram socket collecting what the daemon tells systemd.
final class NotifyListener {
    let path: String
    let fd: Int32

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in path.utf8.enumerated() { p[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(rc == 0)
        var tv = timeval(tv_sec: 0, tv_usec: 200_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// Messages received until `until` holds for the collected lines or the deadline passes.
    func collect(seconds: Double, until: ([String]) -> Bool) -> [String] {
        var lines: [String] = []
        let end = Date().addingTimeInterval(seconds)
        var buf = [UInt8](repeating: 0, count: 4096)
        while Date() < end && !until(lines) {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { lines += String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n").map(String.init) }
        }
        return lines
    }
}

/// vist2d under systemd's protocols. Part of the serialized CLITests suite: no other test may
/// start child processes while systemd-socket-activate's daemon runs.
extension CLITests {
    static let unitDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("systemd")

    @Test("Socket activation through systemd-socket-activate; readiness, status and watchdog through NOTIFY_SOCKET")
    func activation() throws {
        let tool = "/usr/bin/systemd-socket-activate"
        try #require(FileManager.default.isExecutableFile(atPath: tool), "install systemd (scripts/install-deps.sh)")
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2sd-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let sock = dir.appendingPathComponent("vist2.sock").path
        let notify = try NotifyListener(path: dir.appendingPathComponent("notify").path)
        let p = try Child([
            tool, "-l", sock, "-E", "NOTIFY_SOCKET=\(notify.path)", "-E", "WATCHDOG_USEC=400000", "-E", "VIST2_CACHE_DIR=\(dir.path)/cache",
            binary("vist2d"), "--model", CLITests.tinyVIST2, "--threads", "1",
        ])
        var waited = 0
        while !FileManager.default.fileExists(atPath: sock) && waited < 100 {
            usleep(50_000)
            waited += 1
        }
        // The first connection starts the daemon, which serves the socket it was handed. (The
        // client library, not a vist2ctl child: Foundation's Process does not reap a second
        // child while systemd-socket-activate's exec'd daemon runs.)
        #expect(try VistClient(socketPath: sock).status().state == "ready")
        let lines = notify.collect(seconds: 10) { l in l.contains("READY=1") && l.contains("WATCHDOG=1") }
        #expect(lines.contains("READY=1"))
        #expect(lines.contains { $0.hasPrefix("STATUS=loading model") })
        #expect(lines.contains { $0.hasPrefix("STATUS=serving") && $0.contains("socket from systemd") })
        #expect(lines.contains { $0.hasPrefix("EXTEND_TIMEOUT_USEC=") })
        #expect(lines.contains("WATCHDOG=1"))
        p.signal(SIGTERM)  // to vist2d: systemd-socket-activate exec'd it
        #expect(p.wait(seconds: 30) == 0)
        // The socket belongs to the service manager: vist2d did not unlink it.
        #expect(FileManager.default.fileExists(atPath: sock))
        let stopping = notify.collect(seconds: 2) { $0.contains("STOPPING=1") }
        #expect(stopping.contains("STOPPING=1"))
    }

    @Test("SIGTERM at any moment of start-up stops vist2d: while loading at once, right after READY=1 by a drain")
    func stopDuringStartUp() throws {
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2stop-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func start(_ round: Int) throws -> (Child, NotifyListener) {
            let notify = try NotifyListener(path: dir.appendingPathComponent("notify\(round)").path)
            let p = try Child(
                [
                    binary("vist2d"), "--model", CLITests.tinyVIST2, "--threads", "1", "--socket",
                    dir.appendingPathComponent("s\(round).sock").path, "--cache-dir", dir.appendingPathComponent("cache").path,
                ], env: ["NOTIFY_SOCKET": notify.path])
            return (p, notify)
        }
        // Right after READY=1, the moment systemd may stop a freshly started service. A signal
        // lost there (the old DispatchSource handler registered asynchronously) left vist2d
        // running for good.
        for round in 0..<8 {
            let (p, notify) = try start(round)
            let ready = notify.collect(seconds: 20) { $0.contains("READY=1") }
            try #require(ready.contains("READY=1"), "round \(round): no READY=1")
            p.signal(SIGTERM)
            #expect(p.wait(seconds: 15) == 0, "round \(round)")
            #expect(notify.collect(seconds: 2) { $0.contains { $0.hasPrefix("STOPPING=1") } }.contains { $0.hasPrefix("STOPPING=1") })
        }
        // Before READY=1: while the runtime starts (default action, 128+15) or while the model
        // loads (caught: exit 0 without serving). Never still running.
        for (i, delay) in [0.0, 0.005, 0.02, 0.05, 0.1, 0.2].enumerated() {
            let (p, notify) = try start(100 + i)
            usleep(useconds_t(delay * 1e6))
            p.signal(SIGTERM)
            let status = p.wait(seconds: 15)
            #expect(status == 0 || status == 128 + SIGTERM, "delay \(delay): status \(String(describing: status))")
            _ = notify
        }
    }

    @Test("The shipped units pass systemd-analyze verify (system and user)")
    func verifyUnits() throws {
        let analyze = "/usr/bin/systemd-analyze"
        try #require(FileManager.default.isExecutableFile(atPath: analyze), "install systemd (scripts/install-deps.sh)")
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("v2units-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: dir) }
        for (sub, user) in [("", false), ("user", true)] {
            let out = dir.appendingPathComponent(user ? "user" : "system")
            try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
            try FileManager.default.createDirectory(at: dir.appendingPathComponent("rt"), withIntermediateDirectories: true)
            for name in ["vist2d.service", "vist2d.socket"] {
                var text = try String(contentsOf: Self.unitDir.appendingPathComponent(sub).appendingPathComponent(name), encoding: .utf8)
                // verify checks that ExecStart exists: point it at the built binary.
                text = text.replacingOccurrences(of: "ExecStart=/usr/local/bin/vist2d", with: "ExecStart=\(binary("vist2d"))")
                text = text.replacingOccurrences(of: "ExecStart=%h/.local/bin/vist2d", with: "ExecStart=\(binary("vist2d"))")
                try text.write(to: out.appendingPathComponent(name), atomically: true, encoding: .utf8)
            }
            let log = dir.appendingPathComponent("verify-\(user).log").path
            let p = try Child(
                [analyze] + (user ? ["--user"] : []) + [
                    "verify", out.appendingPathComponent("vist2d.socket").path, out.appendingPathComponent("vist2d.service").path,
                ], env: ["XDG_RUNTIME_DIR": dir.appendingPathComponent("rt").path], output: log)
            let status = p.wait(seconds: 60)
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            #expect(status == 0, "\(user ? "user" : "system") units: \(text)")
        }
    }
}
