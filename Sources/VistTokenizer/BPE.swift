/// Byte-pair encoding of one pre-tokenized word, as llama.cpp's `llm_tokenizer_bpe_session` and
/// Hugging Face's BPE model do it: start from the word's byte-level characters and repeatedly
/// merge the adjacent pair with the lowest merge rank; among equal ranks the leftmost pair merges
/// first. The merged symbols are then looked up in the vocabulary.
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

    /// The merged symbols of a byte-level word.
    public func merge(_ word: String) -> [String] {
        var symbols = word.unicodeScalars.map { String($0) }
        guard symbols.count > 1 else { return symbols }
        while symbols.count > 1 {
            var best = Int.max
            var at = -1
            for i in 0..<(symbols.count - 1) {
                if let r = ranks[Pair(left: symbols[i], right: symbols[i + 1])], r < best {
                    best = r
                    at = i
                }
            }
            if at < 0 { break }
            symbols[at] += symbols[at + 1]
            symbols.remove(at: at + 1)
        }
        return symbols
    }
}
