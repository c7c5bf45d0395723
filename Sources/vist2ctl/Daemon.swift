import ArgumentParser
import Foundation
import VistBridge
import VistClient
import VistEngine
import VistProtocol

#if canImport(Glibc)
    import Glibc
#endif

/// `readText` for the daemon paths, which report failures themselves.
func readDocument(_ path: String, json: Bool) -> String {
    switch Result(catching: { () throws(EngineError) in try readText(path) }) {
    case .success(let text): return text
    case .failure(let e): fail(e.description, code: e.code, json: json)
    }
}

struct Compress: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compress documents in the daemon, filling its persistent caches.",
        discussion: """
            Opens each FILE in the daemon and prefills it as a generation over it with --instruction \
            would (chunks rendered, encoded and prefilled as visual blocks), so that such a generation \
            — now, from another client, or after a restart — starts from the cache. Reports chunks, \
            tokens, ratio and how many chunks came from each cache level. A progress bar is drawn on \
            stderr when it is a terminal.
            """)

    @OptionGroup var socketOption: SocketOption

    @Option(help: "The instruction the documents will be used with (visual blocks attend to it).")
    var instruction = ""

    @Flag(help: "Wrap the instruction in the model's chat template (as generate --chat does).")
    var chat = false

    @Flag(help: "Use and fill the cache entries shared by all users of the daemon, not your own.")
    var shared = false

    @Flag(help: "Print one JSON object per file.")
    var json = false

    @Argument(help: "UTF-8 text files.")
    var files: [String]

    func validate() throws {
        guard !files.isEmpty else { throw ValidationError("name at least one file") }
    }

    func run() throws {
        let c = socketOption.connect(json: json)
        let bar = isatty(2) == 1 && !json
        for file in files {
            let text = readDocument(file, json: json)
            do {
                let doc = try c.openDocument(text: text, path: file)
                let r = try c.compress(documentID: doc.documentID, instruction: instruction, chat: chat, shared: shared) { p in
                    guard bar, p.chunksTotal > 0 else { return }
                    let width = 30
                    let filled = Int(p.chunksDone) * width / Int(p.chunksTotal)
                    let line =
                        "\r\(file) [\(String(repeating: "#", count: filled))\(String(repeating: " ", count: width - filled))] \(p.chunksDone)/\(p.chunksTotal) chunks"
                    FileHandle.standardError.write(Data(line.utf8))
                }
                if bar { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
                try c.closeDocument(id: doc.documentID)
                if json {
                    var out = compressResultFields(r)
                    out["file"] = .string(file)
                    printJSON(JSONValue.object(out))
                } else {
                    print(
                        "\(file): \(r.chunks) chunks, \(r.textTokens) tokens -> \(r.visualTokens) visual tokens (ratio \(String(format: "%.2f", r.ratio))); encoded \(r.chunksRendered), chunk-cache hits \(r.chunkCacheHits), prefix-cache hits \(r.prefixCacheHits); \(String(format: "%.0f", r.elapsedMs)) ms"
                    )
                }
            } catch {
                fail("\(file): \(error)", code: daemonCode(error), json: json)
            }
        }
    }
}

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
            let c = socketOption.connect(json: json)
            do {
                let entries = try c.cacheList(limit: limit).map {
                    Entry(
                        key: $0.key, level: $0.level, bytes: $0.bytes, last_used_unix: $0.lastUsedUnix, owner_uid: $0.ownerUid,
                        shared: $0.shared)
                }
                if json {
                    printJSON(["entries": entries])
                } else {
                    let f = DateFormatter()
                    f.dateFormat = "yyyy-MM-dd HH:mm:ss"
                    for e in entries {
                        print(
                            "\(e.key)  \(e.level.padding(toLength: 6, withPad: " ", startingAt: 0))  \(String(format: "%10d", e.bytes))  \(f.string(from: Date(timeIntervalSince1970: Double(e.last_used_unix))))  uid \(e.owner_uid)\(e.shared ? " shared" : "")"
                        )
                    }
                }
            } catch { fail("\(error)", code: daemonCode(error), json: json) }
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
            let c = socketOption.connect(json: json)
            do {
                let r = try c.cacheEvict(keys: keys, all: all)
                if json {
                    printJSON(["removed": r.removed, "refused": r.refused])
                } else {
                    print("removed \(r.removed) entries" + (r.refused > 0 ? "; \(r.refused) belong to another user and were left" : ""))
                }
            } catch { fail("\(error)", code: daemonCode(error), json: json) }
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Size, budget, hits, misses, evictions, rejected entries.")
        @OptionGroup var socketOption: SocketOption
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let c = socketOption.connect(json: json)
            do {
                let s = try c.cacheStats()
                if json {
                    printJSON(JSONValue.object(cacheStatsFields(s)))
                } else {
                    print(
                        "\(s.entries) entries, \(s.bytes) of \(s.budgetBytes) bytes; \(s.hits) hits, \(s.misses) misses, \(s.evictions) evictions, \(s.rejectedDamaged) damaged or foreign entries dropped"
                    )
                }
            } catch { fail("\(error)", code: daemonCode(error), json: json) }
        }
    }
}

struct Metrics: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the daemon's metrics (Prometheus text format).")
    @OptionGroup var socketOption: SocketOption
    @Flag(help: "Print JSON: {\"prometheus_text\": ...}.") var json = false

    func run() throws {
        let c = socketOption.connect(json: json)
        do {
            let text = try c.metrics()
            if json { printJSON(["prometheus_text": text]) } else { print(text, terminator: "") }
        } catch { fail("\(error)", code: daemonCode(error), json: json) }
    }
}
