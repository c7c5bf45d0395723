import ArgumentParser
import Foundation
import VistBridge
import VistClient
import VistProtocol

/// Where the daemon listens: --socket, else the client library's default.
struct SocketOption: ParsableArguments {
    @Option(help: "The daemon's socket (default: $XDG_RUNTIME_DIR/vist2/vist2.sock, else /run/vist2/vist2.sock).")
    var socket: String?

    /// A connection to the daemon; when there is none, the error is reported like every other
    /// (code `daemon_unavailable`, as JSON with `json`) and the command exits with status 1.
    func connect(json: Bool) -> VistClient {
        do {
            return try VistClient(socketPath: socket ?? VistClient.defaultSocketPath)
        } catch {
            fail("\(error)", code: daemonCode(error), json: json)
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the daemon's state, model and queue.")

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        let c = socketOption.connect(json: json)
        let s: Vist2_V1_Status
        do { s = try c.status() } catch {
            FileHandle.standardError.write(Data("vist2ctl: \(error)\n".utf8))
            throw ExitCode(1)
        }
        if json {
            printJSON(JSONValue.object(statusFields(s, hello: c.hello)))
        } else {
            print(
                "\(s.state): \(s.modelName) (\(c.hello.serverVersion), protocol \(c.hello.protocolVersion)), queue \(s.queueLength), up \(s.uptimeSeconds) s"
            )
        }
    }
}
