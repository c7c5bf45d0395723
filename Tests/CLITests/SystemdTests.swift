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
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = [
            "-l", sock, "-E", "NOTIFY_SOCKET=\(notify.path)", "-E", "WATCHDOG_USEC=400000", "-E", "VIST2_CACHE_DIR=\(dir.path)/cache",
            binary("vist2d"), "--model", CLITests.tinyVIST2, "--threads", "1",
        ]
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { p.terminate() } }
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
        p.terminate()  // systemd-socket-activate passes SIGTERM on to vist2d
        p.waitUntilExit()
        // The socket belongs to the service manager: vist2d did not unlink it.
        #expect(FileManager.default.fileExists(atPath: sock))
        let stopping = notify.collect(seconds: 2) { $0.contains("STOPPING=1") }
        #expect(stopping.contains("STOPPING=1"))
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
            let p = Process()
            p.executableURL = URL(fileURLWithPath: analyze)
            p.arguments =
                (user ? ["--user"] : []) + [
                    "verify", out.appendingPathComponent("vist2d.socket").path, out.appendingPathComponent("vist2d.service").path,
                ]
            var env = ProcessInfo.processInfo.environment
            env["XDG_RUNTIME_DIR"] = dir.appendingPathComponent("rt").path
            p.environment = env
            let err = Pipe()
            p.standardError = err
            p.standardOutput = err
            try p.run()
            let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(p.terminationStatus == 0, "\(user ? "user" : "system") units: \(text)")
        }
    }
}
