import Foundation

/// A piece of a document that becomes one sketch image.
public struct Chunk: Sendable, Equatable {
    /// Position in the document, in Unicode scalars.
    public var scalarRange: Range<Int>
    public var text: Substring
    /// Tokens of `text` tokenized on its own.
    public var tokens: Int
    /// Canvas rows it uses.
    public var rows: Int
    /// Scalars the font lacks (drawn as boxes).
    public var missing: Int
}

/// Splits documents into chunks of at most `maxTokens` tokens that fit one canvas, with
/// boundaries chosen by the content so that an edit changes only the chunks around it.
///
/// Rule (deterministic): from a chunk's start, every line end that keeps the chunk within the
/// token budget and the canvas is a candidate; among the candidates that reach `minFill` of the
/// token budget or of the canvas rows (whichever binds), the chunk ends after the line with the smallest content hash (FNV-1a 64 of the line's
/// UTF-8; the earliest on ties). A single line too long for a chunk is cut at the longest prefix
/// that fits. `minFill` trades density against edit locality; 0.85 was measured on Debian's
/// license texts (19.8k tokens, 320x320 canvas, L = 400): ratio 3.66 at r = 4 and one-line edits
/// changing one chunk (0.8: 3.58; 0.9: 3.73, but edits on synthetic text then rippled through up
/// to 7 chunks). The chosen line depends on the content of a window of lines, not on offsets, so
/// after an edit the next chunk's window still holds the same minimal line and the boundaries
/// fall back on the same lines as before (they resynchronise).
public struct Chunker: Sendable {
    public let maxTokens: Int
    public let minFill: Double
    let renderer: SketchRenderer
    let countTokens: @Sendable (Substring) -> Int

    public init(renderer: SketchRenderer, maxTokens: Int, minFill: Double = 0.85, countTokens: @escaping @Sendable (Substring) -> Int) {
        self.renderer = renderer
        self.maxTokens = max(1, maxTokens)
        self.minFill = min(max(minFill, 0), 1)
        self.countTokens = countTokens
    }

    static func fnv1a(_ s: Substring) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in s.utf8 {
            h ^= UInt64(b)
            h = h &* 0x100_0000_01b3
        }
        return h
    }

    func fits(_ s: Substring) -> (ok: Bool, tokens: Int, fit: SketchRenderer.Fit) {
        let f = renderer.fit(s)
        guard f.complete else { return (false, 0, f) }
        let t = countTokens(s)
        return (t <= maxTokens, t, f)
    }

    public func chunks(_ doc: String) -> [Chunk] { chunks(doc, step: nil) ?? [] }

    /// `chunks`, calling `step` after every chunk; nil as soon as it returns false (the daemon
    /// yields to other clients and checks for cancellation there).
    public func chunks(_ doc: String, step: (() -> Bool)?) -> [Chunk]? {
        var out: [Chunk] = []
        var start = doc.startIndex
        var scalarStart = 0
        let minTokens = Int(Double(maxTokens) * minFill)
        let minRows = Int(Double(renderer.config.rows) * minFill)
        while start < doc.endIndex {
            // Every line end after `start` that still fits; among those past the minimum fill,
            // the one whose line has the smallest content hash is the cut.
            var end = start
            var accepted: (end: String.Index, tokens: Int, fit: SketchRenderer.Fit)? = nil
            var bestHash = UInt64.max
            var last: (end: String.Index, tokens: Int, fit: SketchRenderer.Fit)? = nil
            while end < doc.endIndex {
                let lineStart = end
                let nl = doc[lineStart...].firstIndex(of: "\n")
                let lineEnd = nl.map { doc.index(after: $0) } ?? doc.endIndex
                let (ok, tokens, fit) = fits(doc[start..<lineEnd])
                if !ok { break }
                last = (lineEnd, tokens, fit)
                end = lineEnd
                // The fill is whichever limit binds: tokens of the budget or rows of the canvas.
                if tokens >= minTokens || fit.rows >= minRows {
                    let h = Self.fnv1a(doc[lineStart..<lineEnd])
                    if h < bestHash {
                        bestHash = h
                        accepted = (lineEnd, tokens, fit)
                    }
                }
            }
            // The document ends inside the window, or no line end reached the minimum fill.
            if end == doc.endIndex || accepted == nil { accepted = last }
            if accepted == nil {
                // Not even the first line fits: take its longest prefix that does (binary search over scalars).
                let nl = doc[start...].firstIndex(of: "\n")
                let lineEnd = nl.map { doc.index(after: $0) } ?? doc.endIndex
                let scalars = doc.unicodeScalars[start..<lineEnd]
                var lo = 1, hi = max(1, min(scalars.count, renderer.fit(doc[start..<lineEnd]).scalars))
                while lo < hi {
                    let mid = (lo + hi + 1) / 2
                    let e = doc.unicodeScalars.index(start, offsetBy: mid)
                    if fits(doc[start..<e]).ok { lo = mid } else { hi = mid - 1 }
                }
                // One scalar always makes progress, even if it alone were over budget.
                let e = doc.unicodeScalars.index(start, offsetBy: lo)
                let r = fits(doc[start..<e])
                accepted = (e, r.tokens == 0 ? countTokens(doc[start..<e]) : r.tokens, r.fit)
            }
            guard let a = accepted else { break }  // always set above
            let text = doc[start..<a.end]
            let n = text.unicodeScalars.count
            out.append(
                Chunk(scalarRange: scalarStart..<(scalarStart + n), text: text, tokens: a.tokens, rows: a.fit.rows, missing: a.fit.missing))
            scalarStart += n
            start = a.end
            if start < doc.endIndex, let step, !step() { return nil }
        }
        return out
    }
}
