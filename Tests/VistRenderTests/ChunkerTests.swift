import Foundation
import Testing

@testable import VistRender

/// A stand-in token count for these tests: ~4 bytes per token (the engine's tests use the real tokenizer).
let approxTokens: @Sendable (Substring) -> Int = { ($0.utf8.count + 3) / 4 }

/// A deterministic pseudo-random document of prose-, code- and list-like lines.
func randomDocument(seed: UInt64, lines: Int) -> String {
    var state = seed &+ 1
    func next() -> UInt64 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return state >> 33
    }
    let words = [
        "the", "model", "reads", "chunks", "of", "text", "as", "images", "func", "return", "let", "x", "=", "42;", "naïve", "日本", "—", "{",
        "}", "if", "else",
    ]
    var out = ""
    for _ in 0..<lines {
        let indent = Int(next() % 4) * 2
        out += String(repeating: " ", count: indent)
        let n = Int(next() % 14)
        if next() % 40 == 0 {
            out += String(repeating: "verylongtoken", count: 40)  // a line longer than a canvas
        }
        for k in 0..<n { out += (k > 0 ? " " : "") + words[Int(next() % UInt64(words.count))] }
        if next() % 7 == 0 { out += "\t# note" }
        out += "\n"
    }
    return out
}

@Suite("Content-defined chunker")
struct ChunkerTests {
    func chunker(maxTokens: Int = 120) throws -> Chunker {
        Chunker(renderer: try SketchRenderer(config: testConfig(width: 224, height: 224)), maxTokens: maxTokens, countTokens: approxTokens)
    }

    @Test("No character is lost or duplicated, and every chunk fits its canvas and budget", arguments: [1, 2, 3, 4, 5])
    func coverage(seed: UInt64) throws {
        let c = try chunker()
        let doc = randomDocument(seed: seed, lines: 300)
        let chunks = c.chunks(doc)
        #expect(chunks.map { String($0.text) }.joined() == doc)
        var expected = 0
        for ch in chunks {
            #expect(ch.scalarRange.lowerBound == expected)
            expected = ch.scalarRange.upperBound
            #expect(ch.tokens <= c.maxTokens)
            #expect(c.renderer.fit(ch.text).complete)
            #expect(!ch.text.isEmpty)
        }
        #expect(expected == doc.unicodeScalars.count)
        #expect(chunks.map(\.missing).reduce(0, +) == doc.components(separatedBy: "日本").count * 2 - 2)
        // Chunks are well filled, by tokens or by canvas rows, whichever binds.
        let rows = Double(c.renderer.config.rows)
        let fill = chunks.map { max(Double($0.tokens) / Double(c.maxTokens), Double($0.rows) / rows) }.reduce(0, +) / Double(chunks.count)
        #expect(fill >= 0.7, "average fill \(fill)")
    }

    /// At the geometry of a real model (a 448x448 canvas of 40 rows, 400 tokens per chunk) the
    /// fill window spans several lines, so the minimal-hash line survives the shift an edit causes.
    /// (On small canvases of a few rows the window holds one or two lines and an edit can ripple
    /// through a few more chunks.)
    @Test("Editing one line changes at most two chunks, and the boundaries resynchronise", arguments: 100..<110)
    func editLocality(seed: UInt64) throws {
        let c = Chunker(
            renderer: try SketchRenderer(config: testConfig(width: 448, height: 448)), maxTokens: 400, countTokens: approxTokens)
        let doc = randomDocument(seed: seed, lines: 1200)
        var lines = doc.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let at = lines.count / 2
        lines[at] += " plus an edited tail"
        let edited = lines.joined(separator: "\n")
        let before = Set(c.chunks(doc).map { String($0.text) })
        let after = c.chunks(edited).map { String($0.text) }
        let changed = after.filter { !before.contains($0) }.count
        #expect(changed <= 2, "\(changed) chunks changed")
    }

    @Test("Empty documents have no chunks; a single huge line is cut into fitting pieces")
    func edges() throws {
        let c = try chunker()
        #expect(c.chunks("").isEmpty)
        let huge = String(repeating: "x", count: 5000)
        let chunks = c.chunks(huge)
        #expect(chunks.count > 1 && chunks.map { String($0.text) }.joined() == huge)
        #expect(chunks.allSatisfy { c.renderer.fit($0.text).complete && $0.tokens <= c.maxTokens })
    }
}
