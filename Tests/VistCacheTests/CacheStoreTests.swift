import CVistKernels
import Foundation
import Testing

@testable import VistCache

@Suite final class CacheStoreTests {
    /// The directories this test made (`tempDir`), removed when it ends.
    private var dirs: [URL] = []
    deinit { for d in dirs { try? FileManager.default.removeItem(at: d) } }

    let identity = CacheStore.Identity(fingerprint: Array(repeating: 1, count: 32), renderConfig: Array(repeating: 2, count: 32))
    func key(_ b: UInt8) -> [UInt8] { Array(repeating: b, count: 32) }

    func tempDir() -> URL {
        let u = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-cache-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: u, withIntermediateDirectories: true)
        dirs.append(u)
        return u
    }

    let me = CacheStore.Owner(uid: 1000)
    /// The file name (without .v2c) of `me`'s entry under key(b).
    func name(_ b: UInt8, _ owner: CacheStore.Owner? = nil) -> String { CacheStore.hex(CacheStore.storageKey(key(b), owner ?? me)) }

    @discardableResult
    func put(_ s: CacheStore, _ level: CacheStore.Level, _ k: [UInt8], _ payload: [UInt8], owner: CacheStore.Owner? = nil) -> Bool {
        payload.withUnsafeBytes { s.put(level, key: k, owner: owner ?? me, payload: $0) }
    }

    @Test func crc32cMatchesTheStandardCheckValue() {
        let check = Array("123456789".utf8)
        #expect(vk_crc32c(0, check, check.count) == 0xE306_9283)
        #expect(vk_crc32c_portable(0, check, check.count) == 0xE306_9283)
        // Hardware and table paths agree on every length and alignment, and chaining works.
        var bytes = [UInt8](repeating: 0, count: 1000)
        var g = SystemRandomNumberGenerator()
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255, using: &g) }
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 999] {
            for off in 0..<3 where off + n <= bytes.count {
                bytes.withUnsafeBytes { p in
                    #expect(vk_crc32c(0, p.baseAddress! + off, n) == vk_crc32c_portable(0, p.baseAddress! + off, n))
                }
            }
        }
        let whole = vk_crc32c(0, bytes, 1000)
        let halves = bytes.withUnsafeBytes { p in vk_crc32c(vk_crc32c(0, p.baseAddress!, 400), p.baseAddress! + 400, 600) }
        #expect(whole == halves)
    }

    @Test func roundTripAndSurvivesReopen() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(s.get(.chunk, key: key(9), owner: me) == nil)
        let payload = (0..<1000).map { UInt8($0 % 251) }
        #expect(put(s, .chunk, key(9), payload))
        #expect(s.get(.chunk, key: key(9), owner: me) == payload)
        #expect(s.get(.prefix, key: key(9), owner: me) == nil)  // levels are separate
        s.close()
        let s2 = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(s2.stats.entries == 1)
        #expect(s2.get(.chunk, key: key(9), owner: me) == payload)
        #expect(s2.stats.hits == 1)
        // No temporary files are left behind.
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.appendingPathComponent("chunk").path)
        #expect(names == [name(9) + ".v2c"])
    }

    @Test func damagedTruncatedAndForeignEntriesAreMisses() throws {
        let dir = tempDir()
        let logged = LogBox()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity, log: { logged.add($0) })
        let payload = [UInt8](repeating: 7, count: 4096)
        let file = { (k: UInt8) in dir.appendingPathComponent("chunk/\(self.name(k)).v2c").path }
        // A flipped payload bit.
        #expect(put(s, .chunk, key(1), payload))
        var d = try Data(contentsOf: URL(fileURLWithPath: file(1)))
        d[CacheStore.headerSize + 100] ^= 0x10
        try d.write(to: URL(fileURLWithPath: file(1)))
        #expect(s.get(.chunk, key: key(1), owner: me) == nil)
        #expect(!FileManager.default.fileExists(atPath: file(1)))
        // Truncated.
        #expect(put(s, .chunk, key(2), payload))
        d = try Data(contentsOf: URL(fileURLWithPath: file(2)))
        try d.prefix(d.count - 10).write(to: URL(fileURLWithPath: file(2)))
        #expect(s.get(.chunk, key: key(2), owner: me) == nil)
        // Another model's entry copied under our key.
        let other = try CacheStore(
            directory: tempDir(), budget: 1 << 20,
            identity: .init(fingerprint: Array(repeating: 3, count: 32), renderConfig: Array(repeating: 2, count: 32)))
        #expect(put(other, .chunk, key(3), payload))
        try FileManager.default.copyItem(
            atPath: other.directory.appendingPathComponent("chunk/\(name(3)).v2c").path, toPath: file(3))
        #expect(s.get(.chunk, key: key(3), owner: me) == nil)
        // An entry stored under another key (renamed file).
        #expect(put(s, .chunk, key(4), payload))
        try FileManager.default.moveItem(atPath: file(4), toPath: file(5))
        #expect(s.get(.chunk, key: key(5), owner: me) == nil)
        // Garbage and an empty file.
        try Data(repeating: 0xAB, count: 300).write(to: URL(fileURLWithPath: file(6)))
        #expect(s.get(.chunk, key: key(6), owner: me) == nil)
        try Data().write(to: URL(fileURLWithPath: file(7)))
        #expect(s.get(.chunk, key: key(7), owner: me) == nil)
        #expect(s.stats.rejectedDamaged == 6)
        #expect(logged.lines.count == 6)
        #expect(logged.lines.contains { $0.contains("another model") })
        // Logged once: the file is gone, the next lookup is a plain miss.
        #expect(s.get(.chunk, key: key(3), owner: me) == nil)
        #expect(logged.lines.count == 6)
    }

    @Test func lruEvictionKeepsTheBudget() throws {
        let dir = tempDir()
        let entry = CacheStore.headerSize + 1000
        let s = try CacheStore(directory: dir, budget: 3 * entry, identity: identity)
        let payload = [UInt8](repeating: 1, count: 1000)
        for k in 1...3 { #expect(put(s, .prefix, key(UInt8(k)), payload)) }
        Thread.sleep(forTimeInterval: 0.01)
        #expect(s.get(.prefix, key: key(1), owner: me) != nil)  // 1 is now the most recently used
        #expect(put(s, .prefix, key(4), payload))
        #expect(s.stats.bytes <= 3 * entry)
        #expect(s.stats.evictions == 1)
        #expect(s.get(.prefix, key: key(2), owner: me) == nil)  // the least recently used went
        #expect(s.get(.prefix, key: key(1), owner: me) != nil)
        #expect(s.get(.prefix, key: key(4), owner: me) != nil)
        // A smaller budget on reopen evicts down to it, oldest first.
        s.close()
        let s2 = try CacheStore(directory: dir, budget: entry, identity: identity)
        #expect(s2.stats.entries == 1)
        // Too large for the budget: not stored.
        #expect(!put(s2, .prefix, key(9), [UInt8](repeating: 0, count: 2 * entry)))
        #expect(s2.evictAll(by: .all) == 1)
        #expect(s2.stats.bytes == 0)
    }

    @Test func oneProcessPerDirectory() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(put(s, .chunk, key(1), [1, 2, 3]))
        do {
            _ = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
            Issue.record("two stores opened one directory")
        } catch CacheStore.OpenError.locked(let why) {
            #expect(why.contains(dir.path))
        }
        s.close()
        #expect(s.get(.chunk, key: key(1), owner: me) == nil && !put(s, .chunk, key(2), [1]))  // closed: inert
        let s2 = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(s2.get(.chunk, key: key(1), owner: me) == [1, 2, 3])
    }

    @Test func symlinksAreNotFollowedAndReadsAreBounded() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 30, identity: identity, maxEntryBytes: 1 << 16)
        let file = { (k: UInt8) in dir.appendingPathComponent("chunk/\(self.name(k)).v2c").path }
        // A valid entry reached through a symbolic link is not read.
        #expect(put(s, .chunk, key(1), [7, 7, 7]))
        try FileManager.default.moveItem(atPath: file(1), toPath: dir.appendingPathComponent("elsewhere").path)
        try FileManager.default.createSymbolicLink(atPath: file(1), withDestinationPath: dir.appendingPathComponent("elsewhere").path)
        #expect(s.get(.chunk, key: key(1), owner: me) == nil)
        // A file claiming a huge size (sparse) is damaged, not allocated.
        #expect(put(s, .chunk, key(2), [1]))
        #expect(truncate(file(2), 8 << 30) == 0)
        #expect(s.get(.chunk, key: key(2), owner: me) == nil && s.stats.rejectedDamaged == 1)
        // Nor is a level directory that is a symbolic link.
        s.close()
        let other = tempDir()
        try FileManager.default.removeItem(at: dir.appendingPathComponent("prefix"))
        try FileManager.default.createSymbolicLink(atPath: dir.appendingPathComponent("prefix").path, withDestinationPath: other.path)
        #expect(throws: CacheStore.OpenError.self) { _ = try CacheStore(directory: dir, budget: 1 << 20, identity: identity) }
    }

    @Test func aHitOnAnEntryEvictedMeanwhileDoesNotBringItBack() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        let file = dir.appendingPathComponent("prefix/\(name(3)).v2c").path
        #expect(put(s, .prefix, key(3), [3, 3]))
        let bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        #expect(s.evict(keys: [name(3)], by: .all).removed == 1)
        // As if a reader had read the file just before the eviction unlinked it.
        try bytes.write(to: URL(fileURLWithPath: file))
        #expect(s.get(.prefix, key: key(3), owner: me) == [3, 3])
        #expect(s.stats.entries == 0 && s.stats.bytes == 0 && s.list(for: .all).isEmpty)
    }

    @Test func evictionOrderOverManyEntries() throws {
        let entry = CacheStore.headerSize + 10
        let s = try CacheStore(directory: tempDir(), budget: 100 * entry, identity: identity)
        for k in 0..<150 { #expect(put(s, .chunk, key(UInt8(k)), [UInt8](repeating: 1, count: 10))) }
        // The 50 oldest went; a hit moves an entry to the front of the order.
        #expect(s.stats.entries == 100 && s.stats.evictions == 50)
        #expect(s.get(.chunk, key: key(49), owner: me) == nil && s.get(.chunk, key: key(50), owner: me) != nil)
        #expect(put(s, .chunk, key(200), [UInt8](repeating: 1, count: 10)))
        #expect(s.get(.chunk, key: key(50), owner: me) != nil && s.get(.chunk, key: key(51), owner: me) == nil)
        #expect(s.list(limit: 2, for: .all).map(\.key) == [name(50), name(200)])
    }

    @Test func evictByKey() throws {
        let s = try CacheStore(directory: tempDir(), budget: 1 << 20, identity: identity)
        #expect(put(s, .chunk, key(1), [1]))
        #expect(put(s, .prefix, key(2), [2]))
        #expect(s.list(for: .all).count == 2)
        #expect(s.evict(keys: [name(2), "nonsense"], by: .all).removed == 1)
        #expect(s.list(for: .all).map(\.level) == [.chunk])
    }
}

