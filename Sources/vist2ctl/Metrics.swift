import ArgumentParser
import Foundation

struct Metrics: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the daemon's metrics (Prometheus text format).")
    @OptionGroup var socketOption: SocketOption
    @Flag(help: "Print JSON: {\"prometheus_text\": ...}.") var json = false

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let text = try socketOption.daemon().client.metrics()
            if json { printJSON(["prometheus_text": text]) } else { print(text, terminator: "") }
        }
    }
}
