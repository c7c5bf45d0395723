import ArgumentParser
import Foundation
import VistBridge
import VistClient
import VistEngine
import VistProtocol
import VistRender

/// A document as a command names it: its path (for messages and the daemon's logs) and its text.
struct Document {
    var path: String
    var text: String

    static func read(_ path: String) throws(EngineError) -> Document { Document(path: path, text: try readText(path)) }
}

/// One chunk of a rendered document, from either backend.
struct RenderedChunk {
    var index: Int
    var text: String
    var tokens: Int
    var rows: Int
    var missingGlyphs: Int
    var image: GrayImage
}

/// The totals of a rendered document.
struct RenderTotals {
    var chunks: Int
    var tokens: Int
    var visualTokens: Int
    var ratio: Double
    var modelFingerprint: String
}

/// What the commands that can run either way run against: the engine in this process (`--local`)
/// or the daemon (`vist2d`). Both return the engine's result types, so a command prints one way
/// whichever answered: `--json` has the same keys, and the text the same figures.
protocol Backend {
    func tokenize(_ text: String, parseSpecial: Bool, noSpecial: Bool) throws -> [Int32]
    /// `request` carries the prompt and sampling; `documents` are read as context.
    func generate(_ request: GenerationRequest, documents: [Document], shared: Bool, onText: (String) -> Void) throws
        -> GenerationResult
    /// `onProgress(chunks done, chunks total)`.
    func compress(_ document: Document, instruction: String, chat: Bool, shared: Bool, onProgress: (Int, Int) -> Void) throws
        -> CompressionResult
    func render(_ document: Document, onChunk: (RenderedChunk) throws -> Void) throws -> RenderTotals
    /// `onProgress(windows done, windows total, perplexity so far)`.
    func perplexity(_ document: Document, ctx: Int, onProgress: (Int, Int, Double) -> Void) throws -> PerplexityResult
    func bench(prompt: Int, generate: Int, repetitions: Int) throws -> BenchResult
}

/// `--local`, `--socket` and the model options: which backend a command runs against.
struct BackendOptions: ParsableArguments {
    @Flag(help: "Run the engine in this process with --model instead of asking the daemon.")
    var local = false

    @OptionGroup var modelOptions: ModelOptions

    @OptionGroup var socketOption: SocketOption

    /// The engine in this process with `--local`, else a connection to the daemon (which uses the
    /// model it was started with: the model options are refused without `--local`).
    func backend() throws -> any Backend {
        if local { return LocalBackend(options: modelOptions) }
        if let given = modelOptions.given.first {
            throw CLIError.badArgument("\(given) applies to --local; the daemon runs the model it was started with (vist2d --model)")
        }
        return try socketOption.daemon()
    }
}

/// The engine in this process.
struct LocalBackend: Backend {
    let options: ModelOptions

    /// The KV cache's element type: --kv-type, else f16 (as vist2d).
    var kvType: KVType { options.kvType ?? .f16 }

    /// --shared names the daemon's shared cache entries; there is no cache here.
    func refuseShared(_ shared: Bool) throws {
        guard !shared else { throw CLIError.badArgument("--shared names the daemon's shared cache entries; --local has no cache") }
    }

    func tokenize(_ text: String, parseSpecial: Bool, noSpecial: Bool) throws -> [Int32] {
        try options.loadTokenizer().encode(text, addSpecial: !noSpecial, parseSpecial: parseSpecial)
    }

    func generate(_ request: GenerationRequest, documents: [Document], shared: Bool, onText: (String) -> Void) throws
        -> GenerationResult
    {
        try refuseShared(shared)
        var req = request
        req.kvType = kvType
        let model: EngineModel
        if VIST2Model.isModelDirectory(try ModelStore.resolve(options.name)) {
            req.documents = documents.map(\.text)
            model = .vist2(try options.loadVIST2())
        } else {
            guard documents.isEmpty, !req.fullText else {
                throw CLIError.badArgument("--doc and --full-text need a VIST2 model directory; \(options.name) is a plain language model")
            }
            model = .language(try options.load())
        }
        return try GenerationTask.generate(req, model: model) { piece in
            onText(piece)
            return true
        }
    }

    func compress(_ document: Document, instruction: String, chat: Bool, shared: Bool, onProgress: (Int, Int) -> Void) throws
        -> CompressionResult
    {
        try refuseShared(shared)
        var req = GenerationRequest(prompt: instruction, documents: [document.text])
        req.chat = chat
        req.kvType = kvType
        return try GenerationTask.compress(req, model: try options.loadVIST2()) { done, total in
            onProgress(done, total)
            return true
        }
    }

    func render(_ document: Document, onChunk: (RenderedChunk) throws -> Void) throws -> RenderTotals {
        let model = try options.loadVIST2()
        let chunks = model.chunker.chunks(document.text)
        for (i, c) in chunks.enumerated() {
            try onChunk(
                RenderedChunk(
                    index: i, text: String(c.text), tokens: c.tokens, rows: c.rows, missingGlyphs: c.missing,
                    image: model.renderer.render(c.text).image))
        }
        let totals = model.renderTotals(chunks)
        return RenderTotals(
            chunks: chunks.count, tokens: totals.tokens, visualTokens: totals.visualTokens, ratio: totals.ratio,
            modelFingerprint: model.fingerprint)
    }

    func perplexity(_ document: Document, ctx: Int, onProgress: (Int, Int, Double) -> Void) throws -> PerplexityResult {
        try options.load().perplexity(text: document.text, ctx: ctx, kvType: kvType, progress: onProgress)
    }

    func bench(prompt: Int, generate: Int, repetitions: Int) throws -> BenchResult {
        try options.load().bench(prompt: prompt, generate: generate, repetitions: repetitions, kvType: kvType)
    }
}

