import CVistKernels
import Foundation
import Testing

@testable import VistCache

@Suite struct CacheStoreTests {
    let identity = CacheStore.Identity(fingerprint: Array(repeating: 1, count: 32), renderConfig: Array(repeating: 2, count: 32))
    func key(_ b: UInt8) -> [UInt8] { Array(repeating: b, count: 32) }

    func tempDir() -> URL {
        let u = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-cache-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: u, withIntermediateDirectories: true)
        return u
    }

    func put(_ s: CacheStore, _ level: CacheStore.Level, _ k: [UInt8], _ payload: [UInt8]) -> Bool {
        payload.withUnsafeBytes { s.put(level, key: k, payload: $0) }
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
        #expect(s.get(.chunk, key: key(9)) == nil)
        let payload = (0..<1000).map { UInt8($0 % 251) }
        #expect(put(s, .chunk, key(9), payload))
        #expect(s.get(.chunk, key: key(9)) == payload)
        #expect(s.get(.prefix, key: key(9)) == nil)  // levels are separate
        s.close()
        let s2 = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(s2.stats.entries == 1)
        #expect(s2.get(.chunk, key: key(9)) == payload)
        #expect(s2.stats.hits == 1)
        // No temporary files are left behind.
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.appendingPathComponent("chunk").path)
        #expect(names == [CacheStore.hex(key(9)) + ".v2c"])
    }

    @Test func damagedTruncatedAndForeignEntriesAreMisses() throws {
        let dir = tempDir()
        let logged = LogBox()
        let s = try CacheStore(directory: dir, budget: 1 << 20, identity: identity, log: { logged.add($0) })
        let payload = [UInt8](repeating: 7, count: 4096)
        let file = { (k: UInt8) in dir.appendingPathComponent("chunk/\(CacheStore.hex(self.key(k))).v2c").path }
        // A flipped payload bit.
        #expect(put(s, .chunk, key(1), payload))
        var d = try Data(contentsOf: URL(fileURLWithPath: file(1)))
        d[CacheStore.headerSize + 100] ^= 0x10
        try d.write(to: URL(fileURLWithPath: file(1)))
        #expect(s.get(.chunk, key: key(1)) == nil)
        #expect(!FileManager.default.fileExists(atPath: file(1)))
        // Truncated.
        #expect(put(s, .chunk, key(2), payload))
        d = try Data(contentsOf: URL(fileURLWithPath: file(2)))
        try d.prefix(d.count - 10).write(to: URL(fileURLWithPath: file(2)))
        #expect(s.get(.chunk, key: key(2)) == nil)
        // Another model's entry copied under our key.
        let other = try CacheStore(
            directory: tempDir(), budget: 1 << 20,
            identity: .init(fingerprint: Array(repeating: 3, count: 32), renderConfig: Array(repeating: 2, count: 32)))
        #expect(put(other, .chunk, key(3), payload))
        try FileManager.default.copyItem(
            atPath: other.directory.appendingPathComponent("chunk/\(CacheStore.hex(key(3))).v2c").path, toPath: file(3))
        #expect(s.get(.chunk, key: key(3)) == nil)
        // An entry stored under another key (renamed file).
        #expect(put(s, .chunk, key(4), payload))
        try FileManager.default.moveItem(atPath: file(4), toPath: file(5))
        #expect(s.get(.chunk, key: key(5)) == nil)
        // Garbage and an empty file.
        try Data(repeating: 0xAB, count: 300).write(to: URL(fileURLWithPath: file(6)))
        #expect(s.get(.chunk, key: key(6)) == nil)
        try Data().write(to: URL(fileURLWithPath: file(7)))
        #expect(s.get(.chunk, key: key(7)) == nil)
        #expect(s.stats.rejectedDamaged == 6)
        #expect(logged.lines.count == 6)
        #expect(logged.lines.contains { $0.contains("another model") })
        // Logged once: the file is gone, the next lookup is a plain miss.
        #expect(s.get(.chunk, key: key(3)) == nil)
        #expect(logged.lines.count == 6)
    }

    @Test func lruEvictionKeepsTheBudget() throws {
        let dir = tempDir()
        let entry = CacheStore.headerSize + 1000
        let s = try CacheStore(directory: dir, budget: 3 * entry, identity: identity)
        let payload = [UInt8](repeating: 1, count: 1000)
        for k in 1...3 { #expect(put(s, .prefix, key(UInt8(k)), payload)) }
        Thread.sleep(forTimeInterval: 0.01)
        #expect(s.get(.prefix, key: key(1)) != nil)  // 1 is now the most recently used
        #expect(put(s, .prefix, key(4), payload))
        #expect(s.stats.bytes <= 3 * entry)
        #expect(s.stats.evictions == 1)
        #expect(s.get(.prefix, key: key(2)) == nil)  // the least recently used went
        #expect(s.get(.prefix, key: key(1)) != nil)
        #expect(s.get(.prefix, key: key(4)) != nil)
        // A smaller budget on reopen evicts down to it, oldest first.
        s.close()
        let s2 = try CacheStore(directory: dir, budget: entry, identity: identity)
        #expect(s2.stats.entries == 1)
        // Too large for the budget: not stored.
        #expect(!put(s2, .prefix, key(9), [UInt8](repeating: 0, count: 2 * entry)))
        #expect(s2.evictAll() == 1)
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
        #expect(s.get(.chunk, key: key(1)) == nil && !put(s, .chunk, key(2), [1]))  // closed: inert
        let s2 = try CacheStore(directory: dir, budget: 1 << 20, identity: identity)
        #expect(s2.get(.chunk, key: key(1)) == [1, 2, 3])
    }

    @Test func symlinksAreNotFollowedAndReadsAreBounded() throws {
        let dir = tempDir()
        let s = try CacheStore(directory: dir, budget: 1 << 30, identity: identity, maxEntryBytes: 1 << 16)
        let file = { (k: UInt8) in dir.appendingPathComponent("chunk/\(CacheStore.hex(self.key(k))).v2c").path }
        // A valid entry reached through a symbolic link is not read.
        #expect(put(s, .chunk, key(1), [7, 7, 7]))
        try FileManager.default.moveItem(atPath: file(1), toPath: dir.appendingPathComponent("elsewhere").path)
        try FileManager.default.createSymbolicLink(atPath: file(1), withDestinationPath: dir.appendingPathComponent("elsewhere").path)
        #expect(s.get(.chunk, key: key(1)) == nil)
        // A file claiming a huge size (sparse) is damaged, not allocated.
        #expect(put(s, .chunk, key(2), [1]))
        #expect(truncate(file(2), 8 << 30) == 0)
        #expect(s.get(.chunk, key: key(2)) == nil && s.stats.rejectedDamaged == 1)
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
        let file = dir.appendingPathComponent("prefix/\(CacheStore.hex(key(3))).v2c").path
        #expect(put(s, .prefix, key(3), [3, 3]))
        let bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        #expect(s.evict(keys: [CacheStore.hex(key(3))]) == 1)
        // As if a reader had read the file just before the eviction unlinked it.
        try bytes.write(to: URL(fileURLWithPath: file))
        #expect(s.get(.prefix, key: key(3)) == [3, 3])
        #expect(s.stats.entries == 0 && s.stats.bytes == 0 && s.list().isEmpty)
    }

    @Test func evictionOrderOverManyEntries() throws {
        let entry = CacheStore.headerSize + 10
        let s = try CacheStore(directory: tempDir(), budget: 100 * entry, identity: identity)
        for k in 0..<150 { #expect(put(s, .chunk, key(UInt8(k)), [UInt8](repeating: 1, count: 10))) }
        // The 50 oldest went; a hit moves an entry to the front of the order.
        #expect(s.stats.entries == 100 && s.stats.evictions == 50)
        #expect(s.get(.chunk, key: key(49)) == nil && s.get(.chunk, key: key(50)) != nil)
        #expect(put(s, .chunk, key(200), [UInt8](repeating: 1, count: 10)))
        #expect(s.get(.chunk, key: key(50)) != nil && s.get(.chunk, key: key(51)) == nil)
        #expect(s.list(limit: 2).map(\.key) == [CacheStore.hex(key(50)), CacheStore.hex(key(200))])
    }

    @Test func evictByKey() throws {
        let s = try CacheStore(directory: tempDir(), budget: 1 << 20, identity: identity)
        #expect(put(s, .chunk, key(1), [1]))
        #expect(put(s, .prefix, key(2), [2]))
        #expect(s.list().count == 2)
        #expect(s.evict(keys: [CacheStore.hex(key(2)), "nonsense"]) == 1)
        #expect(s.list().map(\.level) == [.chunk])
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
