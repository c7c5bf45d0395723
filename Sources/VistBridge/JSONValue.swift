import Foundation
import VistProtocol

/// A JSON value, for the bridge's line protocol: request ids are whatever the client chose (a
/// number or a string), and events are objects of mixed values encoded with sorted keys.
public enum JSONValue: Codable, Hashable, Sendable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? c.decode(Int64.self) {
            self = .int(i)
        } else if let d = try? c.decode(Double.self) {
            self = .double(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .int(let i): try c.encode(i)
        // JSON has no NaN or infinity; a figure that is not finite is reported as null.
        case .double(let d): if d.isFinite { try c.encode(d) } else { try c.encodeNil() }
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    /// One line of compact JSON with sorted keys (no newline).
    public func line() -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? enc.encode(self)) ?? Data("null".utf8)
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral {
    public init(stringLiteral s: String) { self = .string(s) }
    public init(integerLiteral i: Int64) { self = .int(i) }
    public init(booleanLiteral b: Bool) { self = .bool(b) }
}

extension JSONValue {
    public static func uint(_ v: some BinaryInteger) -> JSONValue { .int(Int64(clamping: v)) }
}

/// The fields `vist2ctl generate --json` prints for a GenerateResult (the same keys as the
/// engine's `GenerationResult` in `--local` mode), which the bridge's `done` event repeats: text,
/// token counts, timings, KV and FLOP figures, and when the request read documents (or wrote past
/// a chunk boundary) the compression figures and the mode (`vist2` or `full-text`).
public func generateResultFields(_ r: Vist2_V1_GenerateResult) -> [String: JSONValue] {
    var out: [String: JSONValue] = [
        "text": .string(r.text), "prompt_tokens": .uint(r.promptTokens), "generated_tokens": .uint(r.generatedTokens),
        "ttft_ms": .double(r.ttftMs), "prefill_tokens_per_s": .double(r.prefillTokensPerS),
        "decode_tokens_per_s": .double(r.decodeTokensPerS), "stop_reason": .string(r.stopReason),
        "kv_type": .string(r.kvType), "token_ids": .array(r.tokenIds.map { .int(Int64($0)) }),
    ]
    for (k, v) in [("kv_bytes", r.kvBytes), ("kv_bytes_final", r.kvBytesFinal), ("flops", r.flops), ("peak_rss_bytes", r.peakRssBytes)] {
        out[k] = .uint(v)
    }
    out["prefill_ms"] = .double(r.prefillMs)
    out["decode_ms"] = .double(r.decodeMs)
    guard !r.mode.isEmpty else { return out }
    out["mode"] = .string(r.mode)
    for (k, v) in [
        ("doc_text_tokens", r.docTextTokens), ("visual_tokens", r.visualTokens), ("chunks", r.chunks), ("swaps", r.swaps),
        ("chunks_encoded", r.chunksEncoded), ("chunk_cache_hits", r.chunkCacheHits), ("prefix_cache_hits", r.prefixCacheHits),
    ] {
        out[k] = .uint(v)
    }
    for (k, v) in [("compression_ratio", r.compressionRatio), ("render_ms", r.renderMs), ("vision_ms", r.visionMs), ("swap_ms", r.swapMs)] {
        out[k] = .double(v)
    }
    return out
}

/// The fields `vist2ctl compress --json` prints for a CompressResult (the engine's
/// CompressionResult keys; the command adds the file name).
public func compressResultFields(_ r: Vist2_V1_CompressResult) -> [String: JSONValue] {
    [
        "chunks": .uint(r.chunks), "text_tokens": .uint(r.textTokens), "visual_tokens": .uint(r.visualTokens), "ratio": .double(r.ratio),
        "chunks_encoded": .uint(r.chunksRendered), "chunk_cache_hits": .uint(r.chunkCacheHits),
        "prefix_cache_hits": .uint(r.prefixCacheHits), "elapsed_ms": .double(r.elapsedMs), "render_ms": .double(r.renderMs),
        "vision_ms": .double(r.visionMs),
    ]
}

/// The fields `vist2ctl perplexity --json` prints for a PerplexityResult (the engine's keys).
public func perplexityResultFields(_ r: Vist2_V1_PerplexityResult) -> [String: JSONValue] {
    [
        "perplexity": .double(r.perplexity), "tokens": .uint(r.tokens), "windows": .uint(r.windows),
        "scored_tokens": .uint(r.scoredTokens), "ctx": .uint(r.ctx),
    ]
}

/// The fields `vist2ctl bench --json` prints for a BenchResult (the engine's keys).
public func benchResultFields(_ b: Vist2_V1_BenchResult) -> [String: JSONValue] {
    [
        "pp_tokens": .uint(b.ppTokens), "tg_tokens": .uint(b.tgTokens), "threads": .uint(b.threads),
        "repetitions": .uint(b.repetitions), "pp_tokens_per_s": .double(b.ppTokensPerS), "pp_stddev": .double(b.ppStddev),
        "tg_tokens_per_s": .double(b.tgTokensPerS), "tg_stddev": .double(b.tgStddev), "peak_rss_bytes": .uint(b.peakRssBytes),
        "model_bytes": .uint(b.modelBytes), "simd": .string(b.simd),
    ]
}

/// The fields `vist2ctl status --json` prints (and the bridge's `status` event): the daemon's
/// Status, with the server's version and model geometry from its HelloReply.
public func statusFields(_ s: Vist2_V1_Status, hello: Vist2_V1_HelloReply?) -> [String: JSONValue] {
    var out: [String: JSONValue] = [
        "state": .string(s.state), "model": .string(s.modelName), "model_fingerprint": .string(s.modelFingerprint),
        "queue_length": .uint(s.queueLength), "clients": .uint(s.clients), "documents_open": .uint(s.documentsOpen),
        "cache_bytes": .uint(s.cacheBytes), "uptime_seconds": .uint(s.uptimeSeconds),
        "engine_stalled_seconds": .double(s.engineStalledSeconds),
    ]
    if let h = hello {
        out["server_version"] = .string(h.serverVersion)
        out["protocol_version"] = .uint(h.protocolVersion)
        out["chunk_length"] = .uint(h.chunkLength)
        out["visual_tokens"] = .uint(h.visualTokens)
    }
    return out
}

/// The fields `vist2ctl cache stats --json` prints (and the bridge's `cache_stats` event).
public func cacheStatsFields(_ s: Vist2_V1_CacheStats) -> [String: JSONValue] {
    [
        "bytes": .uint(s.bytes), "budget_bytes": .uint(s.budgetBytes), "entries": .uint(s.entries), "hits": .uint(s.hits),
        "misses": .uint(s.misses), "evictions": .uint(s.evictions), "rejected_damaged": .uint(s.rejectedDamaged),
    ]
}

/// The stable code of a daemon error: the protocol's ErrorCode name in snake_case
/// (CONTEXT_OVERFLOW -> "context_overflow"), as vist2ctl and the bridge report it.
public func errorCodeName(_ code: Vist2_V1_ErrorCode) -> String {
    var out = ""
    for ch in "\(code)" {
        if ch.isUppercase { out += "_" + ch.lowercased() } else { out.append(ch) }
    }
    return out
}
