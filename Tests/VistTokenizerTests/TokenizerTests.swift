import Foundation
import Testing

@testable import VistEngine
@testable import VistFormats
@testable import VistTokenizer

/// The default model's tokenizer, loaded once. The test command fetches the model first
/// (scripts/fetch-model.sh); a missing model is a test failure, not a skip.
enum SharedTokenizer {
    static let result: Result<Tokenizer, Error> = Result {
        let url = try ModelStore.resolve("smollm2-135m")
        return try Tokenizer(gguf: GGUFFile(path: url.path))
    }
}

struct GoldenCase: Decodable {
    let text: String
    let ids_special: [Int32]
    let ids_plain: [Int32]
}

struct TokenizerGolden: Decodable {
    let magic: String
    let version: Int
    let model_sha256: String
    let cases: [GoldenCase]
}

func loadTokenizerGolden() throws -> TokenizerGolden {
    let url = try #require(Bundle.module.url(forResource: "Fixtures/tokenizer_golden", withExtension: "json"))
    let g = try JSONDecoder().decode(TokenizerGolden.self, from: Data(contentsOf: url))
    #expect(g.magic == "vist2-golden" && g.version == 1, "stale fixture: rerun scripts/make_golden.py")
    #expect(g.model_sha256 == ModelStore.smollm2.sha256, "fixture made from another model file: rerun scripts/make_golden.py")
    return g
}

@Suite("Tokenizer parity with llama.cpp")
struct TokenizerParityTests {
    @Test("Token ids equal llama.cpp's on the committed test set, with and without special-token parsing")
    func parity() throws {
        let tok = try SharedTokenizer.result.get()
        let golden = try loadTokenizerGolden()
        #expect(golden.cases.count >= 25)
        for c in golden.cases {
            let label = c.text.count > 60 ? String(c.text.prefix(60)) + "…" : c.text
            #expect(tok.encode(c.text, addSpecial: true, parseSpecial: true) == c.ids_special, "special: \(label.debugDescription)")
            #expect(tok.encode(c.text, addSpecial: true, parseSpecial: false) == c.ids_plain, "plain: \(label.debugDescription)")
        }
    }

    @Test("Decoding the ids gives back the exact text (round trip)")
    func roundTrip() throws {
        let tok = try SharedTokenizer.result.get()
        for c in try loadTokenizerGolden().cases {
            #expect(tok.decode(tok.encode(c.text, parseSpecial: false)) == c.text)
            #expect(tok.decode(tok.encode(c.text, parseSpecial: true), special: true) == c.text)
        }
        // Bytes that are not valid UTF-8 on their own still round-trip through byte tokens.
        let emoji = "😀"
        let ids = tok.encode(emoji)
        #expect(tok.decodeBytes(ids) == Array(emoji.utf8))
    }

    @Test("SmolLM2's vocabulary: special tokens, BOS/EOS and end-of-generation")
    func vocabulary() throws {
        let tok = try SharedTokenizer.result.get()
        #expect(tok.vocabularySize == 49152)
        #expect(tok.bos == 1 && tok.eos == 2 && tok.addBOS == false)
        let imEnd = try #require(tok.tokenToID["<|im_end|>"])
        #expect(tok.isEndOfGeneration(imEnd) && tok.isEndOfGeneration(2))
        #expect(tok.decode([imEnd]) == "" && tok.decode([imEnd], special: true) == "<|im_end|>")
    }
}

@Suite("Tokenizer stages")
struct TokenizerStageTests {
    @Test("The byte-level alphabet is a bijection of 256 printable scalars")
    func byteLevel() {
        #expect(Set(ByteLevel.byteToScalar).count == 256)
        #expect(ByteLevel.byteToScalar[Int(UInt8(ascii: " "))] == "Ġ")
        #expect(ByteLevel.byteToScalar[10] == "Ċ")
        let all = (0...255).map { UInt8($0) }
        #expect(ByteLevel.decode(ByteLevel.encode(all)) == all)
        #expect(ByteLevel.decode("\u{4e00}") == nil)
    }

