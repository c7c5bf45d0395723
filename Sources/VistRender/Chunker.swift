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
/// after an edit the next chunk's window usually still holds the same minimal line and the
/// boundaries fall back on the same lines as before (they resynchronise) — usually, not always:
/// `chunking(_:reusing:step:)` is what bounds an edit of an open document to two chunks.
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

    /// `chunks(doc)`, where `previous` is how an earlier version of the same document was chunked:
    /// the chunks the edit does not touch are kept as they were (shifted), and only the text
    /// from the first touched chunk's start to the last touched chunk's end is chunked again.
    /// A one-line edit inside one chunk therefore changes at most two chunks (its chunk, split
    /// in two if it grew past the budget), whatever the content around it: the stateless rule
    /// alone resynchronises only with some probability, and on real text an edit sometimes
    /// moves five or more boundaries after it (Training/EXPERIMENTS.md section 6).
    ///
    /// The result depends on the edit history, not only on the text; every chunk still fits the
    /// canvas and the budget, and the chunks still tile the document. Text that grew past its
    /// chunk is cut together with the next chunk when the two still make two chunks, a short
    /// re-chunked piece is merged with its neighbour when both fit one chunk, and when the
    /// finished chunks' mean fill falls 0.05 under what the document had when it was last
    /// chunked afresh, it is chunked afresh again: density cannot drift away over many edits.
    /// A `previous` that does not tile its own text (or belongs to another text entirely)
    /// costs only the reuse.
    public func chunking(_ doc: String, reusing previous: Chunking? = nil, step: (() -> Bool)? = nil) -> Chunking? {
        func afresh() -> Chunking? {
            guard let c = chunks(doc, step: step) else { return nil }
            return Chunking(text: doc, chunks: c, baseline: meanFill(c))
        }
        guard let previous, !previous.chunks.isEmpty, previous.isTiling else { return afresh() }
        let old = previous.text
        let oldCount = previous.chunks[previous.chunks.count - 1].scalarRange.upperBound
        let scalars = ScalarIndexer(doc)
        let newCount = scalars.count
        // The common prefix and suffix, in scalars (they may not overlap in either text).
        var prefix = 0
        var oi = old.unicodeScalars.startIndex, ni = doc.unicodeScalars.startIndex
        while oi < old.unicodeScalars.endIndex, ni < doc.unicodeScalars.endIndex, old.unicodeScalars[oi] == doc.unicodeScalars[ni] {
            prefix += 1
            oi = old.unicodeScalars.index(after: oi)
            ni = doc.unicodeScalars.index(after: ni)
        }
        if prefix == oldCount && prefix == newCount {
            return Chunking(text: doc, chunks: previous.chunks.map { $0.moved(by: 0, over: scalars) }, baseline: previous.baseline)
        }
        var suffix = 0
        var oj = old.unicodeScalars.endIndex, nj = doc.unicodeScalars.endIndex
        while prefix + suffix < min(oldCount, newCount) {
            let po = old.unicodeScalars.index(before: oj), pn = doc.unicodeScalars.index(before: nj)
            guard old.unicodeScalars[po] == doc.unicodeScalars[pn] else { break }
            suffix += 1
            oj = po
            nj = pn
        }
        // The old chunks the edit touches: the one holding its first changed scalar (an
        // insertion at a boundary goes to the chunk after it, at the end to the last one) to
        // the one holding its last.
        let ranges = previous.chunks.map(\.scalarRange)
        let changedEnd = oldCount - suffix  // old[prefix..<changedEnd] was replaced
        let first = ranges.firstIndex { $0.upperBound > prefix } ?? ranges.count - 1
        let last = changedEnd > prefix ? (ranges.firstIndex { $0.upperBound >= changedEnd } ?? ranges.count - 1) : first
        let shift = newCount - oldCount
        // The text from the first touched chunk's start to chunk `end`'s end, chunked afresh.
        func rechunk(through end: Int) -> [Chunk]? {
            let segment = ranges[first].lowerBound..<(ranges[end].upperBound + shift)
            guard let pieces = chunks(String(doc[scalars.range(segment)]), step: step) else { return nil }
            return pieces.map { $0.moved(by: segment.lowerBound, over: scalars) }
        }
        guard var fresh = rechunk(through: last) else { return nil }
        var end = last
        // Text that grew past its chunks would leave a short piece behind; cut it together with
        // the next chunk instead when the two still make as many chunks as before.
        if fresh.count > last - first + 1, last + 1 < ranges.count {
            guard let wider = rechunk(through: last + 1) else { return nil }
            if wider.count <= last + 2 - first {
                fresh = wider
                end = last + 1
            }
        }
        var out = previous.chunks[..<first].map { $0.moved(by: 0, over: scalars) }
        var after = previous.chunks[(end + 1)...].map { $0.moved(by: shift, over: scalars) }
        // A short re-chunked piece joins its neighbour when the two fit one chunk.
        if let tail = fresh.last, underfull(tail), let next = after.first, let joined = join(tail, next, over: scalars) {
            fresh[fresh.count - 1] = joined
            after.removeFirst()
        }
        // (Not the document's last chunk: a generation reads that one as text, and typing at the
        // end of a document would otherwise re-render the chunk before it at every keystroke.)
        if let head = fresh.first, underfull(head), fresh.count > 1 || !after.isEmpty, let prev = out.last,
            let joined = join(prev, head, over: scalars)
        {
            out[out.count - 1] = joined
            fresh.removeFirst()
        }
        out += fresh
        out += after
        // Many edits could leave the document sparsely packed: chunk it afresh then.
        if meanFill(out) < previous.baseline - 0.05 { return afresh() }
        return Chunking(text: doc, chunks: out, baseline: previous.baseline)
    }

    /// The mean fill of the finished chunks (all but the last); 1 when there are none.
    func meanFill(_ chunks: [Chunk]) -> Double {
        let finished = chunks.dropLast()
        return finished.isEmpty ? 1 : finished.map(fill).reduce(0, +) / Double(finished.count)
    }

    /// How full a chunk is: of the token budget or of the canvas rows, whichever binds.
    func fill(_ c: Chunk) -> Double {
        max(Double(c.tokens) / Double(maxTokens), Double(c.rows) / Double(max(1, renderer.config.rows)))
    }

    func underfull(_ c: Chunk) -> Bool { fill(c) < minFill }

    /// `a` and `b` (adjacent, `a` first) as one chunk, if that fits.
    func join(_ a: Chunk, _ b: Chunk, over scalars: ScalarIndexer) -> Chunk? {
        let range = a.scalarRange.lowerBound..<b.scalarRange.upperBound
        let text = scalars.doc[scalars.range(range)]
        let (ok, tokens, fit) = fits(text)
        guard ok else { return nil }
        return Chunk(scalarRange: range, text: text, tokens: tokens, rows: fit.rows, missing: fit.missing)
    }

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

