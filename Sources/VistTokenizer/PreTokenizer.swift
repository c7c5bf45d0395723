/// Splits text into the "words" that BPE then encodes independently.
///
/// The splitting rules reproduce llama.cpp's hand-written matchers for the regular expressions of
/// each pre-tokenizer (`unicode_regex_split_custom_gpt2` and friends in its unicode.cpp), including
/// their exact whitespace behaviour, rather than a general regex engine.
public enum PreTokenizerKind: String, Sendable, CaseIterable {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    case gpt2
    /// SmolLM (GGUF `tokenizer.ggml.pre = smollm`): first every digit on its own (`\p{N}`),
    /// then the GPT-2 rules inside each piece.
    case smollm
    /// Qwen2/Qwen3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    case qwen2
}

/// Character classes as llama.cpp defines them: letters and numbers by Unicode general category
/// (L*, N*), whitespace by its explicit table (which differs from Unicode's White_Space property).
enum CharClass {
    static let whitespace: Set<UInt32> = [
        0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680,
        0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A,
        0x2028, 0x2029, 0x202F, 0x205F, 0x3000,
    ]

    struct Flags {
        var letter = false
        var number = false
        var space = false
        /// False only past the end of the piece (llama.cpp's OUT_OF_RANGE flags).
        var defined = false
        var other: Bool { defined && !letter && !number && !space }
    }

    static func flags(_ s: Unicode.Scalar) -> Flags {
        var f = Flags()
        f.defined = true
        if s.value < 0x80 {
            let v = s.value
            f.letter = (v >= 0x41 && v <= 0x5A) || (v >= 0x61 && v <= 0x7A)
            f.number = v >= 0x30 && v <= 0x39
            f.space = whitespace.contains(v)
            return f
        }
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: f.letter = true
        case .decimalNumber, .letterNumber, .otherNumber: f.number = true
        default: break
        }
        f.space = whitespace.contains(s.value)
        return f
    }
}

public struct PreTokenizer: Sendable {
    public let kind: PreTokenizerKind

    public init(kind: PreTokenizerKind) { self.kind = kind }

    /// The words of `text`, in order; their concatenation is `text`.
    public func split(_ text: String) -> [Substring] {
        let scalars = Array(text.unicodeScalars)
        var bounds: [Range<Int>] = []
        switch kind {
        case .gpt2:
            Self.gpt2(scalars, 0..<scalars.count, into: &bounds)
        case .smollm:
            // Isolate every \p{N} scalar, then apply the GPT-2 rules to each piece.
            var start = 0
            for i in 0..<scalars.count where CharClass.flags(scalars[i]).number {
                if start < i { Self.gpt2(scalars, start..<i, into: &bounds) }
                bounds.append(i..<(i + 1))
                start = i + 1
            }
            if start < scalars.count { Self.gpt2(scalars, start..<scalars.count, into: &bounds) }
        case .qwen2:
            Self.qwen2(scalars, 0..<scalars.count, into: &bounds)
        }
        // Map scalar ranges back to substrings of the original text.
        var out: [Substring] = []
        out.reserveCapacity(bounds.count)
        let view = text.unicodeScalars
        var idx = view.startIndex
        var pos = 0
        for r in bounds {
            let lo = view.index(idx, offsetBy: r.lowerBound - pos)
            let hi = view.index(lo, offsetBy: r.count)
            out.append(Substring(text.unicodeScalars[lo..<hi]))
            idx = hi
            pos = r.upperBound
        }
        return out
    }

    /// `text` cut into pieces of about `target` scalars or more, each cut between a letter and a
    /// following space or newline: there every pre-tokenizer here ends one word (a run of letters
    /// ends at a non-letter) and starts the next from that position alone (no rule looks behind),
    /// and the piece before the cut does not end in whitespace (whose `\s+(?!\S)` rule looks at
    /// what follows). So the words of the pieces, in order, are the words of the whole text. A
    /// text without such a place stays whole.
    public static func segments(_ text: Substring, target: Int) -> [Substring] {
        var out: [Substring] = []
        let view = text.unicodeScalars
        var start = view.startIndex
        var count = 0
        var prevLetter = false
        var i = view.startIndex
        while i < view.endIndex {
            let c = view[i]
            if count >= target && prevLetter && (c == " " || c == "\n") {
                out.append(Substring(view[start..<i]))
                start = i
                count = 0
            }
            prevLetter = CharClass.flags(c).letter
            count += 1
            i = view.index(after: i)
        }
        if start < view.endIndex || out.isEmpty { out.append(Substring(view[start..<view.endIndex])) }
        return out
    }