    @Test("GPT-2 splitting keeps whitespace runs as llama.cpp does")
    func gpt2Split() {
        let p = PreTokenizer(kind: .gpt2)
        #expect(p.split("Hello world") == ["Hello", " world"])
        #expect(p.split("a   b") == ["a", "  ", " b"])
        #expect(p.split("end   ") == ["end", "   "])
        #expect(p.split("x\ny") == ["x", "\n", "y"])
        #expect(p.split("it's 'll") == ["it", "'s", " '", "ll"])
        #expect(p.split("$$ 12ab") == ["$$", " 12", "ab"])
        #expect(p.split("") == [])
    }

    @Test("SmolLM splitting isolates every digit first")
    func smollmSplit() {
        let p = PreTokenizer(kind: .smollm)
        #expect(p.split("year 2026!") == ["year", " ", "2", "0", "2", "6", "!"])
        #expect(p.split("x²") == ["x", "²"])
    }

    @Test("Qwen2 splitting: letters with one leading non-letter, single digits, newline runs")
    func qwen2Split() {
        let p = PreTokenizer(kind: .qwen2)
        #expect(p.split("Hello world") == ["Hello", " world"])
        #expect(p.split("a123") == ["a", "1", "2", "3"])
        #expect(p.split("x \n\n y") == ["x", " \n\n", " y"])
        #expect(p.split("I'M") == ["I", "'M"])
    }

    @Test("BPE merges by rank, leftmost first on ties")
    func bpe() {
        let bpe = BPE(merges: [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "a")])
        #expect(bpe.merge("abc") == ["abc"])
        #expect(bpe.merge("bc") == ["bc"])
        #expect(bpe.merge("aaa") == ["aa", "a"])
        #expect(bpe.merge("x") == ["x"])
    }

    @Test("ChatML renders SmolLM2's default system message")
    func chatML() throws {
        let tok = try SharedTokenizer.result.get()
        let chat = ChatML(template: tok.chatTemplate)
        #expect(chat.defaultSystem == "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        #expect(
            chat.render([.init(role: "user", content: "Hi")])
                == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        )
        #expect(
            chat.render([.init(role: "system", content: "S"), .init(role: "user", content: "U")], addGenerationPrompt: false)
                == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")
    }
}