extension CacheStoreTests {
    @Test("Entries belong to their owner: another user never hits, sees or evicts them; shared ones are common")
    func ownership() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        let a = CacheStore.Owner(uid: 1000), b = CacheStore.Owner(uid: 1001)
        let aShared = CacheStore.Owner(uid: 1000, shared: true), bShared = CacheStore.Owner(uid: 1001, shared: true)
        let va = CacheStore.Viewer(uid: 1000, seesAll: false), vb = CacheStore.Viewer(uid: 1001, seesAll: false)
        #expect(put(s, .chunk, key(1), [1], owner: a))
        #expect(put(s, .prefix, key(2), [2], owner: aShared))
        // B's lookup of A's private text misses, and B's figures say nothing of A's entry.
        #expect(s.get(.chunk, key: key(1), owner: b) == nil)
        #expect(s.get(.chunk, key: key(1), owner: bShared) == nil)
        #expect(s.get(.chunk, key: key(1), owner: a) == [1])
        #expect(s.stats(for: vb).hits == 0 && s.stats(for: vb).misses == 2)
        #expect(s.stats(for: va).hits == 1 && s.stats(for: va).misses == 0)
        // Shared entries are found by anyone asking for the shared namespace, never by a private lookup.
        #expect(s.get(.prefix, key: key(2), owner: bShared) == [2])
        #expect(s.get(.prefix, key: key(2), owner: b) == nil && s.get(.prefix, key: key(2), owner: a) == nil)
        // The same text stored by B is a separate entry.
        #expect(put(s, .chunk, key(1), [9], owner: b))
        #expect(s.get(.chunk, key: key(1), owner: b) == [9] && s.get(.chunk, key: key(1), owner: a) == [1])
        // Listing: own and shared; root and the daemon's user see all.
        #expect(Set(s.list(for: vb).map(\.key)) == [name(1, b), name(2, aShared)])
        #expect(Set(s.list(for: va).map(\.key)) == [name(1, a), name(2, aShared)])
        #expect(s.list(for: .all).count == 3)
        #expect(s.list(for: vb).first { $0.shared }?.owner == 1000)
        #expect(s.stats(for: vb).entries == 2 && s.stats(for: .all).entries == 3)
        // Eviction: another user's entry (shared or not) is refused; the owner and root may.
        #expect(s.evict(keys: [name(1, a), name(2, aShared)], by: vb) == .init(removed: 0, refused: 2))
        #expect(s.evict(keys: [name(2, aShared)], by: va) == .init(removed: 1, refused: 0))
        #expect(s.evictAll(by: vb) == 1)
        #expect(s.list(for: .all).map(\.key) == [name(1, a)])
        #expect(s.evictAll(by: .all) == 1 && s.stats.entries == 0)
    }

    @Test("Owners are read back from the headers on reopen; older-format and damaged headers are removed then")
    func ownersSurviveReopen() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(put(s, .chunk, key(1), [1], owner: .init(uid: 42)))
        #expect(put(s, .chunk, key(2), [2], owner: .init(uid: 43, shared: true)))
        #expect(put(s, .chunk, key(3), [3], owner: .init(uid: 44)))
        #expect(put(s, .chunk, key(4), [4], owner: .init(uid: 45)))
        s.close()
        // Entry 3 rewritten as format version 1 (header checksum made valid again); entry 4's header damaged.
        let file = { (k: UInt8, o: CacheStore.Owner) in dir.appendingPathComponent("chunk/\(self.name(k, o)).v2c") }
        var d = [UInt8](try Data(contentsOf: file(3, .init(uid: 44))))
        CacheStore.put32(&d, 8, 1)
        CacheStore.put32(&d, CacheStore.headerCRCOffset, d.withUnsafeBytes { vk_crc32c(0, $0.baseAddress!, CacheStore.headerCRCOffset) })
        try Data(d).write(to: file(3, .init(uid: 44)))
        d = [UInt8](try Data(contentsOf: file(4, .init(uid: 45))))
        d[113] ^= 1
        try Data(d).write(to: file(4, .init(uid: 45)))
        let logged = LogBox()
        let s2 = try CacheStore(directory: dir, budget: 1 << 20, identity: identity, log: { logged.add($0) })
        let entries = s2.list(for: .all)
        #expect(Set(entries.map { "\($0.owner) \($0.shared)" }) == ["42 false", "43 true"])
        #expect(!FileManager.default.fileExists(atPath: file(3, .init(uid: 44)).path))
        #expect(!FileManager.default.fileExists(atPath: file(4, .init(uid: 45)).path))
        #expect(logged.lines.count == 1 && logged.lines[0].contains("removed 2 entries"))
        #expect(s2.get(.chunk, key: key(1), owner: .init(uid: 42)) == [1])
        #expect(s2.get(.chunk, key: key(2), owner: .init(uid: 7, shared: true)) == [2])
        // A private entry whose header names another owner than its namespace is damaged.
        #expect(put(s2, .chunk, key(5), [5], owner: .init(uid: 50)))
        d = [UInt8](try Data(contentsOf: file(5, .init(uid: 50))))
        CacheStore.put32(&d, 112, 51)
        CacheStore.put32(&d, CacheStore.headerCRCOffset, d.withUnsafeBytes { vk_crc32c(0, $0.baseAddress!, CacheStore.headerCRCOffset) })
        try Data(d).write(to: file(5, .init(uid: 50)))
        #expect(s2.get(.chunk, key: key(5), owner: .init(uid: 50)) == nil)
        #expect(logged.lines.last?.contains("owner mismatch") == true)
    }
}

final class LogBox: @unchecked Sendable {
    let lock = NSLock()
    var lines: [String] = []
    func add(_ s: String) {
        lock.lock()
        lines.append(s)
        lock.unlock()
    }
}
