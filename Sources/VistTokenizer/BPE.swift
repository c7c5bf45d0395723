/// Byte-pair encoding of one pre-tokenized word, as llama.cpp's `llm_tokenizer_bpe_session` and
/// Hugging Face's BPE model do it: start from the word's byte-level characters and repeatedly
/// merge the adjacent pair with the lowest merge rank; among equal ranks the leftmost pair merges
/// first. The merged symbols are then looked up in the vocabulary.
///
/// The candidate pairs live in a binary heap ordered by (rank, position of the left symbol), and
/// the symbols in a doubly linked list over the word's characters, as llama.cpp does it: each
/// merge costs O(log n), so a word of n characters takes O(n log n) instead of the O(n²) of
/// rescanning every pair after each merge. That matters because one pre-token can be as long as
/// a document (a run of one letter, or of newlines) and the daemon tokenizes what clients send.
public struct BPE: Sendable {
    /// Merge rank of "left right" (lower merges first).
    let ranks: [Pair: Int]

    struct Pair: Hashable, Sendable {
        let left: String
        let right: String
    }

    public init(merges: [(String, String)]) {
        var r: [Pair: Int] = [:]
        r.reserveCapacity(merges.count)
        for (i, m) in merges.enumerated() where r[Pair(left: m.0, right: m.1)] == nil {
            r[Pair(left: m.0, right: m.1)] = i
        }
        ranks = r
    }

    /// A candidate merge: symbols `left` and `right` (indices of their first character) had the
    /// texts of `leftLength`/`rightLength` characters when it was queued; it is stale once either
    /// has changed.
    struct Candidate {
        let rank: Int
        let left: Int
        let right: Int
        let leftLength: Int
        let rightLength: Int

        /// Lower rank first; the leftmost pair among equal ranks.
        func precedes(_ o: Candidate) -> Bool { rank != o.rank ? rank < o.rank : left < o.left }
    }

    /// The merged symbols of a byte-level word.
    public func merge(_ word: String) -> [String] {
        let chars = word.unicodeScalars.map { String($0) }
        let n = chars.count
        guard n > 1 else { return chars }
        // Symbol i starts at character i and spans `length[i]` characters while alive
        // (length 0: merged into its left neighbour). next/prev link the live symbols.
        var length = [Int](repeating: 1, count: n)
        var next = Array(1...n)  // n: none
        var prev = Array(-1..<(n - 1))  // -1: none
        var text = chars
        var heap = Heap()
        func queue(_ l: Int, _ r: Int) {
            guard l >= 0, r < n, let rank = ranks[Pair(left: text[l], right: text[r])] else { return }
            heap.push(Candidate(rank: rank, left: l, right: r, leftLength: length[l], rightLength: length[r]))
        }
        for i in 0..<(n - 1) { queue(i, i + 1) }
        while let c = heap.pop() {
            // Stale: one side was merged away or has grown since this pair was queued.
            guard length[c.left] == c.leftLength, length[c.right] == c.rightLength, next[c.left] == c.right else { continue }
            text[c.left] += text[c.right]
            length[c.left] += length[c.right]
            length[c.right] = 0
            text[c.right] = ""
            next[c.left] = next[c.right]
            if next[c.right] < n { prev[next[c.right]] = c.left }
            queue(prev[c.left], c.left)
            queue(c.left, next[c.left])
        }
        var out: [String] = []
        var i = 0
        while i < n {
            out.append(text[i])
            i = next[i]
        }
        return out
    }

    /// A binary min-heap of candidates (`precedes` order).
    struct Heap {
        var items: [Candidate] = []

        mutating func push(_ c: Candidate) {
            items.append(c)
            var i = items.count - 1
            while i > 0 {
                let p = (i - 1) / 2
                guard items[i].precedes(items[p]) else { break }
                items.swapAt(i, p)
                i = p
            }
        }

        mutating func pop() -> Candidate? {
            guard let top = items.first else { return nil }
            let last = items.removeLast()
            guard !items.isEmpty else { return top }
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count && items[l].precedes(items[m]) { m = l }
                if r < items.count && items[r].precedes(items[m]) { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
            return top
        }
    }
}
