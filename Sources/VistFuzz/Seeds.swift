import Foundation
import SwiftProtobuf
import VistProtocol
import VistWire

/// Seed inputs for the fuzz targets: one of every request, framed as a client sends them after
/// its Hello (session), the same messages bare (messages), and framed (frames). Written by
/// `fuzz-session --write-seeds DIR` into DIR/{frames,messages,session}/.
public enum Seeds {
    static func requests() -> [Vist2_V1_ClientMessage] {
        var out: [Vist2_V1_ClientMessage] = []
        func add(_ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
            var m = Vist2_V1_ClientMessage()
            m.requestID = id
            m.body = body
            out.append(m)
        }
        add(1, .status(.init()))
        add(
            2,
            .openDocument(
                .with {
                    $0.text = "Once upon a time\nthere was a chunk.\n"; $0.path = "a.txt"
                }))
        add(
            3,
            .updateDocument(
                .with {
                    $0.documentID = "d0000000000000000"; $0.text = "edited"
                }))
        add(4, .closeDocument(.with { $0.documentID = "d0000000000000000" }))
        add(
            5,
            .compress(
                .with {
                    $0.documentID = "d0000000000000000"; $0.instruction = "Read."
                }))
        add(
            6,
            .generate(
                .with {
                    $0.instruction = "Hello"
                    $0.maxTokens = 4
                    $0.stop = ["\n"]
                    $0.sampling = .with {
                        $0.temperature = 0.7; $0.topK = 40; $0.topP = 0.9; $0.seed = 1
                    }
                }))
        add(7, .render(.with { $0.documentID = "d0000000000000000" }))
        add(8, .cancel(.with { $0.targetRequestID = 6 }))
        add(9, .cacheList(.with { $0.limit = 3 }))
        add(10, .cacheEvict(.with { $0.keys = [String(repeating: "ab", count: 32)] }))
        add(11, .cacheStats(.init()))
        add(12, .metrics(.init()))
        add(
            13,
            .tokenize(
                .with {
                    $0.text = "aaaaaaaaaaaaaaaa\n\n\n\nhello <|im_start|>"; $0.parseSpecial = true
                }))
        add(
            14,
            .perplexity(
                .with {
                    $0.documentID = "d0000000000000000"; $0.ctx = 8
                }))
        add(
            15,
            .bench(
                .with {
                    $0.promptTokens = 4; $0.generatedTokens = 2; $0.repetitions = 1
                }))
        return out
    }

    public static func write(to dir: URL) throws {
        let fm = FileManager.default
        for sub in ["frames", "messages", "session"] {
            try fm.createDirectory(at: dir.appendingPathComponent(sub), withIntermediateDirectories: true)
        }
        let hello = Vist2_V1_ClientMessage.with {
            $0.hello = .with {
                $0.protocolVersion = 1; $0.clientName = "seed"
            }
        }
        let helloFrame = try Frame.encode(try hello.serializedBytes())
        for (i, m) in ([hello] + requests()).enumerated() {
            let bare: [UInt8] = try m.serializedBytes()
            let framed = try Frame.encode(bare)
            try Data(bare).write(to: dir.appendingPathComponent("messages/seed-\(i)"))
            try Data(framed).write(to: dir.appendingPathComponent("frames/seed-\(i)"))
            try Data(i == 0 ? framed : helloFrame + framed).write(to: dir.appendingPathComponent("session/seed-\(i)"))
        }
        // A whole session: open a document, then use it in every request that reads documents.
        var all = helloFrame
        for m in requests() { all += try Frame.encode(try m.serializedBytes()) }
        try Data(all).write(to: dir.appendingPathComponent("session/seed-all"))
    }
}
