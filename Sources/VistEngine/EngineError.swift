import VistFormats

/// Errors of the engine, each with a stable code for scripts (and, later, the wire protocol).
public enum EngineError: Error, CustomStringConvertible, Sendable {
    case badArgument(String)
    case modelNotFound(String)
    case format(FormatError)
    case contextOverflow(needed: Int, limit: Int)
    case tooFewTokens(String)
    case io(String)
    case cancelled

    public var code: String {
        switch self {
        case .badArgument: return "bad_argument"
        case .modelNotFound: return "model_not_found"
        case .format(let e): return "model_" + e.code
        case .contextOverflow: return "context_overflow"
        case .tooFewTokens: return "too_few_tokens"
        case .io: return "io"
        case .cancelled: return "cancelled"
        }
    }

    public var description: String {
        switch self {
        case .badArgument(let s): return s
        case .modelNotFound(let s): return s
        case .format(let e): return e.description
        case .contextOverflow(let n, let l): return "the request needs \(n) positions but the model's context holds \(l)"
        case .tooFewTokens(let s): return s
        case .io(let s): return s
        case .cancelled: return "cancelled"
        }
    }
}
