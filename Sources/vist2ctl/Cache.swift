import ArgumentParser
import Foundation
import VistBridge

struct Cache: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect and trim the daemon's persistent cache.", subcommands: [List.self, Remove.self, Stats.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls", abstract: "List entries, most recently used first.",
            discussion: "Your own entries and the shared ones (root and the daemon's user: every entry), with the uid that stored each.")
        @OptionGroup var socketOption: SocketOption
        @Option(help: "At most this many entries (0: all).") var limit: UInt32 = 0
        @Flag(help: "Print JSON.") var json = false

        struct Entry: Encodable {
            var key: String
            var level: String
            var bytes: UInt64
            var last_used_unix: Int64
            var owner_uid: UInt32
            var shared: Bool
        }

        func run() throws {
            let output = Output(json: json)
            try output.run {
                let entries = try socketOption.daemon().client.cacheList(limit: limit).map {
                    Entry(
                        key: $0.key, level: $0.level, bytes: $0.bytes, last_used_unix: $0.lastUsedUnix, owner_uid: $0.ownerUid,
                        shared: $0.shared)
                }
                let f = DateFormatter()
                f.dateFormat = "yyyy-MM-dd HH:mm:ss"
                let lines = entries.map {
                    "\($0.key)  \($0.level.padding(toLength: 6, withPad: " ", startingAt: 0))  \(String(format: "%10d", $0.bytes))  \(f.string(from: Date(timeIntervalSince1970: Double($0.last_used_unix))))  uid \($0.owner_uid)\($0.shared ? " shared" : "")"
                }
                if json { printJSON(["entries": entries]) } else if !lines.isEmpty { print(lines.joined(separator: "\n")) }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove entries by key, or all of them.",
            discussion: "Your own entries only (root and the daemon's user: any); --all removes all of yours.")
        @OptionGroup var socketOption: SocketOption
        @Flag(help: "Remove every entry.") var all = false
        @Flag(help: "Print JSON.") var json = false
        @Argument(help: "Keys (64 hex digits) as `cache ls` shows them.") var keys: [String] = []

        func validate() throws {
            guard all != !keys.isEmpty else { throw ValidationError("give keys or --all (not both)") }
        }

        func run() throws {
            let output = Output(json: json)
            try output.run {
                let r = try socketOption.daemon().client.cacheEvict(keys: keys, all: all)
                output.result(
                    ["removed": r.removed, "refused": r.refused],
                    text: "removed \(r.removed) entries" + (r.refused > 0 ? "; \(r.refused) belong to another user and were left" : ""))
            }
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Size, budget, hits, misses, evictions, rejected entries.")
        @OptionGroup var socketOption: SocketOption
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let output = Output(json: json)
            try output.run {
                let s = try socketOption.daemon().client.cacheStats()
                output.result(
                    JSONValue.object(cacheStatsFields(s)),
                    text:
                        "\(s.entries) entries, \(s.bytes) of \(s.budgetBytes) bytes; \(s.hits) hits, \(s.misses) misses, \(s.evictions) evictions, \(s.rejectedDamaged) damaged or foreign entries dropped"
                )
            }
        }
    }
}