    private static func contraction(_ s: [Unicode.Scalar], _ pos: Int, _ end: Int, caseInsensitive: Bool) -> Int {
        guard s[pos] == "'", pos + 1 < end else { return 0 }
        func lower(_ c: Unicode.Scalar) -> Unicode.Scalar {
            caseInsensitive && c.value >= 0x41 && c.value <= 0x5A ? Unicode.Scalar(c.value + 32)! : c
        }
        let c1 = lower(s[pos + 1])
        if c1 == "s" || c1 == "t" || c1 == "m" || c1 == "d" { return 2 }
        if pos + 2 < end {
            let c2 = lower(s[pos + 2])
            if (c1 == "r" && c2 == "e") || (c1 == "v" && c2 == "e") || (c1 == "l" && c2 == "l") { return 3 }
        }
        return 0
    }

    static func gpt2(_ s: [Unicode.Scalar], _ range: Range<Int>, into out: inout [Range<Int>]) {
        let end = range.upperBound
        func flags(_ i: Int) -> CharClass.Flags { i < end ? CharClass.flags(s[i]) : CharClass.Flags() }
        var pos = range.lowerBound
        while pos < end {
            let start = pos
            let n = contraction(s, pos, end, caseInsensitive: false)
            if n > 0 {
                pos += n
                out.append(start..<pos)
                continue
            }
            let f = flags(pos)
            let f2 = s[pos] == " " ? flags(pos + 1) : f
            if f2.letter || f2.number || f2.other {
                // <space>?\p{L}+ | <space>?\p{N}+ | <space>?[^\s\p{L}\p{N}]+
                if s[pos] == " " { pos += 1 }
                if f2.letter {
                    while flags(pos).letter { pos += 1 }
                } else if f2.number {
                    while flags(pos).number { pos += 1 }
                } else {
                    while flags(pos).other { pos += 1 }
                }
                out.append(start..<pos)
                continue
            }
            var ws = 0
            while flags(pos + ws).space { ws += 1 }
            if ws > 1 && pos + ws < end {
                // \s+(?!\S): leave the last space to prefix the next word.
                pos += ws - 1
            } else if ws > 0 {
                pos += ws  // \s+
            } else {
                pos += 1  // no rule matches: a piece of one scalar
            }
            out.append(start..<pos)
        }
    }

    static func qwen2(_ s: [Unicode.Scalar], _ range: Range<Int>, into out: inout [Range<Int>]) {
        let end = range.upperBound
        func flags(_ i: Int) -> CharClass.Flags { i < end ? CharClass.flags(s[i]) : CharClass.Flags() }
        func isCRLF(_ i: Int) -> Bool { i < end && (s[i] == "\r" || s[i] == "\n") }
        var pos = range.lowerBound
        while pos < end {
            let start = pos
            let n = contraction(s, pos, end, caseInsensitive: true)
            if n > 0 {
                pos += n
                out.append(start..<pos)
                continue
            }
            let f = flags(pos)
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(isCRLF(pos) || f.letter || f.number) && flags(pos + 1).letter || f.letter {
                pos += 1
                while flags(pos).letter { pos += 1 }
                out.append(start..<pos)
                continue
            }
            // \p{N}
            if f.number {
                pos += 1
                out.append(start..<pos)
                continue
            }
            // <space>?[^\s\p{L}\p{N}]+[\r\n]*
            let f2 = s[pos] == " " ? flags(pos + 1) : f
            if f2.other {
                if s[pos] == " " { pos += 1 }
                while flags(pos).other { pos += 1 }
                while isCRLF(pos) { pos += 1 }
                out.append(start..<pos)
                continue
            }
            var ws = 0
            var lastEnd = 0
            while flags(pos + ws).space {
                if isCRLF(pos + ws) { lastEnd = ws + 1 }
                ws += 1
            }
            if lastEnd > 0 {
                pos += lastEnd  // \s*[\r\n]+
            } else if ws > 1 && pos + ws < end {
                pos += ws - 1  // \s+(?!\S)
            } else if ws > 0 {
                pos += ws  // \s+
            } else {
                pos += 1
            }
            out.append(start..<pos)
        }
    }
}
