import Foundation

/// Counters and gauges of the daemon, exposed as Prometheus text (exposition format 0.0.4) by
/// the `Metrics` request and `vist2ctl metrics`.
public final class ServerMetrics: @unchecked Sendable {
    let lock = NSLock()
    var requests: [String: Int] = [:]
    var errors: [String: Int] = [:]
    var promptTokens = 0
    var generatedTokens = 0
    var decodeSeconds = 0.0
    var prefillSeconds = 0.0
    var connections = 0
    var peersRejected = 0
    var connectionsRefused = 0
    var timeouts = 0
    var chunksEncoded = 0
    var chunkHits = 0
    var prefixHits = 0
    var lastKVPeak = 0
    var lastDecodeTPS = 0.0

    func request(_ kind: String) { with { $0.requests[kind, default: 0] += 1 } }
    func error(_ code: String) { with { $0.errors[code, default: 0] += 1 } }
    func with(_ f: (ServerMetrics) -> Void) {
        lock.lock()
        f(self)
        lock.unlock()
    }

    func generation(prompt: Int, generated: Int, prefillMs: Double, decodeMs: Double, kvPeak: Int, decodeTPS: Double) {
        with {
            $0.promptTokens += prompt
            $0.generatedTokens += generated
            $0.prefillSeconds += prefillMs / 1000
            $0.decodeSeconds += decodeMs / 1000
            if kvPeak > 0 { $0.lastKVPeak = kvPeak }
            if decodeTPS > 0 { $0.lastDecodeTPS = decodeTPS }
        }
    }

    func blocks(encoded: Int, chunkHits: Int, prefixHits: Int) {
        with {
            $0.chunksEncoded += encoded
            $0.chunkHits += chunkHits
            $0.prefixHits += prefixHits
        }
    }

    func render(_ ctx: ServerContext) -> String {
        let c = ctx.counts()
        let cache = ctx.cache?.stats
        let documentBytes = ctx.openDocumentBytes, stalled = ctx.worker.stalledSeconds
        lock.lock()
        defer { lock.unlock() }
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, Double)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, v) in samples {
                let value = v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v)
                out += "\(name)\(labels) \(value)\n"
            }
        }
        func labelled(_ d: [String: Int], _ key: String) -> [(String, Double)] {
            d.keys.sorted().map { ("{\(key)=\"\($0)\"}", Double(d[$0]!)) }
        }
        metric("vist2_up", "gauge", "1 while the daemon serves.", [("", 1)])
        metric(
            "vist2_uptime_seconds", "gauge", "Seconds since the daemon started.", [("", Date().timeIntervalSince(ctx.started).rounded())])
        metric("vist2_requests_total", "counter", "Requests received, by type.", labelled(requests, "type"))
        metric("vist2_errors_total", "counter", "Error replies, by code.", labelled(errors, "code"))
        metric("vist2_queue_length", "gauge", "Requests waiting for the engine.", [("", Double(ctx.worker.queueLength))])
        metric("vist2_queue_capacity", "gauge", "Waiting requests past which new ones get BUSY.", [("", Double(ctx.worker.capacity))])
        metric("vist2_clients", "gauge", "Connected clients.", [("", Double(c.clients))])
        metric("vist2_connections_total", "counter", "Connections accepted.", [("", Double(connections))])
        metric("vist2_peers_rejected_total", "counter", "Connections refused by the peer-credential check.", [("", Double(peersRejected))])
        metric(
            "vist2_connections_refused_total", "counter", "Connections refused because the connection limit was reached.",
            [("", Double(connectionsRefused))])
        metric("vist2_timeouts_total", "counter", "Connections closed by the handshake, frame or idle timeout.", [("", Double(timeouts))])
        metric("vist2_document_bytes", "gauge", "Bytes of text of all open documents.", [("", Double(documentBytes))])
        metric(
            "vist2_engine_stalled_seconds", "gauge", "Seconds since the engine last made progress while it has work (0 when idle).",
            [("", stalled)])
        metric("vist2_documents_open", "gauge", "Documents open over all connections.", [("", Double(c.documents))])
        metric(
            "vist2_prompt_tokens_total", "counter", "Positions prefilled for generations (text and visual).", [("", Double(promptTokens))])
        metric("vist2_generated_tokens_total", "counter", "Tokens generated.", [("", Double(generatedTokens))])
        metric("vist2_prefill_seconds_total", "counter", "Time spent prefilling generations.", [("", prefillSeconds)])
        metric("vist2_decode_seconds_total", "counter", "Time spent decoding.", [("", decodeSeconds)])
        metric("vist2_decode_tokens_per_second", "gauge", "Decode speed of the last generation.", [("", lastDecodeTPS)])
        metric("vist2_kv_bytes_peak", "gauge", "Peak KV cache bytes of the last generation.", [("", Double(lastKVPeak))])
        metric(
            "vist2_chunks_encoded_total", "counter",
            "Chunks (of documents, and of generations at a chunk swap) rendered and run through the vision encoder.",
            [("", Double(chunksEncoded))])
        metric(
            "vist2_cache_hits_total", "counter",
            "Chunks (of documents, and of generations at a chunk swap) served from the persistent cache, by level.",
            [("{level=\"chunk\"}", Double(chunkHits)), ("{level=\"prefix\"}", Double(prefixHits))])
        metric("vist2_cache_bytes", "gauge", "Bytes in the persistent cache.", [("", Double(cache?.bytes ?? 0))])
        metric("vist2_cache_budget_bytes", "gauge", "The persistent cache's size budget.", [("", Double(cache?.budget ?? 0))])
        metric("vist2_cache_entries", "gauge", "Entries in the persistent cache.", [("", Double(cache?.entries ?? 0))])
        metric(
            "vist2_cache_lookups_total", "counter", "Cache lookups, by result.",
            [
                ("{result=\"hit\"}", Double(cache?.hits ?? 0)), ("{result=\"miss\"}", Double(cache?.misses ?? 0)),
            ])
        metric("vist2_cache_evictions_total", "counter", "Entries evicted to keep the budget.", [("", Double(cache?.evictions ?? 0))])
        metric(
            "vist2_cache_rejected_total", "counter", "Damaged or foreign entries detected and dropped.",
            [("", Double(cache?.rejectedDamaged ?? 0))])
        metric(
            "vist2_cache_write_errors_total", "counter", "Cache writes that failed (disk full, read-only).",
            [("", Double(cache?.writeErrors ?? 0))])
        return out
    }
}
