import Foundation
import VistFormats

/// A token's role, with GGUF's `tokenizer.ggml.token_type` numbering (llama.cpp's llama_token_type).
public enum TokenKind: Int32, Sendable {
    case undefined = 0, normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
}

public enum TokenizerError: Error, CustomStringConvertible, Sendable {
    case invalid(String)

    public var description: String {
        switch self {
        case .invalid(let s): return s
        }
    }
}

/// A byte-level BPE tokenizer: special-token partition, pre-tokenizer, BPE, vocabulary lookup;
/// and the exact inverse for decoding. Matches llama.cpp's tokenizer for GPT-2 style vocabularies.
public final class Tokenizer: @unchecked Sendable {
    public let tokens: [String]
    public let kinds: [TokenKind]
    public let tokenToID: [String: Int32]
    public let bpe: BPE
    public let preTokenizer: PreTokenizer
    public let bos: Int32?
    public let eos: Int32?
    /// End-of-generation tokens beyond `eos` (for ChatML, `<|im_end|>`).
    public let eogTokens: Set<Int32>
    public let addBOS: Bool
    public let addEOS: Bool
    public let chatTemplate: String?
    /// Special tokens matched in raw text before BPE, longest first (llama.cpp's cache_special_tokens).
    let specialTokens: [(text: String, id: Int32)]

    /// Token ids of recently seen words: at most `cachedWords` words of at most `cachedWordBytes`
    /// bytes each, so the cache stays under a few MB whatever the daemon is asked to tokenize.
    private var cache: [String: [Int32]] = [:]
    private let cacheLock = NSLock()
    static let cachedWords = 50_000
    static let cachedWordBytes = 48

    public var vocabularySize: Int { tokens.count }

