import ArgumentParser
import VistBridge
import VistClient

struct Bridge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve JSON lines on stdin/stdout over one daemon connection (for editors and scripts).",
        discussion: """
            Reads one JSON request per line on stdin (open, update, close, compress, generate, \
            cancel, status, cache_stats, documents; each with a client-chosen "id") and writes one \
            JSON event per line on stdout. Documents are held by the bridge under stable handles: \
            when the daemon restarts, the bridge reconnects and opens them again, and reports \
            daemon_down / daemon_up. When stdin ends, the requests in flight finish, then it exits. \
            Every request and event: docs/BRIDGE.md.
            """)

    @OptionGroup var socketOption: SocketOption

    @Option(help: "The longest pause, in seconds, between two attempts to reach a daemon that went away.")
    var retryInterval: Double = 1.0

    @Option(help: "The name the daemon logs for this connection.")
    var clientName = "vist2ctl-bridge"

    func validate() throws {
        guard retryInterval >= 0.05, retryInterval <= 60 else { throw ValidationError("--retry-interval must be in 0.05...60 seconds") }
        guard !clientName.isEmpty, clientName.utf8.count <= 256 else { throw ValidationError("--client-name must be 1 to 256 bytes") }
    }

    func run() throws {
        VistBridge.Bridge(
            socketPath: socketOption.socket ?? VistClient.defaultSocketPath, clientName: clientName, maxRetryInterval: retryInterval
        ).run()
    }
}