/// The BPE merge loop as its definition states it (rescan every pair, merge the lowest rank,
/// leftmost on ties): quadratic, kept here as the reference the heap-based `BPE.merge` must equal.
func naiveMerge(_ bpe: BPE, _ word: String) -> [String] {
    var symbols = word.unicodeScalars.map { String($0) }
    while symbols.count > 1 {
        var best = Int.max
        var at = -1
        for i in 0..<(symbols.count - 1) {
            if let r = bpe.ranks[BPE.Pair(left: symbols[i], right: symbols[i + 1])], r < best {
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

@Suite("BPE merging")
struct BPEMergeTests {
    @Test("The heap-based merge equals the definition on random words, runs of one letter and overlapping ties")
    func equalsTheDefinition() throws {
        let tok = try SharedTokenizer.result.get()
        var rng = SystemRandomNumberGenerator()
        let alphabet = Array("aabbeeilnrst  \n\n\t.,é日😀0123")
        var words = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "\n\n\n\n\n\n\n\n\n\n\n", "abababababab", "        ", "0000000000"]
        for _ in 0..<300 {
            words.append(String((0..<Int.random(in: 1...40, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! }))
        }
        for w in words {
            let byteLevel = ByteLevel.encode(w.utf8)
            #expect(tok.bpe.merge(byteLevel) == naiveMerge(tok.bpe, byteLevel), "\(w.debugDescription)")
        }
    }

    @Test("100k identical letters or newlines tokenize within 2x the time of 100k ordinary words (no quadratic merge)")
    func longPreTokensAreNotQuadratic() throws {
        let tok = try SharedTokenizer.result.get()
        let vocabulary = ["the", "model", "reads", "its", "visual", "history", "and", "writes", "text", "in", "chunks", "of", "four"]
        let ordinary = (0..<100_000).map { vocabulary[$0 % vocabulary.count] + String($0 % 97) }.joined(separator: " ")
        /// The fastest of three runs (other tests share the machine; the minimum is the least noisy).
        func seconds(_ text: String) -> (Double, Int) {
            var best = Double.infinity, n = 0
            for _ in 0..<3 {
                let t0 = DispatchTime.now().uptimeNanoseconds
                n = tok.encode(text, addSpecial: false).count
                best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
            }
            return (best, n)
        }
        let (words, wordTokens) = seconds(ordinary)
        let (letters, letterTokens) = seconds(String(repeating: "a", count: 100_000))
        let (newlines, _) = seconds(String(repeating: "\n", count: 100_000))
        print(String(format: "BPE worst case: 100k words %.4f s, 100k letters %.4f s, 100k newlines %.4f s", words, letters, newlines))
        #expect(wordTokens > 100_000 && letterTokens > 1000)
        #expect(letters < 2 * words, "100k letters: \(letters) s, 100k words: \(words) s")
        #expect(newlines < 2 * words, "100k newlines: \(newlines) s, 100k words: \(words) s")
    }
}

@Suite("Tokenizing long text in pieces")
struct SegmentTests {
    /// Random text over the characters where the pre-tokenizers' rules meet: letters (ASCII and
    /// not), digits, spaces and newline runs, CR, apostrophes and contractions, punctuation, marks.
    static func randomText(_ n: Int, _ g: inout some RandomNumberGenerator) -> String {
        let atoms = [
            "a", "b", "Z", "é", "ß", "漢", "x", "'s", "'ll", "'", " ", " ", "  ", "\n", "\n\n", "\r\n", " \n", "1", "23", "²", ".",
            "!?", "$", "-", "\u{301}", "\t",
        ]
        return (0..<n).map { _ in atoms.randomElement(using: &g) ?? "" }.joined()
    }

    @Test("Cut where segments says, the pieces pre-tokenize to the words of the whole text (every kind)")
    func segmentsKeepTheWords() {
        var g = SystemRandomNumberGenerator()
        for kind in PreTokenizerKind.allCases {
            let p = PreTokenizer(kind: kind)
            for _ in 0..<300 {
                let text = Self.randomText(Int.random(in: 1...400, using: &g), &g)
                let pieces = PreTokenizer.segments(Substring(text), target: Int.random(in: 1...30, using: &g))
                #expect(pieces.joined() == text)
                let words = pieces.flatMap { p.split(String($0)) }.map(String.init)
                #expect(words == p.split(text).map(String.init), "\(kind) \(text.debugDescription)")
            }
        }
        // Long text is cut near every target, and only after a letter.
        let long = String(repeating: "word ", count: 100_000)
        let pieces = PreTokenizer.segments(Substring(long), target: 1 << 16)
        #expect(pieces.count == 8 && pieces.dropLast().allSatisfy { $0.last == "d" })
    }

    @Test("encode with a step calls it between pieces, gives the same ids, and stops when it returns false")
    func encodeWithStep() throws {
        let tok = try SharedTokenizer.result.get()
        let text = String(repeating: "The quick brown fox jumps over the lazy dog.\n", count: 10_000)  // 450 kB
        var steps = 0
        let ids = tok.encode(
            text,
            step: {
                steps += 1
                return true
            })
        #expect(ids == tok.encode(text))
        #expect(steps >= 450_000 / (1 << 16) - 1)
        var calls = 0
        #expect(
            tok.encode(
                text,
                step: {
                    calls += 1
                    return calls < 3
                }) == nil)
        #expect(calls == 3)
    }
}