    public init(
        tokens: [String], kinds: [TokenKind], merges: [(String, String)], preTokenizer: PreTokenizerKind,
        bos: Int32?, eos: Int32?, addBOS: Bool, addEOS: Bool, chatTemplate: String?
    ) throws(TokenizerError) {
        guard !tokens.isEmpty, kinds.count == tokens.count else {
            throw .invalid("the vocabulary is empty or its token types do not match its tokens")
        }
        for id in [bos, eos].compactMap({ $0 }) where id < 0 || Int(id) >= tokens.count {
            throw .invalid("special token id \(id) is outside the vocabulary of \(tokens.count)")
        }
        self.tokens = tokens
        self.kinds = kinds
        var map: [String: Int32] = [:]
        map.reserveCapacity(tokens.count)
        for (i, t) in tokens.enumerated() where map[t] == nil { map[t] = Int32(i) }
        tokenToID = map
        bpe = BPE(merges: merges)
        self.preTokenizer = PreTokenizer(kind: preTokenizer)
        self.bos = bos
        self.eos = eos
        self.addBOS = addBOS
        self.addEOS = addEOS
        self.chatTemplate = chatTemplate
        var specials: [(String, Int32)] = []
        for (i, k) in kinds.enumerated() where (k == .control || k == .userDefined || k == .unknown) && !tokens[i].isEmpty {
            specials.append((tokens[i], Int32(i)))
        }
        // Longest first; ties by id so the order is deterministic.
        specials.sort { $0.0.utf8.count != $1.0.utf8.count ? $0.0.utf8.count > $1.0.utf8.count : $0.1 < $1.1 }
        specialTokens = specials.map { (text: $0.0, id: $0.1) }
        var eog: Set<Int32> = []
        if let eos { eog.insert(eos) }
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"] {
            if let id = map[name], kinds[Int(id)] == .control { eog.insert(id) }
        }
        eogTokens = eog
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    public convenience init(gguf: GGUFFile) throws(FormatError) {
        let path = gguf.path
        let model = try gguf.string("tokenizer.ggml.model")
        guard model == "gpt2" else {
            throw FormatError(
                file: path, problem: .unsupportedType("tokenizer model '\(model)' (only byte-level BPE, 'gpt2', is supported)"))
        }
        let pre = (try? gguf.string("tokenizer.ggml.pre")) ?? "default"
        let kind: PreTokenizerKind
        switch pre {
        case "smollm": kind = .smollm
        case "default", "gpt-2", "gpt2": kind = .gpt2
        case "qwen2": kind = .qwen2
        default: throw FormatError(file: path, problem: .unsupportedType("pre-tokenizer '\(pre)' (supported: smollm, gpt2, qwen2)"))
        }
        let tokenValues = try gguf.array("tokenizer.ggml.tokens")
        var tokens: [String] = []
        tokens.reserveCapacity(tokenValues.count)
        for v in tokenValues {
            guard let s = v.string else { throw FormatError(file: path, problem: .invalid("tokenizer.ggml.tokens holds a non-string")) }
            tokens.append(s)
        }
        var kinds = [TokenKind](repeating: .normal, count: tokens.count)
        if gguf.metadata["tokenizer.ggml.token_type"] != nil {
            let types = try gguf.array("tokenizer.ggml.token_type")
            guard types.count == tokens.count else {
                throw FormatError(
                    file: path, problem: .invalid("tokenizer.ggml.token_type has \(types.count) entries for \(tokens.count) tokens"))
            }
            for (i, t) in types.enumerated() {
                guard let v = t.int, let k = TokenKind(rawValue: Int32(v)) else {
                    throw FormatError(file: path, problem: .invalid("tokenizer.ggml.token_type[\(i)] is not a token type"))
                }
                kinds[i] = k
            }
        }
        var merges: [(String, String)] = []
        for (i, m) in try gguf.array("tokenizer.ggml.merges").enumerated() {
            guard let s = m.string, let sp = s.firstIndex(of: " "), sp != s.startIndex else {
                throw FormatError(file: path, problem: .invalid("tokenizer.ggml.merges[\(i)] is not 'left right'"))
            }
            merges.append((String(s[..<sp]), String(s[s.index(after: sp)...])))
        }
        func id(_ key: String) throws(FormatError) -> Int32? {
            guard gguf.metadata[key] != nil else { return nil }
            let v = try gguf.int(key)
            guard v >= 0, v < tokens.count else {
                throw FormatError(file: path, problem: .invalid("\(key) = \(v) is outside the vocabulary"))
            }
            return Int32(v)
        }
        let bos = try id("tokenizer.ggml.bos_token_id")
        let eos = try id("tokenizer.ggml.eos_token_id")
        do {
            try self.init(
                tokens: tokens, kinds: kinds, merges: merges, preTokenizer: kind, bos: bos, eos: eos,
                addBOS: gguf.metadata["tokenizer.ggml.add_bos_token"]?.bool ?? false,
                addEOS: gguf.metadata["tokenizer.ggml.add_eos_token"]?.bool ?? false,
                chatTemplate: gguf.metadata["tokenizer.chat_template"]?.string)
        } catch {
            throw FormatError(file: path, problem: .invalid(error.description))
        }
    }

    // MARK: encode

    /// Token ids of `text`. `addSpecial` adds BOS/EOS when the vocabulary asks for them;
    /// `parseSpecial` turns the text of control tokens (e.g. `<|im_start|>`) into those tokens,
    /// otherwise they are tokenized as plain text (llama.cpp's `parse_special`).
    public func encode(_ text: String, addSpecial: Bool = true, parseSpecial: Bool = false) -> [Int32] {
        encode(text, addSpecial: addSpecial, parseSpecial: parseSpecial, step: nil) ?? []
    }

    /// `encode` of long text in pieces of about `segmentScalars` scalars (cut where the words do
    /// not change, `PreTokenizer.segments`), with `step` called between them; nil as soon as
    /// `step` returns false. The daemon yields to other clients and checks for cancellation
    /// there (a 4 MiB document takes up to ~2 s to tokenize on two cores).
    public func encode(_ text: String, addSpecial: Bool = true, parseSpecial: Bool = false, step: (() -> Bool)?) -> [Int32]? {
        var out: [Int32] = []
        if addSpecial, addBOS, let bos { out.append(bos) }
        var first = true
        for fragment in partition(text, parseSpecial: parseSpecial) {
            switch fragment {
            case .special(let id): out.append(id)
            case .text(let s):
                for piece in PreTokenizer.segments(s, target: Self.segmentScalars) {
                    if !first, let step, !step() { return nil }
                    first = false
                    encodeText(piece, into: &out)
                }
            }
        }
        if addSpecial, addEOS, let eos { out.append(eos) }
        return out
    }

