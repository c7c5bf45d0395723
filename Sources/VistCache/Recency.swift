/// The cache's index in recency order: a dictionary of nodes linked from the most to the least
/// recently used, so a hit, a store and an eviction each cost O(1) and a listing walks only as
/// far as it lists (no sorting per write, as a sorted copy of the whole index would cost).
struct Recency {
    final class Node {
        let id: String
        var entry: CacheStore.Entry
        // Only `nodes` owns nodes (a chain of strong links would free recursively, node by node,
        // and a long one could overflow the stack); a node is unlinked before it leaves `nodes`.
        unowned(unsafe) var newer: Node? = nil
        unowned(unsafe) var older: Node? = nil

        init(id: String, entry: CacheStore.Entry) {
            self.id = id
            self.entry = entry
        }
    }

    private var nodes: [String: Node] = [:]
    /// Most recently used.
    private unowned(unsafe) var front: Node? = nil
    /// Least recently used.
    private unowned(unsafe) var back: Node? = nil

    var count: Int { nodes.count }

    func entry(_ id: String) -> CacheStore.Entry? { nodes[id]?.entry }

    /// Stores `entry` under `id` as the most recently used.
    mutating func touch(_ id: String, _ entry: CacheStore.Entry) {
        if let n = nodes[id] {
            n.entry = entry
            unlink(n)
            pushFront(n)
        } else {
            let n = Node(id: id, entry: entry)
            nodes[id] = n
            pushFront(n)
        }
    }

    @discardableResult
    mutating func remove(_ id: String) -> CacheStore.Entry? {
        guard let n = nodes.removeValue(forKey: id) else { return nil }
        unlink(n)
        return n.entry
    }

    /// The least recently used entry other than `skipping`.
    func leastRecent(skipping: String?) -> (String, CacheStore.Entry)? {
        var n = back
        while let x = n, x.id == skipping { n = x.newer }
        return n.map { ($0.id, $0.entry) }
    }

    /// Up to `limit` entries that pass `filter`, most recently used first.
    func mostRecent(_ limit: Int, where filter: (CacheStore.Entry) -> Bool = { _ in true }) -> [CacheStore.Entry] {
        var out: [CacheStore.Entry] = []
        var n = front
        while let x = n, out.count < limit {
            if filter(x.entry) { out.append(x.entry) }
            n = x.older
        }
        return out
    }

    private mutating func pushFront(_ n: Node) {
        n.older = front
        n.newer = nil
        front?.newer = n
        front = n
        if back == nil { back = n }
    }

    private mutating func unlink(_ n: Node) {
        if let newer = n.newer { newer.older = n.older } else { front = n.older }
        if let older = n.older { older.newer = n.newer } else { back = n.newer }
        n.newer = nil
        n.older = nil
    }
}
