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

    /// Checks that `chunks` tile `doc` and each fits.
    func expectValid(_ chunks: [Chunk], _ doc: String, _ c: Chunker, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(chunks.map { String($0.text) }.joined() == doc, sourceLocation: sourceLocation)
        var next = 0
        for ch in chunks {
            #expect(ch.scalarRange.lowerBound == next && !ch.text.isEmpty, sourceLocation: sourceLocation)
            #expect(ch.text.unicodeScalars.count == ch.scalarRange.count, sourceLocation: sourceLocation)
            next = ch.scalarRange.upperBound
            let fit = c.renderer.fit(ch.text)
            #expect(fit.complete && ch.tokens == approxTokens(ch.text) && ch.tokens <= c.maxTokens, sourceLocation: sourceLocation)
            #expect(ch.rows == fit.rows && ch.missing == fit.missing, sourceLocation: sourceLocation)
        }
        #expect(next == doc.unicodeScalars.count, sourceLocation: sourceLocation)
    }

    /// One random one-line edit: a word inserted, a line inserted, deleted, replaced or joined
    /// with the next.
    func edit(_ doc: String, _ rng: inout UInt64) -> String {
        func next() -> Int {
            rng = rng &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Int(rng >> 33)
        }
        var lines = doc.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let i = next() % max(1, lines.count - 1)
        switch next() % 5 {
        case 0:
            var words = lines[i].split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            words.insert("edited", at: next() % (words.count + 1))
            lines[i] = words.joined(separator: " ")
        case 1: lines.insert("a new line of text, with some words in it", at: i)
        case 2: lines.remove(at: i)
        case 3: lines[i] = "replaced"
        default: if i + 1 < lines.count { lines[i] += lines.remove(at: i + 1) }
        }
        return lines.joined(separator: "\n")
    }

    /// On small canvases the stateless rule's window holds a line or two, and an edit often moves
    /// many boundaries after it; chunking against the previous version never changes more than
    /// two, over a long history of edits, and keeps the density of a fresh chunking.
    @Test("Re-chunking an edited document changes at most two chunks per one-line edit", arguments: [(224, 120), (448, 400)])
    func reuse(geometry: (Int, Int)) throws {
        let c = Chunker(
            renderer: try SketchRenderer(config: testConfig(width: geometry.0, height: geometry.0)), maxTokens: geometry.1,
            countTokens: approxTokens)
        var doc = randomDocument(seed: 7, lines: 1500)
        var chunking = try #require(c.chunking(doc))
        #expect(chunking.chunks.map(\.scalarRange) == c.chunks(doc).map(\.scalarRange))
        var rng: UInt64 = 99
        var statelessOver2 = 0, afresh = 0
        var stateless = Set(chunking.chunks.map { String($0.text) })
        for _ in 0..<100 {
            let edited = edit(doc, &rng)
            let before = Set(chunking.chunks.map { String($0.text) })
            let next = try #require(c.chunking(edited, reusing: chunking))
            expectValid(next.chunks, edited, c)
            let changed = next.chunks.filter { !before.contains(String($0.text)) }.count
            let canonical = c.chunks(edited)
            if next.chunks == canonical && changed > 2 {
                afresh += 1  // density fell: chunked afresh
            } else {
                #expect(changed <= 2, "\(changed) chunks changed")
            }
            if canonical.filter({ !stateless.contains(String($0.text)) }).count > 2 { statelessOver2 += 1 }
            stateless = Set(canonical.map { String($0.text) })
            doc = edited
            chunking = next
        }
        #expect(afresh <= 3)
        // Density stays within 0.05 of chunking the final text afresh.
        #expect(c.meanFill(chunking.chunks) >= c.meanFill(c.chunks(doc)) - 0.05)
        if geometry.0 == 224 { #expect(statelessOver2 > 0, "the stateless rule should ripple here") }
    }

    @Test("Re-chunking the same text keeps every chunk; an unrelated or broken previous chunking is chunking afresh")
    func reuseEdges() throws {
        let c = try chunker()
        let doc = randomDocument(seed: 3, lines: 200)
        let fresh = try #require(c.chunking(doc))
        let same = try #require(c.chunking(doc, reusing: fresh))
        #expect(same.chunks == fresh.chunks)
        let other = randomDocument(seed: 4, lines: 200)
        let unrelated = try #require(c.chunking(other, reusing: fresh))
        #expect(unrelated.chunks == c.chunks(other))
        let broken = Chunking(text: doc, chunks: Array(fresh.chunks.dropFirst()), baseline: 1)
        let repaired = try #require(c.chunking(doc, reusing: broken))
        #expect(repaired.chunks == fresh.chunks)
        let empty = try #require(c.chunking("", reusing: fresh))
        #expect(empty.chunks.isEmpty)
        let appended = try #require(c.chunking(doc + "one more line\n", reusing: fresh))
        expectValid(appended.chunks, doc + "one more line\n", c)
        #expect(Array(appended.chunks.dropLast(2)) == Array(fresh.chunks.dropLast(2)))
        let prepended = try #require(c.chunking("a first line\n" + doc, reusing: fresh))
        expectValid(prepended.chunks, "a first line\n" + doc, c)
        #expect(
            prepended.chunks.suffix(fresh.chunks.count - 2).map { String($0.text) }
                == fresh.chunks.suffix(fresh.chunks.count - 2).map { String($0.text) })
        // Cancelled while the changed text is chunked: nil.
        #expect(c.chunking(other, reusing: fresh, step: { false }) == nil)
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
