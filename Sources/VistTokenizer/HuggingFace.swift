import Foundation
import VistFormats

extension Tokenizer {
    /// Builds a byte-level BPE tokenizer from a Hugging Face `tokenizer.json` (model.vocab,
    /// model.merges as "a b" strings or [a, b] pairs, added_tokens), with BOS/EOS from a
    /// `tokenizer_config.json` beside it when present. The pre-tokenizer is recognised from the
    /// file: a `Digits` split with individual digits is SmolLM's, Qwen2's regex is Qwen2's,
    /// anything else byte-level is GPT-2's.
    public convenience init(huggingFaceJSON path: String) throws(FormatError) {
        guard let data = FileManager.default.contents(atPath: path) else { throw FormatError(file: path, problem: .io("cannot read")) }
        guard let root = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
            let model = root["model"] as? [String: Any]
        else { throw FormatError(file: path, problem: .invalid("not a tokenizer.json object with a 'model'")) }
        guard (model["type"] as? String) == "BPE" else {
            throw FormatError(file: path, problem: .unsupportedType("tokenizer model type \(model["type"] ?? "nil") (only BPE)"))
        }
        guard let vocab = model["vocab"] as? [String: Any] else { throw FormatError(file: path, problem: .missing("model.vocab")) }
        var size = 0
        var pairs: [(String, Int)] = []
        for (tok, idAny) in vocab {
            guard let id = (idAny as? NSNumber)?.intValue, id >= 0, id < 1 << 22 else {
                throw FormatError(file: path, problem: .invalid("model.vocab['\(tok)'] is not a token id"))
            }
            pairs.append((tok, id))
            size = max(size, id + 1)
        }
        let added = (root["added_tokens"] as? [[String: Any]]) ?? []
        for a in added {
            if let id = (a["id"] as? NSNumber)?.intValue, id >= 0, id < 1 << 22 { size = max(size, id + 1) }
        }
        var tokens = [String](repeating: "", count: size)
        var kinds = [TokenKind](repeating: .unused, count: size)
        for (tok, id) in pairs {
            tokens[id] = tok
            kinds[id] = .normal
        }
        for a in added {
            guard let id = (a["id"] as? NSNumber)?.intValue, id >= 0, id < size, let content = a["content"] as? String else {
                throw FormatError(file: path, problem: .invalid("an added_tokens entry lacks id or content"))
            }
            tokens[id] = content
            kinds[id] = (a["special"] as? Bool ?? false) ? .control : .userDefined
        }
        var merges: [(String, String)] = []
        for (i, m) in ((model["merges"] as? [Any]) ?? []).enumerated() {
            if let s = m as? String, let sp = s.firstIndex(of: " ") {
                merges.append((String(s[..<sp]), String(s[s.index(after: sp)...])))
            } else if let a = m as? [String], a.count == 2 {
                merges.append((a[0], a[1]))
            } else {
                throw FormatError(file: path, problem: .invalid("model.merges[\(i)] is neither 'a b' nor [a, b]"))
            }
        }
        let preJSON =
            (try? JSONSerialization.data(withJSONObject: root["pre_tokenizer"] ?? NSNull(), options: [.fragmentsAllowed])).map {
                String(decoding: $0, as: UTF8.self)
            } ?? ""
        let pre: PreTokenizerKind
        if preJSON.contains("\"Digits\"") && preJSON.contains("\"individual_digits\":true") {
            pre = .smollm
        } else if preJSON.contains("\\\\p{N}|") || preJSON.contains("\\p{N}| ?[^") {
            pre = .qwen2
        } else {
            pre = .gpt2
        }
        // BOS/EOS and their use from tokenizer_config.json, when it is there.
        let configPath = (path as NSString).deletingLastPathComponent + "/tokenizer_config.json"
        var bosText: String? = nil, eosText: String? = nil, template: String? = nil
        var addBOS = false
        if let cdata = FileManager.default.contents(atPath: configPath),
            let cfg = (try? JSONSerialization.jsonObject(with: cdata)) as? [String: Any]
        {
            func tokenText(_ v: Any?) -> String? { (v as? String) ?? ((v as? [String: Any])?["content"] as? String) }
            bosText = tokenText(cfg["bos_token"])
            eosText = tokenText(cfg["eos_token"])
            template = cfg["chat_template"] as? String
            addBOS = cfg["add_bos_token"] as? Bool ?? false
        }
        let index = Dictionary(tokens.enumerated().map { ($1, Int32($0)) }, uniquingKeysWith: { a, _ in a })
        let eosName: String = eosText ?? "<|endoftext|>"
        do {
            try self.init(
                tokens: tokens, kinds: kinds, merges: merges, preTokenizer: pre,
                bos: bosText.flatMap { index[$0] }, eos: index[eosName],
                addBOS: addBOS, addEOS: false, chatTemplate: template)
        } catch {
            throw FormatError(file: path, problem: .invalid(error.description))
        }
    }
}
