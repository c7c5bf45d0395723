import ArgumentParser
import Dispatch
import Foundation
import VistCache
import VistEngine
import VistServer
import VistWire

#if canImport(Glibc)
    import Glibc
#endif

/// vist2d: holds one model and serves vist2ctl, editors and scripts over a Unix socket
/// (Protocols/PROTOCOL.md). `main` stays thin: flags, loading, systemd, signals; the server is
/// VistServer.
struct Vist2d: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vist2d",
        abstract: "The vist2 daemon: one shared VIST2 engine over a Unix socket.",
        discussion: """
            Every flag has an environment variable, read when the flag is not given (for systemd units):
              VIST2_MODEL, VIST2_SOCKET, VIST2_THREADS, VIST2_QUEUE, VIST2_MAX_FRAME, VIST2_CACHE_DIR,
              VIST2_CACHE_SIZE, VIST2_MAX_CONNECTIONS, VIST2_IDLE_TIMEOUT, VIST2_DRAIN_TIMEOUT, VIST2_ALLOW_USERS and
              VIST2_ALLOW_GROUPS (comma-separated), VIST2_LOG_LEVEL.
            Also read: VIST2_MODELS (model store), XDG_RUNTIME_DIR and RUNTIME_DIRECTORY (socket directory),
            XDG_CACHE_HOME and CACHE_DIRECTORY (cache directory), NOTIFY_SOCKET and WATCHDOG_USEC (readiness,
            status and keep-alives for Type=notify units), LISTEN_PID/LISTEN_FDS (socket activation: the
            passed socket is served as is and never unlinked).
            Peers: a client is served if its uid (SO_PEERCRED) is the daemon's own, root's, or listed in
            --allow-user, or if its primary or supplementary groups include one listed in --allow-group.
            SIGTERM and SIGINT stop accepting, give running and queued requests --drain-timeout seconds, cancel the
            rest (each still gets its final reply) and exit 0. Every limit: Protocols/PROTOCOL.md, "Limits".
            """)

    @Option(help: "Model name or path (a VIST2 model directory or a plain GGUF / HF model). [VIST2_MODEL]")
    var model: String?

    @Option(
        help:
            "Socket path (default: $RUNTIME_DIRECTORY/vist2.sock under systemd, else $XDG_RUNTIME_DIR/vist2/vist2.sock, else /run/vist2/vist2.sock). [VIST2_SOCKET]"
    )
    var socket: String?

    @Option(help: "Engine threads (default: the cores this process may use). [VIST2_THREADS]")
    var threads: Int?

    @Option(help: "Requests that may wait for the engine; past this they get BUSY (default 16). [VIST2_QUEUE]")
    var queue: Int?

    @Option(help: "Requests the engine runs at once, decoding in one batch (default 32). [VIST2_MAX_ACTIVE]")
    var maxActive: Int?

    @Option(help: "Element type of the KV cache: f16 (default; half the memory and cache files of f32) or f32. [VIST2_KV_TYPE]")
    var kvType: String?

    @Option(help: "Largest frame payload accepted, in bytes (default \(Frame.defaultMaxPayload)). [VIST2_MAX_FRAME]")
    var maxFrame: Int?

    @Option(
        help: "Persistent cache directory (default: $CACHE_DIRECTORY, else $XDG_CACHE_HOME/vist2, else ~/.cache/vist2). [VIST2_CACHE_DIR]")
    var cacheDir: String?

    @Option(help: "Persistent cache budget, e.g. 2G, 512M, 0 to disable (default 2G). [VIST2_CACHE_SIZE]")
    var cacheSize: String?

    @Option(help: "Connections served at once; past it a client gets BUSY (default 512). [VIST2_MAX_CONNECTIONS]")
    var maxConnections: Int?

    @Option(
        help:
            "Seconds a connection with nothing in flight may stay silent before it is closed, 0 for never (default 3600). [VIST2_IDLE_TIMEOUT]"
    )
    var idleTimeout: Int?

    @Option(help: "Seconds SIGTERM waits for running requests before cancelling them (default 30). [VIST2_DRAIN_TIMEOUT]")
    var drainTimeout: Int?

    @Option(help: "Also serve this user (name or uid); repeatable. [VIST2_ALLOW_USERS]")
    var allowUser: [String] = []

    @Option(help: "Also serve members of this group (name or gid); repeatable. [VIST2_ALLOW_GROUPS]")
    var allowGroup: [String] = []

    @Option(help: "error, warning, info or debug (default info). [VIST2_LOG_LEVEL]")
    var logLevel: String?

    static let env = ProcessInfo.processInfo.environment

    static func parseSize(_ s: String) -> Int? {
        let t = s.trimmingCharacters(in: .whitespaces).uppercased()
        let units: [(String, Int)] = [("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)]
        for (u, mul) in units where t.hasSuffix(u) || t.hasSuffix(u + "B") || t.hasSuffix(u + "IB") {
            let num = t.prefix { $0.isNumber || $0 == "." }
            guard let v = Double(num), v >= 0, v * Double(mul) < 9e18 else { return nil }
            return Int(v * Double(mul))
        }
        return Int(t).flatMap { $0 >= 0 ? $0 : nil }
    }

    struct Settings {
        var model: String
        var socket: String
        var threads: Int
        var queue: Int
        var maxFrame: Int
        var cacheDir: String
        var cacheSize: Int
        var peers: PeerPolicy
        var logLevel: Int
        var limits: ServerLimits
        var kvType: KVType
    }

    func settings() throws -> Settings {
        let env = Self.env
        func int(_ flag: Int?, _ name: String, _ def: Int, _ range: ClosedRange<Int>, _ option: String) throws -> Int {
            let v: Int
            if let flag {
                v = flag
            } else if let s = env[name], !s.isEmpty {
                guard let n = Int(s) else { throw ValidationError("\(name)='\(s)' is not a number") }
                v = n
            } else {
                v = def
            }
            guard range.contains(v) else { throw ValidationError("\(option) must be in \(range.lowerBound)...\(range.upperBound)") }
            return v
        }
        let model = self.model ?? env["VIST2_MODEL"].flatMap { $0.isEmpty ? nil : $0 } ?? "default"
        let socket =
            self.socket ?? env["VIST2_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
            ?? {
                if let d = env["RUNTIME_DIRECTORY"], !d.isEmpty { return d.split(separator: ":")[0] + "/vist2.sock" }
                if let d = env["XDG_RUNTIME_DIR"], !d.isEmpty { return d + "/vist2/vist2.sock" }
                return "/run/vist2/vist2.sock"
            }()
        guard socket.utf8.count < 108 else { throw ValidationError("--socket path is longer than a Unix socket allows (107 bytes)") }
        let threads = try int(threads, "VIST2_THREADS", LanguageModel.defaultThreads, 1...256, "--threads")
        let queue = try int(queue, "VIST2_QUEUE", 16, 1...10_000, "--queue")
        let maxFrame = try int(maxFrame, "VIST2_MAX_FRAME", Frame.defaultMaxPayload, 1024...Frame.hardMaxPayload, "--max-frame")
        var limits = ServerLimits()
        limits.queueCapacity = queue
        limits.maxActive = try int(maxActive, "VIST2_MAX_ACTIVE", limits.maxActive, 1...256, "--max-active")
        let kvName = self.kvType ?? env["VIST2_KV_TYPE"].flatMap { $0.isEmpty ? nil : $0 } ?? "f16"
        guard let kvType = KVType(rawValue: kvName) else { throw ValidationError("--kv-type must be f32 or f16, got '\(kvName)'") }
        limits.maxFrame = maxFrame
        limits.maxConnections = try int(maxConnections, "VIST2_MAX_CONNECTIONS", limits.maxConnections, 1...1_000_000, "--max-connections")
        limits.idleTimeout = .seconds(try int(idleTimeout, "VIST2_IDLE_TIMEOUT", 3600, 0...(365 * 86400), "--idle-timeout"))
        limits.drainTimeout = .seconds(try int(drainTimeout, "VIST2_DRAIN_TIMEOUT", 30, 0...86400, "--drain-timeout"))
        let cacheDir =
            cacheDir ?? env["VIST2_CACHE_DIR"].flatMap { $0.isEmpty ? nil : $0 }
            ?? {
                if let d = env["CACHE_DIRECTORY"], !d.isEmpty { return String(d.split(separator: ":")[0]) }
                if let d = env["XDG_CACHE_HOME"], !d.isEmpty { return d + "/vist2" }
                return NSHomeDirectory() + "/.cache/vist2"
            }()
        let sizeText = cacheSize ?? env["VIST2_CACHE_SIZE"].flatMap { $0.isEmpty ? nil : $0 } ?? "2G"
        guard let size = Self.parseSize(sizeText) else {
            throw ValidationError("--cache-size '\(sizeText)' is not a size (e.g. 2G, 512M, 0)")
        }
        var peers = PeerPolicy.sameUser
        let users =
            allowUser + (env["VIST2_ALLOW_USERS"] ?? "").split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
        let groups =
            allowGroup + (env["VIST2_ALLOW_GROUPS"] ?? "").split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
        for u in users where !u.isEmpty {
            guard let id = PeerPolicy.uid(u) else { throw ValidationError("--allow-user: no user '\(u)'") }
            peers.users.insert(id)
        }
        for g in groups where !g.isEmpty {
            guard let id = PeerPolicy.gid(g) else { throw ValidationError("--allow-group: no group '\(g)'") }
            peers.groups.insert(id)
        }
        let levelText = (logLevel ?? env["VIST2_LOG_LEVEL"] ?? "info").lowercased()
        guard let level = ["error", "warning", "info", "debug"].firstIndex(of: levelText) else {
            throw ValidationError("--log-level must be error, warning, info or debug")
        }
        return Settings(
            model: model, socket: socket, threads: threads, queue: queue, maxFrame: maxFrame, cacheDir: cacheDir, cacheSize: size,
            peers: peers, logLevel: level, limits: limits, kvType: kvType)
    }

    func run() throws {
        let s = try settings()
        let logger = Logger(level: s.logLevel)
        // Caught from here on: a stop request during loading ends the process at once (there is
        // nothing to drain yet); once serving, it starts the drain below.
        signal(SIGPIPE, SIG_IGN)
        let stop: StopSignals
        do {
            stop = try StopSignals { signo in
                logger.info("stopped by signal \(signo) while loading")
                Systemd.notify("STOPPING=1")
                _exit(0)
            }
        } catch {
            logger.error("cannot catch SIGTERM: \(error)")
            throw ExitCode(1)
        }
        let inherited: Int32?
        switch Result(catching: { () throws(Systemd.ActivationError) in try Systemd.listenFD() }) {
        case .success(let fd): inherited = fd
        case .failure(let e):
            logger.error(e.description)
            throw ExitCode(1)
        }
        logger.info("loading model \(s.model)")
        Systemd.notify("STATUS=loading model \(s.model)\nEXTEND_TIMEOUT_USEC=60000000")
        // Keep extending the start timeout while loading (hashing a large backbone takes a while).
        let loading = DispatchSource.makeTimerSource(queue: .global())
        loading.schedule(deadline: .now() + 20, repeating: 20)
        loading.setEventHandler { Systemd.notify("EXTEND_TIMEOUT_USEC=60000000") }
        loading.resume()
        let loaded: ServerContext.Model
        let result = Self.load(s.model, threads: s.threads)
        loading.cancel()
        switch result {
        case .success(let m): loaded = m
        case .failure(let e):
            logger.error("[\(e.code)] \(e.description)")
            Systemd.notify("STATUS=failed to load \(s.model): \(e.description)")
            throw ExitCode(1)
        }
        var cache: CacheStore? = nil
        if case .vist2(let vm) = loaded, s.cacheSize > 0 {
            do {
                cache = try CacheStore(
                    directory: URL(fileURLWithPath: s.cacheDir), budget: s.cacheSize,
                    identity: .init(fingerprint: vm.fingerprintBytes, renderConfig: vm.renderConfigHash),
                    log: { logger.warning($0) })
                logger.info("cache \(s.cacheDir): \(cache!.stats.entries) entries, \(cache!.stats.bytes) of \(s.cacheSize) bytes")
            } catch CacheStore.OpenError.locked(let why) {
                // Two daemons on one cache would evict each other's entries: refuse to start.
                logger.error("\(why); stop it or give this one another --cache-dir")
                Systemd.notify("STATUS=cache directory \(s.cacheDir) is in use by another process")
                throw ExitCode(1)
            } catch {
                // Serving without a cache beats not serving.
                logger.warning("cache disabled: cannot use \(s.cacheDir): \(error)")
            }
        }
        let context = ServerContext(
            model: loaded, modelName: s.model, limits: s.limits, cache: cache, peers: s.peers, kvType: s.kvType,
            log: { logger.info($0) })
        let server = UnixServer(context: context, socketPath: s.socket, inheritedFD: inherited)
        do {
            try server.start()
        } catch {
            logger.error("\(error)")
            throw ExitCode(1)
        }
        // Connections may be accepted from here on: a stop request now drains them.
        stop.serving()
        let where_ = inherited.map { "\(Systemd.boundPath($0)) (socket from systemd)" } ?? s.socket
        logger.info("listening on \(where_)")
        Systemd.notify("READY=1\nSTATUS=serving \(s.model) on \(where_)")
        var watchdog: DispatchSourceTimer? = nil
        if let period = Systemd.watchdogPeriod() {
            let t = DispatchSource.makeTimerSource(queue: .global())
            t.schedule(deadline: .now(), repeating: period)
            // The keep-alive goes out only while the engine makes progress: a job running for
            // longer than the watchdog interval is normal (long generations), but each of its
            // steps reports progress; an engine with work and no progress for the stall limit is
            // stuck, and then systemd restarts the daemon.
            let stall = s.limits.stallTimeout.asSeconds
            var reported = false
            t.setEventHandler {
                let stalled = context.worker.stalledSeconds
                if stalled < stall {
                    Systemd.notify("WATCHDOG=1")
                    reported = false
                } else if !reported {
                    logger.error("the engine has made no progress for \(Int(stalled)) s; withholding the watchdog keep-alive")
                    Systemd.notify("STATUS=engine stalled for \(Int(stalled)) s")
                    reported = true
                }
            }
            t.resume()
            watchdog = t
        }
        stop.wait()
        logger.info("stopping: finishing queued requests")
        Systemd.notify("STOPPING=1\nSTATUS=draining")
        server.stop()
        watchdog?.cancel()
        logger.info("stopped")
        // Every request has its final reply and the cache is closed: leave without tearing the
        // model down object by object (its maps, FreeType and OpenBLAS state go with the
        // process). A teardown could only add a way to fail after the work is done; one was
        // seen (an intermittent abort freeing the model at exit, see RELIABILITY.md).
        Glibc.exit(0)
    }

    static func load(_ name: String, threads: Int) -> Result<ServerContext.Model, EngineError> {
        Result { () throws(EngineError) -> ServerContext.Model in
            let url = try ModelStore.resolve(name)
            if VIST2Model.isModelDirectory(url) { return .vist2(try VIST2Model(directory: url, threads: threads)) }
            return .language(try LanguageModel(url: url, threads: threads))
        }
    }
}

/// Lines on stderr for journald, with the sd-daemon(3) priority prefix when running under
/// systemd (JOURNAL_STREAM set), so `journalctl -p warning` works.
struct Logger: Sendable {
    let level: Int
    let journal = ProcessInfo.processInfo.environment["JOURNAL_STREAM"] != nil

    func write(_ l: Int, _ prio: Int, _ s: String) {
        guard l <= level else { return }
        let prefix = journal ? "<\(prio)>" : "vist2d: "
        FileHandle.standardError.write(Data((prefix + s + "\n").utf8))
    }
    func error(_ s: String) { write(0, 3, "error: " + s) }
    func warning(_ s: String) { write(1, 4, "warning: " + s) }
    func info(_ s: String) { write(2, 6, s) }
    func debug(_ s: String) { write(3, 7, s) }
}

Vist2d.main()
