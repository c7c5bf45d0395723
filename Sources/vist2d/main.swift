import ArgumentParser
import Dispatch
import Foundation
import VistEngine
import VistServer
import VistWire

#if canImport(Glibc)
    import Glibc
#endif

/// vist2d: holds one model and serves vist2ctl, editors and scripts over a Unix socket
/// (Protocols/PROTOCOL.md). `main` stays thin: flags, loading, signals; the server is VistServer.
struct Vist2d: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vist2d",
        abstract: "The vist2 daemon: one shared VIST2 engine over a Unix socket.",
        discussion: """
            Environment: VIST2_MODELS (model store), XDG_RUNTIME_DIR (default socket directory). \
            SIGTERM and SIGINT stop accepting, finish queued requests and exit 0.
            """)

    @Option(help: "Model name or path (a VIST2 model directory or a plain GGUF / HF model).")
    var model = "default"

    @Option(help: "Socket path (default: $XDG_RUNTIME_DIR/vist2/vist2.sock, else /run/vist2/vist2.sock).")
    var socket: String?

    @Option(help: "Engine threads (default: the cores this process may use).")
    var threads: Int?

    @Option(help: "Requests that may wait for the engine; past this they get BUSY.")
    var queue = 16

    @Option(help: "Largest frame payload accepted, in bytes.")
    var maxFrame = Frame.defaultMaxPayload

    func validate() throws {
        if let t = threads, !(1...256).contains(t) { throw ValidationError("--threads must be in 1...256") }
        guard (1...10_000).contains(queue) else { throw ValidationError("--queue must be in 1...10000") }
        guard (1024...Frame.hardMaxPayload).contains(maxFrame) else {
            throw ValidationError("--max-frame must be in 1024...\(Frame.hardMaxPayload)")
        }
    }

    func run() throws {
        let path =
            socket
            ?? {
                if let d = ProcessInfo.processInfo.environment["RUNTIME_DIRECTORY"], !d.isEmpty { return d + "/vist2.sock" }
                if let d = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !d.isEmpty { return d + "/vist2/vist2.sock" }
                return "/run/vist2/vist2.sock"
            }()
        log("loading model \(model)")
        let loaded: ServerContext.Model
        switch Self.load(model, threads: threads ?? LanguageModel.defaultThreads) {
        case .success(let m): loaded = m
        case .failure(let e):
            log("error [\(e.code)]: \(e.description)")
            throw ExitCode(1)
        }
        let server = UnixServer(
            context: ServerContext(model: loaded, modelName: model, queueCapacity: queue, maxFrame: maxFrame), socketPath: path)
        do {
            try server.start()
        } catch {
            log("error: \(error)")
            throw ExitCode(1)
        }
        log("listening on \(path)")
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        signal(SIGPIPE, SIG_IGN)
        let done = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { done.signal() }
            s.resume()
            sources.append(s)
        }
        done.wait()
        log("stopping: finishing queued requests")
        server.stop()
        log("stopped")
    }

    static func load(_ name: String, threads: Int) -> Result<ServerContext.Model, EngineError> {
        Result { () throws(EngineError) -> ServerContext.Model in
            let url = try ModelStore.resolve(name)
            if VIST2Model.isModelDirectory(url) { return .vist2(try VIST2Model(directory: url, threads: threads)) }
            return .language(try LanguageModel(url: url, threads: threads))
        }
    }

    func log(_ s: String) { FileHandle.standardError.write(Data("vist2d: \(s)\n".utf8)) }
}

Vist2d.main()
