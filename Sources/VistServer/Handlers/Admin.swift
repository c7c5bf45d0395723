import VistCache
import VistProtocol

/// Status, Metrics and the persistent cache's CacheList, CacheEvict and CacheStats: answered on
/// the event loop, never queued behind the engine.
enum AdminHandlers {
    static func status(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        s.reply(id) { $0.status = s.context.status() }
    }

    static func metrics(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        let text = s.context.metrics.render(s.context)
        s.reply(id) { $0.metrics = .with { $0.prometheusText = text } }
    }

    static func cacheList(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .cacheList(let l) = body else { return }
        let limit = min(l.limit == 0 ? Int.max : Int(l.limit), s.limits.maxCacheListEntries)
        let entries = s.context.cache?.list(limit: limit, for: s.cacheViewer) ?? []
        s.reply(id) { $0.cacheList = .with { $0.entries = entries.map(Conversions.cacheEntry) } }
    }

    static func cacheEvict(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .cacheEvict(let e) = body else { return }
        guard e.all || !e.keys.isEmpty else { return s.error(id, .badRequest, "name keys to evict, or set all") }
        guard e.keys.count <= s.limits.maxEvictKeys, e.keys.allSatisfy({ $0.count == 64 && $0.allSatisfy(\.isHexDigit) }) else {
            return s.error(id, .badRequest, "cache keys are 64 hex digits, at most \(s.limits.maxEvictKeys) per request")
        }
        var r = CacheStore.EvictResult()
        if e.all {
            r.removed = s.context.cache?.evictAll(by: s.cacheViewer) ?? 0
        } else {
            r = s.context.cache?.evict(keys: e.keys, by: s.cacheViewer) ?? r
            if r.removed == 0 && r.refused > 0 {
                return s.error(id, .permissionDenied, "the named cache entries belong to another user")
            }
            if r.removed == 0 { return s.error(id, .notFound, "no such cache entries") }
        }
        s.reply(id) {
            $0.cacheEvictResult = .with {
                $0.removed = UInt32(clamping: r.removed)
                $0.refused = UInt32(clamping: r.refused)
            }
        }
    }

    static func cacheStats(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        let stats = s.context.cache?.stats(for: s.cacheViewer) ?? CacheStore.Stats()
        s.reply(id) { $0.cacheStats = Conversions.cacheStats(stats) }
    }
}