    /// Scalars per piece of `encode(_:step:)` (tens of ms of pre-tokenizing and merging).
    static let segmentScalars = 1 << 16

    enum Fragment {
        case text(Substring)
        case special(Int32)
    }

    /// Splits raw text around occurrences of special tokens, longest tokens first, each raw
    /// fragment scanned left to right — the order of llama.cpp's `tokenizer_st_partition`.
    func partition(_ text: String, parseSpecial: Bool) -> [Fragment] {
        guard parseSpecial, !text.isEmpty else { return text.isEmpty ? [] : [.text(Substring(text))] }
        var fragments: [Fragment] = [.text(Substring(text))]
        for (special, id) in specialTokens {
            var next: [Fragment] = []
            next.reserveCapacity(fragments.count)
            for f in fragments {
                guard case .text(var rest) = f, rest.contains(special) else {
                    next.append(f)
                    continue
                }
                while let r = rest.range(of: special) {
                    if r.lowerBound > rest.startIndex { next.append(.text(rest[..<r.lowerBound])) }
                    next.append(.special(id))
                    rest = rest[r.upperBound...]
                }
                if !rest.isEmpty { next.append(.text(rest)) }
            }
            fragments = next
        }
        return fragments
    }

    func encodeText(_ text: Substring, into out: inout [Int32]) {
        for word in preTokenizer.split(String(text)) {
            let w = String(word)
            cacheLock.lock()
            let cached = cache[w]
            cacheLock.unlock()
            if let cached {
                out.append(contentsOf: cached)
                continue
            }
            var ids: [Int32] = []
            for symbol in bpe.merge(ByteLevel.encode(w.utf8)) {
                if let id = tokenToID[symbol] {
                    ids.append(id)
                } else {
                    // llama.cpp's fallback: each byte of the symbol's text as a one-byte token.
                    for b in symbol.utf8 {
                        if let id = tokenToID[String(decoding: [b], as: UTF8.self)] { ids.append(id) }
                    }
                }
            }
            // Only short words are worth remembering (they repeat); a long one would pin its bytes.
            if w.utf8.count <= Self.cachedWordBytes {
                cacheLock.lock()
                if cache.count >= Self.cachedWords { cache.removeAll(keepingCapacity: true) }
                cache[w] = ids
                cacheLock.unlock()
            }
            out.append(contentsOf: ids)
        }
    }

    // MARK: decode

    /// The bytes a token stands for. Control tokens are empty unless `special` is true.
    public func pieceBytes(_ id: Int32, special: Bool = false) -> [UInt8] {
        guard id >= 0, Int(id) < tokens.count else { return [] }
        let text = tokens[Int(id)]
        switch kinds[Int(id)] {
        case .normal, .undefined:
            return ByteLevel.decode(text) ?? Array(text.utf8)
        case .userDefined:
            return Array(text.utf8)
        case .control, .unknown:
            return special ? Array(text.utf8) : []
        case .byte, .unused:
            return ByteLevel.decode(text) ?? []
        }
    }

    /// The bytes of a token sequence; `String(decoding:as:)` of them is the text.
    public func decodeBytes<S: Sequence<Int32>>(_ ids: S, special: Bool = false) -> [UInt8] {
        var out: [UInt8] = []
        for id in ids { out.append(contentsOf: pieceBytes(id, special: special)) }
        return out
    }

    public func decode<S: Sequence<Int32>>(_ ids: S, special: Bool = false) -> String {
        String(decoding: decodeBytes(ids, special: special), as: UTF8.self)
    }

    public func isEndOfGeneration(_ id: Int32) -> Bool { eogTokens.contains(id) }
}
