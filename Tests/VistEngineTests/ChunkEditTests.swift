import Foundation
import Testing
import VistTestSupport

@testable import VistEngine
@testable import VistRender

/// Edit locality of the chunker on real text, with the default model's tokenizer and geometry
/// (the page of `Training/configs/vist2-smollm2-135m.json` and its flowing variant): Debian's own
/// files of every kind the packing target names.
@Suite("Chunk boundaries under edits, on real text")
struct ChunkEditTests {
    static let texts = [
        "/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0", "/usr/include/stdio.h",
        "/usr/include/string.h", "/usr/lib/python3.11/textwrap.py", "/etc/services",
    ]

    static func chunker(configFile: String) throws -> Chunker {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let config = try VIST2Config.load(path: root.appendingPathComponent("Training/configs/\(configFile)").path)
        let renderer = try SketchRenderer(config: config.render)
        return try SharedModel.with { lm in
            let tok = lm.tokenizer
            return Chunker(renderer: renderer, maxTokens: config.chunk.length) { tok.encode(String($0), addSpecial: false).count }
        }
    }

    /// For every text, 12 one-line edits in a row (a word inserted into a line, seeded): the
    /// re-chunking of each version against the previous one changes at most two chunks. The
    /// stateless rule's numbers on the same edits are printed for the record.
    @Test(
        "On real text, re-chunking changes at most two chunks per one-line edit",
        arguments: ["vist2-smollm2-135m.json", "vist2-smollm2-135m-flow.json"])
    func realText(configFile: String) throws {
        let c = try Self.chunker(configFile: configFile)
        var statelessChanged: [Int] = [], changedAll: [Int] = []
        for path in Self.texts {
            let original = try #require(try? String(contentsOfFile: path, encoding: .utf8), "\(path) is missing")
            var text = original
            var chunking = try #require(c.chunking(text))
            var rng = TestRNG(UInt64(path.utf8.count))
            for _ in 0..<12 {
                var lines = text.components(separatedBy: "\n")
                let i = Int(rng.next() % UInt64(lines.count))
                var words = lines[i].components(separatedBy: " ")
                words.insert("edited", at: Int(rng.next() % UInt64(words.count + 1)))
                lines[i] = words.joined(separator: " ")
                let edited = lines.joined(separator: "\n")
                let before = Set(chunking.chunks.map(\.text))
                let next = try #require(c.chunking(edited, reusing: chunking))
                #expect(next.chunks.map { String($0.text) }.joined() == edited)
                let changed = next.chunks.filter { !before.contains($0.text) }.count
                #expect(changed <= 2, "\(path): \(changed) chunks changed")
                changedAll.append(changed)
                let statelessBefore = Set(c.chunks(text).map(\.text))
                statelessChanged.append(c.chunks(edited).filter { !statelessBefore.contains($0.text) }.count)
                text = edited
                chunking = next
            }
            // Packing after the edits stays within 0.05 of chunking the edited text afresh.
            #expect(c.meanFill(chunking.chunks) >= c.meanFill(c.chunks(text)) - 0.05, "\(path)")
        }
        func summary(_ v: [Int]) -> String {
            "mean \(String(format: "%.2f", Double(v.reduce(0, +)) / Double(v.count))), max \(v.max() ?? 0), over 2: \(v.filter { $0 > 2 }.count) of \(v.count)"
        }
        print("\(configFile): re-chunked \(summary(changedAll)); stateless \(summary(statelessChanged))")
    }
}