/// The daemon, through the client library. Documents are opened for the request and closed after
/// it; the daemon's answers are turned into the engine's result types through the same field
/// mapping the editor bridge reports (`VistBridge`), so the keys cannot drift apart.
struct DaemonBackend: Backend {
    let client: VistClient

    func tokenize(_ text: String, parseSpecial: Bool, noSpecial: Bool) throws -> [Int32] {
        try client.tokenize(text, parseSpecial: parseSpecial, noSpecial: noSpecial)
    }

    /// Opens `documents`, runs `body` with their ids, and closes them (also when `body` fails).
    func withDocuments<T>(_ documents: [Document], _ body: ([String]) throws -> T) throws -> T {
        var ids: [String] = []
        defer { for id in ids { try? client.closeDocument(id: id) } }
        for d in documents { ids.append(try client.openDocument(text: d.text, path: d.path).documentID) }
        return try body(ids)
    }

    func generate(_ request: GenerationRequest, documents: [Document], shared: Bool, onText: (String) -> Void) throws
        -> GenerationResult
    {
        try request.validate()
        let r = try withDocuments(documents) { ids in
            let g = Vist2_V1_GenerateRequest.with {
                $0.instruction = request.prompt
                $0.chat = request.chat
                $0.documentIds = ids
                $0.fullText = request.fullText
                $0.shared = shared
                $0.maxTokens = UInt32(clamping: request.maxTokens)
                $0.stop = request.stop
                $0.ignoreEos = request.ignoreEOS
                $0.sampling = .with {
                    $0.temperature = request.sampling.temperature
                    $0.topK = UInt32(clamping: max(0, request.sampling.topK))
                    $0.topP = request.sampling.topP
                    $0.minP = request.sampling.minP
                    $0.repetitionPenalty = request.sampling.repetitionPenalty
                    $0.seed = request.sampling.seed
                }
            }
            return try client.generate(g, onText: onText)
        }
        return try decodeFields(generateResultFields(r), as: GenerationResult.self, what: "GenerateResult")
    }

    func compress(_ document: Document, instruction: String, chat: Bool, shared: Bool, onProgress: (Int, Int) -> Void) throws
        -> CompressionResult
    {
        let r = try withDocuments([document]) { ids in
            try client.compress(documentID: ids[0], instruction: instruction, chat: chat, shared: shared) {
                onProgress(Int($0.chunksDone), Int($0.chunksTotal))
            }
        }
        return try decodeFields(compressResultFields(r), as: CompressionResult.self, what: "CompressResult")
    }

    func render(_ document: Document, onChunk: (RenderedChunk) throws -> Void) throws -> RenderTotals {
        var failure: Error? = nil
        let r = try withDocuments([document]) { ids in
            try client.render(documentID: ids[0]) { chunk in
                guard failure == nil else { return }
                do {
                    let image = try GrayImage(png: Array(chunk.png))
                    try onChunk(
                        RenderedChunk(
                            index: Int(chunk.index), text: chunk.text, tokens: Int(chunk.tokens), rows: Int(chunk.rows),
                            missingGlyphs: Int(chunk.missingGlyphs), image: image))
                } catch { failure = error }
            }
        }
        if let failure { throw failure }
        return RenderTotals(
            chunks: Int(r.chunks), tokens: Int(r.textTokens), visualTokens: Int(r.visualTokens), ratio: r.ratio,
            modelFingerprint: client.hello.modelFingerprint)
    }

    func perplexity(_ document: Document, ctx: Int, onProgress: (Int, Int, Double) -> Void) throws -> PerplexityResult {
        guard let ctx = UInt32(exactly: ctx), ctx > 0 else { throw CLIError.badArgument("--ctx must be in 1...\(UInt32.max), got \(ctx)") }
        let r = try withDocuments([document]) { ids in
            try client.perplexity(documentID: ids[0], ctx: ctx) { onProgress(Int($0.windowsDone), Int($0.windowsTotal), $0.perplexity) }
        }
        return try decodeFields(perplexityResultFields(r), as: PerplexityResult.self, what: "PerplexityResult")
    }

    func bench(prompt: Int, generate: Int, repetitions: Int) throws -> BenchResult {
        guard let p = UInt32(exactly: prompt), let n = UInt32(exactly: generate), let r = UInt32(exactly: repetitions), r <= 1000 else {
            throw CLIError.badArgument("-p and -n must be in 0...\(UInt32.max) and -r in 0...1000")
        }
        let b = try client.bench(prompt: p, generate: n, repetitions: r)
        return try decodeFields(benchResultFields(b), as: BenchResult.self, what: "BenchResult")
    }

    /// The engine's result type from a daemon answer's fields; a field the engine's type needs
    /// and the answer lacks is a protocol error, not a silently wrong figure.
    func decodeFields<T: Decodable>(_ fields: [String: JSONValue], as type: T.Type, what: String) throws -> T {
        do { return try JSONDecoder().decode(T.self, from: JSONValue.object(fields).line()) } catch {
            throw VistClient.ClientError.protocolError("the daemon's \(what) does not read as \(T.self): \(error)")
        }
    }
}

/// Where the daemon listens: --socket, else the client library's default.
struct SocketOption: ParsableArguments {
    @Option(help: "The daemon's socket (default: $XDG_RUNTIME_DIR/vist2/vist2.sock, else /run/vist2/vist2.sock).")
    var socket: String?

    /// A connection to the daemon (`daemon_unavailable` when there is none).
    func daemon() throws -> DaemonBackend {
        DaemonBackend(client: try VistClient(socketPath: socket ?? VistClient.defaultSocketPath))
    }
}
