import Foundation
import VistFormats
import VistKernels
import VistTokenizer

/// A loaded decoder with its tokenizer, ready to run: weights (mapped), tokenizer, forward pass.
public final class LanguageModel: @unchecked Sendable {
    public let source: URL
    public let weights: TransformerWeights
    public let tokenizer: Tokenizer
    public let transformer: Transformer
    public var config: ModelConfig { weights.config }

    /// Loads a GGUF file, or a Hugging Face directory (config.json, safetensors, tokenizer.json).
    public init(url: URL, threads: Int = defaultThreads, maxBatch: Int = 512) throws(EngineError) {
        source = url
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
            throw .modelNotFound("\(url.path): no such file or directory")
        }
        do {
            if isDir.boolValue {
                weights = try TransformerWeights.load(huggingFaceDirectory: url)
                tokenizer = try Tokenizer(huggingFaceJSON: url.appendingPathComponent("tokenizer.json").path)
            } else {
                let gguf = try GGUFFile(path: url.path)
                weights = try TransformerWeights.load(gguf: gguf)
                tokenizer = try Tokenizer(gguf: gguf)
            }
        } catch {
            throw .format(error)
        }
        guard tokenizer.vocabularySize <= weights.config.vocabSize else {
            throw .format(
                FormatError(
                    file: url.path,
                    problem: .invalid(
                        "the tokenizer has \(tokenizer.vocabularySize) tokens but the model only \(weights.config.vocabSize) embeddings")))
        }
        transformer = Transformer(weights: weights, threads: threads, maxBatch: maxBatch)
    }

    public convenience init(name: String, threads: Int = defaultThreads) throws(EngineError) {
        try self.init(url: ModelStore.resolve(name), threads: threads)
    }

    /// The tokenizer of a GGUF file or Hugging Face directory, without loading the weights.
    public static func loadTokenizer(url: URL) throws(EngineError) -> Tokenizer {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
            throw .modelNotFound("\(url.path): no such file or directory")
        }
        do {
            if isDir.boolValue { return try Tokenizer(huggingFaceJSON: url.appendingPathComponent("tokenizer.json").path) }
            return try Tokenizer(gguf: GGUFFile(path: url.path))
        } catch {
            throw .format(error)
        }
    }

    /// One thread per core the process may run on.
    public static var defaultThreads: Int { max(1, ProcessInfo.processInfo.activeProcessorCount) }

    /// The chat prompt for one user message, in the model's ChatML format.
    public func chatPrompt(_ user: String) -> String {
        ChatML(template: tokenizer.chatTemplate).render([.init(role: "user", content: user)])
    }
}

/// Peak resident set size of this process in bytes (getrusage's ru_maxrss, in KiB on Linux).
public func peakRSSBytes() -> Int {
    var u = rusage()
    #if os(Linux)
        getrusage(RUSAGE_SELF.rawValue, &u)
    #else
        getrusage(RUSAGE_SELF, &u)
    #endif
    #if os(Linux)
        return Int(u.ru_maxrss) * 1024
    #else
        return Int(u.ru_maxrss)
    #endif
}

/// Current resident set size in bytes (from /proc/self/statm on Linux).
public func currentRSSBytes() -> Int {
    #if os(Linux)
        if let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) {
            let parts = s.split(separator: " ")
            if parts.count > 1, let pages = Int(parts[1]) { return pages * Int(sysconf(Int32(_SC_PAGESIZE))) }
        }
    #endif
    return peakRSSBytes()
}
