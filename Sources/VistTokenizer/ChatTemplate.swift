/// ChatML, the chat format of SmolLM2-Instruct and Qwen:
///
///     <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n
///
/// SmolLM2's Jinja template inserts a default system message when the conversation has none;
/// `defaultSystem(fromTemplate:)` reads it out of the GGUF's `tokenizer.chat_template`, so the
/// prompt matches what llama.cpp and transformers build from the same template.
public struct ChatML: Sendable {
    public struct Message: Sendable {
        public var role: String
        public var content: String
        public init(role: String, content: String) {
            self.role = role
            self.content = content
        }
    }

    public var defaultSystem: String?

    public init(defaultSystem: String?) { self.defaultSystem = defaultSystem }

    public init(template: String?) { self.defaultSystem = template.flatMap(Self.defaultSystem(fromTemplate:)) }

    /// The default system message a template inserts (`'<|im_start|>system\n...<|im_end|>`), if any.
    public static func defaultSystem(fromTemplate t: String) -> String? {
        guard let start = t.range(of: "'<|im_start|>system\n"), let end = t.range(of: "<|im_end|>", range: start.upperBound..<t.endIndex)
        else { return nil }
        let s = t[start.upperBound..<end.lowerBound]
        return s.contains("{{") || s.contains("{%") ? nil : String(s)
    }

    /// The prompt text for `messages`, ending with the assistant header when `addGenerationPrompt`.
    public func render(_ messages: [Message], addGenerationPrompt: Bool = true) -> String {
        var out = ""
        if let sys = defaultSystem, messages.first?.role != "system" {
            out += "<|im_start|>system\n\(sys)<|im_end|>\n"
        }
        for m in messages { out += "<|im_start|>\(m.role)\n\(m.content)<|im_end|>\n" }
        if addGenerationPrompt { out += "<|im_start|>assistant\n" }
        return out
    }
}
