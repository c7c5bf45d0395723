import Foundation
import Testing

@testable import VistEngine

/// The default model, loaded once for the whole test target. The test command fetches it first
/// (scripts/fetch-model.sh); a missing model fails these tests rather than skipping them.
enum SharedModel {
    static let result: Result<LanguageModel, Error> = Result { try LanguageModel(name: "smollm2-135m", threads: 2) }
    /// Forward passes share the model's thread pool (one caller at a time); tests that use it take this lock.
    static let lock = NSLock()

    static func with<T>(_ body: (LanguageModel) throws -> T) throws -> T {
        let m = try result.get()
        lock.lock()
        defer { lock.unlock() }
        return try body(m)
    }
}

struct ModelGolden: Decodable {
    struct Reference: Decodable {
        let argmax_per_position: [Int32]
        let top_ids: [Int32]
        let top_logprobs: [Double]
        let next_token_logprobs: [Double]
    }
    struct Prompt: Decodable {
        let reference: Reference
        let text: String
        let ids: [Int32]
        let argmax_per_position: [Int32]
        let top_ids: [Int32]
        let top_logits: [Float]
        let top_logprobs: [Double]
        let greedy: [Int32]
    }
    struct Perplexity: Decodable {
        let file: String
        let file_sha256: String
        let ctx: Int
        let llama_perplexity: Double
    }
    let magic: String
    let version: Int
    let model_sha256: String
    let prompts: [Prompt]
    let perplexity: Perplexity?

    static func load() throws -> ModelGolden {
        let url = try #require(Bundle.module.url(forResource: "Fixtures/model_golden", withExtension: "json"))
        let g = try JSONDecoder().decode(ModelGolden.self, from: Data(contentsOf: url))
        #expect(g.magic == "vist2-golden" && g.version == 1, "stale fixture: rerun scripts/make_golden.py")
        #expect(g.model_sha256 == ModelStore.smollm2.sha256, "fixture made from another model file: rerun scripts/make_golden.py")
        return g
    }
}
