import VistCache
import VistEngine
import VistProtocol

/// Every conversion between engine types and protocol messages, and the one mapping from engine
/// errors to protocol error codes.
enum Conversions {
    /// The protocol's code for an engine error.
    static func code(_ e: EngineError) -> Vist2_V1_ErrorCode {
        switch e {
        case .contextOverflow: return .contextOverflow
        case .cancelled: return .cancelled
        case .io, .format, .modelNotFound: return .internal
        case .badArgument, .tooFewTokens: return .badRequest
        }
    }

    static func generateResult(_ r: GenerationResult) -> Vist2_V1_GenerateResult {
        .with {
            $0.text = r.text
            $0.promptTokens = UInt32(clamping: r.prompt_tokens)
            $0.generatedTokens = UInt32(clamping: r.generated_tokens)
            $0.ttftMs = r.ttft_ms
            $0.prefillTokensPerS = r.prefill_tokens_per_s
            $0.decodeTokensPerS = r.decode_tokens_per_s
            $0.stopReason = r.stop_reason.rawValue
            $0.kvBytes = UInt64(r.kv_bytes)
            $0.kvBytesFinal = UInt64(r.kv_bytes_final)
            $0.kvType = r.kv_type.rawValue
            $0.flops = UInt64(r.flops)
            $0.prefillMs = r.prefill_ms
            $0.decodeMs = r.decode_ms
            $0.peakRssBytes = UInt64(r.peak_rss_bytes)
            $0.tokenIds = r.token_ids
            if let c = r.compression {
                $0.mode = c.mode
                $0.docTextTokens = UInt32(clamping: c.doc_text_tokens)
                $0.visualTokens = UInt32(clamping: c.visual_tokens)
                $0.compressionRatio = c.compression_ratio
                $0.renderMs = c.render_ms
                $0.visionMs = c.vision_ms
                $0.chunks = UInt32(clamping: c.chunks)
                $0.swaps = UInt32(clamping: c.swaps)
                $0.swapMs = c.swap_ms
                $0.chunksEncoded = UInt32(clamping: c.chunks_encoded)
                $0.chunkCacheHits = UInt32(clamping: c.chunk_cache_hits)
                $0.prefixCacheHits = UInt32(clamping: c.prefix_cache_hits)
            }
        }
    }

    static func compressResult(_ r: CompressionResult) -> Vist2_V1_CompressResult {
        .with {
            $0.chunks = UInt32(clamping: r.chunks)
            $0.textTokens = UInt32(clamping: r.text_tokens)
            $0.visualTokens = UInt32(clamping: r.visual_tokens)
            $0.ratio = r.ratio
            $0.chunksRendered = UInt32(clamping: r.chunks_encoded)
            $0.chunkCacheHits = UInt32(clamping: r.chunk_cache_hits)
            $0.prefixCacheHits = UInt32(clamping: r.prefix_cache_hits)
            $0.elapsedMs = r.elapsed_ms
            $0.renderMs = r.render_ms
            $0.visionMs = r.vision_ms
        }
    }

    static func perplexityResult(_ r: PerplexityResult) -> Vist2_V1_PerplexityResult {
        .with {
            $0.perplexity = r.perplexity
            $0.tokens = UInt32(clamping: r.tokens)
            $0.windows = UInt32(clamping: r.windows)
            $0.scoredTokens = UInt32(clamping: r.scored_tokens)
            $0.ctx = UInt32(clamping: r.ctx)
        }
    }

    static func benchResult(_ r: BenchResult) -> Vist2_V1_BenchResult {
        .with {
            $0.ppTokens = UInt32(clamping: r.pp_tokens)
            $0.tgTokens = UInt32(clamping: r.tg_tokens)
            $0.threads = UInt32(clamping: r.threads)
            $0.repetitions = UInt32(clamping: r.repetitions)
            $0.ppTokensPerS = r.pp_tokens_per_s
            $0.ppStddev = r.pp_stddev
            $0.tgTokensPerS = r.tg_tokens_per_s
            $0.tgStddev = r.tg_stddev
            $0.peakRssBytes = UInt64(r.peak_rss_bytes)
            $0.modelBytes = UInt64(r.model_bytes)
            $0.simd = r.simd
        }
    }

    static func cacheEntry(_ e: CacheStore.Entry) -> Vist2_V1_CacheEntry {
        .with {
            $0.key = e.key
            $0.level = e.level.name
            $0.bytes = UInt64(e.bytes)
            $0.lastUsedUnix = Int64(e.lastUsed.timeIntervalSince1970)
            $0.ownerUid = e.owner
            $0.shared = e.shared
        }
    }

    static func cacheStats(_ s: CacheStore.Stats) -> Vist2_V1_CacheStats {
        .with {
            $0.bytes = UInt64(s.bytes)
            $0.budgetBytes = UInt64(s.budget)
            $0.entries = UInt64(s.entries)
            $0.hits = UInt64(s.hits)
            $0.misses = UInt64(s.misses)
            $0.evictions = UInt64(s.evictions)
            $0.rejectedDamaged = UInt64(s.rejectedDamaged)
        }
    }
}
