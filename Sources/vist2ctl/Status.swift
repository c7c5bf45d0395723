import ArgumentParser
import Foundation
import VistClient
import VistProtocol

/// Where the daemon listens: --socket, else the client library's default.
struct SocketOption: ParsableArguments {
    @Option(help: "The daemon's socket (default: $XDG_RUNTIME_DIR/vist2/vist2.sock, else /run/vist2/vist2.sock).")
    var socket: String?

    func connect() throws -> VistClient {
        do {
            return try VistClient(socketPath: socket ?? VistClient.defaultSocketPath)
        } catch {
            FileHandle.standardError.write(Data("vist2ctl: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the daemon's state, model and queue.")

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Print one JSON object.")
    var json = false

    struct Out: Encodable {
        var state: String
        var model: String
        var model_fingerprint: String
        var server_version: String
        var protocol_version: UInt32
        var queue_length: UInt32
        var uptime_seconds: UInt64
        var chunk_length: UInt32
        var visual_tokens: UInt32
        var clients: UInt32
        var documents_open: UInt32
        var cache_bytes: UInt64
        var engine_stalled_seconds: Double
    }

    func run() throws {
        let c = try socketOption.connect()
        let s: Vist2_V1_Status
        do { s = try c.status() } catch {
            FileHandle.standardError.write(Data("vist2ctl: \(error)\n".utf8))
            throw ExitCode(1)
        }
        let out = Out(
            state: s.state, model: s.modelName, model_fingerprint: s.modelFingerprint, server_version: c.hello.serverVersion,
            protocol_version: c.hello.protocolVersion, queue_length: s.queueLength, uptime_seconds: s.uptimeSeconds,
            chunk_length: c.hello.chunkLength, visual_tokens: c.hello.visualTokens, clients: s.clients, documents_open: s.documentsOpen,
            cache_bytes: s.cacheBytes, engine_stalled_seconds: s.engineStalledSeconds)
        if json {
            printJSON(out)
        } else {
            print(
                "\(out.state): \(out.model) (\(out.server_version), protocol \(out.protocol_version)), queue \(out.queue_length), up \(out.uptime_seconds) s"
            )
        }
    }
}
