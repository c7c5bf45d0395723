import VistProtocol

/// Handles one request: validates it, replies or registers it in flight (`Session.begin`) and
/// hands its work to the text queue or the engine. Runs on the connection's event loop.
typealias Handler = @Sendable (Session, UInt64, Vist2_V1_ClientMessage.OneOf_Body) -> Void

/// The request families and their handlers, by message kind (the names of the metrics'
/// `kind` label). Hello and Cancel belong to the connection protocol (`Session.handle`).
enum Handlers {
    static let table: [String: Handler] = [
        "status": AdminHandlers.status,
        "metrics": AdminHandlers.metrics,
        "cache_list": AdminHandlers.cacheList,
        "cache_evict": AdminHandlers.cacheEvict,
        "cache_stats": AdminHandlers.cacheStats,
        "open_document": DocumentHandlers.open,
        "update_document": DocumentHandlers.update,
        "close_document": DocumentHandlers.close,
        "generate": EngineHandlers.generate,
        "compress": EngineHandlers.compress,
        "perplexity": EngineHandlers.perplexity,
        "bench": EngineHandlers.bench,
        "tokenize": TextHandlers.tokenize,
        "render": TextHandlers.render,
    ]

    static func kind(_ b: Vist2_V1_ClientMessage.OneOf_Body?) -> String {
        switch b {
        case .hello: return "hello"
        case .status: return "status"
        case .openDocument: return "open_document"
        case .updateDocument: return "update_document"
        case .closeDocument: return "close_document"
        case .compress: return "compress"
        case .generate: return "generate"
        case .render: return "render"
        case .cancel: return "cancel"
        case .cacheList: return "cache_list"
        case .cacheEvict: return "cache_evict"
        case .cacheStats: return "cache_stats"
        case .metrics: return "metrics"
        case .tokenize: return "tokenize"
        case .perplexity: return "perplexity"
        case .bench: return "bench"
        case .none: return "unknown"
        }
    }
}