/// A document's text with the chunks it was cut into (`Chunker.chunking`): what the next
/// chunking of an edited version of the document starts from.
public struct Chunking: Sendable {
    public let text: String
    public let chunks: [Chunk]
    /// The mean fill of the finished chunks when the document was last chunked afresh.
    let baseline: Double

    /// The chunks cover the text exactly, in order, without gaps.
    var isTiling: Bool {
        var next = 0
        for c in chunks {
            guard c.scalarRange.lowerBound == next, c.scalarRange.upperBound > next else { return false }
            next = c.scalarRange.upperBound
        }
        return next == text.unicodeScalars.count
    }
}

extension Chunk {
    /// The same chunk `shift` scalars further on, as a slice of the indexer's document (which
    /// holds the same text there).
    func moved(by shift: Int, over scalars: ScalarIndexer) -> Chunk {
        var c = self
        c.scalarRange = (scalarRange.lowerBound + shift)..<(scalarRange.upperBound + shift)
        c.text = scalars.doc[scalars.range(c.scalarRange)]
        return c
    }
}

/// String indices of scalar offsets in one string: one pass records every 256th, so that each
/// lookup walks at most 255 scalars (offsets are asked for in any order).
struct ScalarIndexer {
    let doc: String
    /// The index of every 256th scalar.
    let marks: [String.Index]
    /// The document's length in scalars.
    let count: Int

    init(_ doc: String) {
        self.doc = doc
        var marks: [String.Index] = []
        var i = doc.unicodeScalars.startIndex
        var n = 0
        while true {
            if n % 256 == 0 { marks.append(i) }
            guard i < doc.unicodeScalars.endIndex else { break }
            i = doc.unicodeScalars.index(after: i)
            n += 1
        }
        self.marks = marks
        count = n
    }

    func index(_ offset: Int) -> String.Index {
        let m = min(max(0, offset / 256), marks.count - 1)
        return doc.unicodeScalars.index(marks[m], offsetBy: offset - m * 256)
    }

    func range(_ r: Range<Int>) -> Range<String.Index> { index(r.lowerBound)..<index(r.upperBound) }
}
