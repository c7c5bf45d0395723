import ArgumentParser
import Foundation
import VistBridge

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the daemon's state, model and queue.")

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let c = try socketOption.daemon().client
            let s = try c.status()
            output.result(
                JSONValue.object(statusFields(s, hello: c.hello)),
                text:
                    "\(s.state): \(s.modelName) (\(c.hello.serverVersion), protocol \(c.hello.protocolVersion)), queue \(s.queueLength), up \(s.uptimeSeconds) s"
            )
        }
    }
}
