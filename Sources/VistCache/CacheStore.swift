import CVistKernels
import Crypto
import Dispatch
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The daemon's persistent cache: one file per entry under `<directory>/chunk/` (aligner outputs
/// of one chunk, keyed by chunk text + render config + model) and `<directory>/prefix/` (the KV
/// entries of one visual block, keyed by a hash chained over the instruction and every chunk up
/// to it). The store only keeps bytes; what they mean is the engine's business.
///
/// Every entry belongs to an `Owner`: the uid of the client whose request stored it, and, for an
/// entry stored with the `shared` flag, the shared namespace. The engine's key is hashed together
/// with the namespace (`storageKey`), so one user's lookups can never hit, time or count another
/// user's private entries; only shared entries are common to everyone. Listing, eviction and
/// statistics go through a `Viewer`: a user sees their own entries and the shared ones, and
/// evicts their own (shared ones they stored included); root and the daemon's own user see and
/// evict all.
///
/// File layout (little-endian, 144-byte header, then the payload):
///
///     0   8  magic "V2CACHE\0"
///     8   4  format version (2)
///     12  4  level (1 chunk, 2 prefix)
///     16 32  model fingerprint (sha256)
///     48 32  render config hash (sha256)
///     80 32  storage key (`storageKey`: sha256 over the namespace and the engine's key)
///     112 4  owner uid (for a shared entry, the uid that stored it)
///     116 4  flags (bit 0: shared)
///     120 8  payload length in bytes
///     128 4  CRC-32C of the payload
///     132 8  reserved (zero)
///     140 4  CRC-32C of bytes 0..<140
///
/// Opening a store reads every entry's header (not its payload) to learn its owner; an entry whose
/// header is damaged or of another format version (version 1 had no owner) is removed then.
///
/// Writes are atomic (a temporary file in the same directory, fsync, rename, fsync of the
/// directory), so a crash leaves either the old state or the new entry, never half of one. A
/// read checks every header field and both checksums; anything wrong — truncation, flipped bits,
/// another model's or render config's entry, an unknown version — is a miss, logged once per
/// file and removed, never served. Recency is the file's modification time (touched on every
/// hit), so LRU order survives restarts; after each write the least recently used entries go
/// until the total is within the budget (a recency list in memory: no sorting per write).
///
/// One process per directory: the store holds an exclusive lock on `<directory>/lock` from
/// `init` to `close`, so a second daemon on the same cache refuses to start instead of deleting
/// the first one's temporary files and evicting its entries. Nothing under the directory is
/// followed through a symbolic link, and no read allocates more than `maxEntryBytes`.
public final class CacheStore: @unchecked Sendable {
    public enum OpenError: Error, CustomStringConvertible {
        /// Another process holds the directory's lock.
        case locked(String)
        case unusable(String)

        public var description: String {
            switch self {
            case .locked(let s), .unusable(let s): return s
            }
        }
    }

    public enum Level: UInt32, Sendable, CaseIterable {
        case chunk = 1
        case prefix = 2

        public var name: String { self == .chunk ? "chunk" : "prefix" }
        public init?(name: String) {
            switch name {
            case "chunk": self = .chunk
            case "prefix": self = .prefix
            default: return nil
            }
        }
    }

    /// What every entry of this store must carry in its header to be served.
    public struct Identity: Sendable, Equatable {
        public var fingerprint: [UInt8]
        public var renderConfig: [UInt8]
        public init(fingerprint: [UInt8], renderConfig: [UInt8]) {
            precondition(fingerprint.count == 32 && renderConfig.count == 32)
            self.fingerprint = fingerprint
            self.renderConfig = renderConfig
        }
    }

    /// Whose an entry is: a user's private entry, or a shared one (`uid` is then who stored it).
    public struct Owner: Sendable, Hashable {
        public var uid: UInt32
        public var shared: Bool
        public init(uid: UInt32, shared: Bool = false) {
            self.uid = uid
            self.shared = shared
        }
    }

    /// Who lists, evicts or reads statistics: a user sees their own and the shared entries;
    /// `seesAll` (root and the daemon's own user) sees and evicts every entry.
    public struct Viewer: Sendable, Hashable {
        public var uid: UInt32
        public var seesAll: Bool
        public init(uid: UInt32, seesAll: Bool) {
            self.uid = uid
            self.seesAll = seesAll
        }
        /// Everything: the daemon itself (metrics, status) and a store used by one process.
        public static let all = Viewer(uid: 0, seesAll: true)

        public func sees(_ e: Entry) -> Bool { seesAll || e.shared || e.owner == uid }
        public func mayEvict(_ e: Entry) -> Bool { seesAll || e.owner == uid }
    }

    public struct Entry: Sendable, Equatable {
        public var level: Level
        /// The storage key (hex): unique across owners.
        public var key: String
        public var bytes: Int
        public var lastUsed: Date
        public var owner: UInt32
        public var shared: Bool
    }

    public struct EvictResult: Sendable, Equatable {
        public var removed = 0
        /// Named entries that exist but belong to another user.
        public var refused = 0
        public init(removed: Int = 0, refused: Int = 0) {
            self.removed = removed
            self.refused = refused
        }
    }

    public struct Stats: Sendable, Equatable {
        public var bytes = 0
        public var budget = 0
        public var entries = 0
        public var hits = 0
        public var misses = 0
        public var evictions = 0
        public var rejectedDamaged = 0
        public var writes = 0
        public var writeErrors = 0
        public init() {}
    }

    public static let magic: [UInt8] = Array("V2CACHE\0".utf8)
    public static let formatVersion: UInt32 = 2
    public static let headerSize = 144
    static let headerCRCOffset = 140

    /// The key an entry of `owner` is stored under: sha256 over a domain string, the namespace
    /// ("shared", or the owner's uid) and the engine's key.
    public static func storageKey(_ key: [UInt8], _ owner: Owner) -> [UInt8] {
        var h = SHA256()
        h.update(data: Array("vist2 cache namespace\0\(owner.shared ? "shared" : "uid \(owner.uid)")\0".utf8))
        h.update(data: key)
        return Array(h.finalize())
    }

    public let directory: URL
    public let budget: Int
    public let identity: Identity
    /// Largest entry file read or written (header included); a larger file is damaged.
    public let maxEntryBytes: Int
    let log: @Sendable (String) -> Void
    let lock = NSLock()
    var index = Recency()  // by "level/keyhex"
    var counters = Stats()
    /// Hits, misses and writes per requesting uid (what `stats(for:)` shows a user).
    var perUser: [UInt32: Stats] = [:]
    var totalBytes = 0
    /// When a failed write was last logged (uptime ns).
    var lastWriteErrorLog: UInt64? = nil
    /// The directory lock's descriptor; -1 once closed (then every lookup misses and nothing is stored).
    var lockFD: Int32 = -1

    /// Opens (creating if needed, mode 0700) the store, takes its lock, and indexes what is
    /// there by name, size and modification time; entry contents are only checked when read.
    /// Leftover temporary files of an interrupted write are removed. Throws `.locked` when
    /// another process uses the directory.
    public init(
        directory: URL, budget: Int, identity: Identity, maxEntryBytes: Int = 256 << 20,
        log: @escaping @Sendable (String) -> Void = { _ in }
    ) throws {
        self.directory = directory
        self.budget = max(0, budget)
        self.identity = identity
        self.maxEntryBytes = max(Self.headerSize, maxEntryBytes)
        self.log = log
        let fm = FileManager.default
        try fm.createDirectory(at: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let lockPath = directory.appendingPathComponent("lock").path
        // Read-only: flock needs no write access, and a descriptor open for writing would keep
        // the filesystem from being remounted read-only under a running daemon.
        let fd = open(lockPath, O_RDONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw OpenError.unusable("cannot open \(lockPath): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            Glibc.close(fd)
            throw OpenError.locked("another process (a second vist2d?) is using the cache directory \(directory.path)")
        }
        lockFD = fd
        var found: [(String, Entry)] = []
        var dropped = 0
        for level in Level.allCases {
            let dir = directory.appendingPathComponent(level.name)
            try? fm.createDirectory(at: dir, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
            var st = stat()
            guard lstat(dir.path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
                Glibc.close(fd)
                lockFD = -1
                throw OpenError.unusable("\(dir.path) is not a directory (a symbolic link is not followed)")
            }
            for name in (try? fm.contentsOfDirectory(atPath: dir.path)) ?? [] {
                let path = dir.appendingPathComponent(name).path
                if name.hasPrefix(".tmp-") {
                    unlink(path)
                    continue
                }
                guard name.hasSuffix(".v2c"), name.count == 64 + 4 else { continue }
                guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                let key = String(name.dropLast(4))
                guard let owner = Self.readOwner(path, level: level, key: key) else {
                    unlink(path)
                    dropped += 1
                    continue
                }
                let e = Entry(
                    level: level, key: key, bytes: Int(st.st_size),
                    lastUsed: Date(timeIntervalSince1970: Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9),
                    owner: owner.uid, shared: owner.shared)
                found.append(("\(level.name)/\(key)", e))
                totalBytes += e.bytes
            }
        }
        if dropped > 0 { log("cache: removed \(dropped) entries whose header was damaged or of an older format") }
        // Oldest first, so the most recently used ends at the front of the recency list.
        for (id, e) in found.sorted(by: { $0.1.lastUsed < $1.1.lastUsed }) { index.touch(id, e) }
        lock.lock()
        evictToBudget(keeping: nil)
        lock.unlock()
    }

    deinit { close() }

    /// Releases the directory's lock (another process may then open it); afterwards every
    /// lookup misses and nothing is stored. The daemon closes its cache when it stops.
    public func close() {
        lock.lock()
        defer { lock.unlock() }
        guard lockFD >= 0 else { return }
        Glibc.close(lockFD)
        lockFD = -1
    }

    var isOpen: Bool {
        lock.lock()
        defer { lock.unlock() }
        return lockFD >= 0
    }

    /// The owner recorded in the header of the entry file at `path`, or nil if the header is not
    /// a valid one of this format, level and key (the payload is checked when it is read).
    static func readOwner(_ path: String, level: Level, key: String) -> Owner? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        let h = readUpTo(fd, headerSize)
        guard headerProblem(h, level: level) == nil, hex(Array(h[80..<112])) == key else { return nil }
        return Owner(uid: u32(h, 112), shared: u32(h, 116) & 1 != 0)
    }

    /// What is wrong with the format fields of the header at the start of `d` (size, magic,
    /// header checksum, version, level), or nil; the rest is the caller's to check.
    static func headerProblem(_ d: [UInt8], level: Level) -> String? {
        guard d.count >= headerSize else { return "truncated header (\(d.count) bytes)" }
        guard Array(d[0..<8]) == magic else { return "bad magic" }
        guard d.withUnsafeBytes({ vk_crc32c(0, $0.baseAddress!, headerCRCOffset) }) == u32(d, headerCRCOffset) else {
            return "header checksum mismatch"
        }
        guard u32(d, 8) == formatVersion else { return "format version \(u32(d, 8))" }
        guard u32(d, 12) == level.rawValue else { return "level \(u32(d, 12))" }
        return nil
    }

    func path(_ level: Level, _ key: String) -> String {
        directory.appendingPathComponent(level.name).appendingPathComponent(key + ".v2c").path
    }

    public static func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }

    /// The payload `owner` stored under the engine's `key`, or nil (a miss: absent, damaged or
    /// foreign). A shared owner finds the shared entries, whoever stored them.
    public func get(_ level: Level, key: [UInt8], owner: Owner) -> [UInt8]? { get(level, key: key, owner: owner) { Array($0) } }

    /// `decode` applied to the payload stored under `key` for `owner` (read straight from the
    /// file's bytes, without copying the payload first), or nil on a miss.
    public func get<T>(_ level: Level, key: [UInt8], owner: Owner, decode: (UnsafeRawBufferPointer) -> T) -> T? {
        let storage = Self.storageKey(key, owner)
        let k = Self.hex(storage)
        let p = path(level, k)
        let id = "\(level.name)/\(k)"
        guard isOpen, let data = readFile(p) else {
            lock.lock()
            count(owner.uid) { $0.misses += 1 }
            if let e = index.remove(id) { totalBytes -= e.bytes }
            lock.unlock()
            return nil
        }
        switch validate(data, level: level, key: storage, owner: owner) {
        case .success(let payloadRange):
            lock.lock()
            count(owner.uid) { $0.hits += 1 }
            // Only an entry still indexed is touched: one evicted while it was being read stays
            // evicted (its file is gone), instead of coming back as a ghost that counts bytes.
            if var e = index.entry(id) {
                e.lastUsed = Date()
                index.touch(id, e)
                var now = timespec()
                clock_gettime(CLOCK_REALTIME, &now)
                var times = [now, now]
                _ = utimensat(AT_FDCWD, p, &times, AT_SYMLINK_NOFOLLOW)
            }
            lock.unlock()
            return data.withUnsafeBytes { decode(UnsafeRawBufferPointer(rebasing: $0[payloadRange])) }
        case .failure(let why):
            log("cache: ignoring \(level.name) entry \(k): \(why) (removed; recomputed on demand)")
            unlink(p)
            lock.lock()
            count(owner.uid) { $0.misses += 1 }
            counters.rejectedDamaged += 1
            if let e = index.remove(id) { totalBytes -= e.bytes }
            lock.unlock()
            return nil
        }
    }

    enum Invalid: Error, CustomStringConvertible {
        case problem(String)
        var description: String {
            switch self {
            case .problem(let s): return s
            }
        }
    }

    /// With the lock held: counts in the store's totals and in `uid`'s own.
    func count(_ uid: UInt32, _ f: (inout Stats) -> Void) {
        f(&counters)
        f(&perUser[uid, default: Stats()])
    }

    func validate(_ d: [UInt8], level: Level, key: [UInt8], owner: Owner) -> Result<Range<Int>, Invalid> {
        let h = Self.headerSize
        if let problem = Self.headerProblem(d, level: level) { return .failure(.problem(problem)) }
        guard Array(d[16..<48]) == identity.fingerprint else { return .failure(.problem("made by another model")) }
        guard Array(d[48..<80]) == identity.renderConfig else { return .failure(.problem("made with another render config")) }
        guard Array(d[80..<112]) == key else { return .failure(.problem("key mismatch")) }
        let shared = Self.u32(d, 116) & 1 != 0
        guard shared == owner.shared, shared || Self.u32(d, 112) == owner.uid else { return .failure(.problem("owner mismatch")) }
        let n = Self.u64(d, 120)
        guard n == UInt64(d.count - h) else { return .failure(.problem("payload is \(d.count - h) bytes, header says \(n)")) }
        let crc = d.withUnsafeBytes { vk_crc32c(0, $0.baseAddress! + h, d.count - h) }
        guard crc == Self.u32(d, 128) else { return .failure(.problem("payload checksum mismatch")) }
        return .success(h..<d.count)
    }

    /// Stores `payload` under the engine's `key` for `owner` atomically, then evicts to the
    /// budget. Errors (a full disk, a read-only directory) are logged and counted; the cache is
    /// an accelerator, never a reason for a request to fail.
    @discardableResult
    public func put(_ level: Level, key: [UInt8], owner: Owner, payload: UnsafeRawBufferPointer) -> Bool {
        let storage = Self.storageKey(key, owner)
        let k = Self.hex(storage)
        let total = Self.headerSize + payload.count
        if total > budget || total > maxEntryBytes || !isOpen { return false }
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        header.replaceSubrange(0..<8, with: Self.magic)
        Self.put32(&header, 8, Self.formatVersion)
        Self.put32(&header, 12, level.rawValue)
        header.replaceSubrange(16..<48, with: identity.fingerprint)
        header.replaceSubrange(48..<80, with: identity.renderConfig)
        header.replaceSubrange(80..<112, with: storage)
        Self.put32(&header, 112, owner.uid)
        Self.put32(&header, 116, owner.shared ? 1 : 0)
        Self.put64(&header, 120, UInt64(payload.count))
        Self.put32(&header, 128, payload.count == 0 ? 0 : vk_crc32c(0, payload.baseAddress!, payload.count))
        Self.put32(&header, Self.headerCRCOffset, header.withUnsafeBytes { vk_crc32c(0, $0.baseAddress!, Self.headerCRCOffset) })
        let final = path(level, k)
        let dir = directory.appendingPathComponent(level.name).path
        let tmp = dir + "/.tmp-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        let ok: Bool = {
            let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else { return false }
            defer { Glibc.close(fd) }
            let wroteHeader = header.withUnsafeBytes { Self.writeAll(fd, $0) }
            guard wroteHeader, Self.writeAll(fd, payload), fsync(fd) == 0 else { return false }
            return true
        }()
        guard ok, rename(tmp, final) == 0 else {
            let err = String(cString: strerror(errno))
            unlink(tmp)
            // Logged at most every 10 minutes: a full or read-only disk would otherwise log every
            // chunk of every request (a nearly full one, where small entries still fit, would
            // flap). Every failure is counted (vist2_cache_write_errors_total).
            let now = DispatchTime.now().uptimeNanoseconds
            lock.lock()
            counters.writeErrors += 1
            let report = lastWriteErrorLog.map { now - $0 >= 600_000_000_000 } ?? true
            if report { lastWriteErrorLog = now }
            lock.unlock()
            if report {
                log(
                    "cache: cannot write \(level.name) entry \(k): \(err); requests are served without storing it (further failures are counted in vist2_cache_write_errors_total and logged at most every 10 minutes)"
                )
            }
            return false
        }
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            fsync(dfd)
            Glibc.close(dfd)
        }
        lock.lock()
        let id = "\(level.name)/\(k)"
        if let old = index.entry(id) { totalBytes -= old.bytes }
        index.touch(id, Entry(level: level, key: k, bytes: total, lastUsed: Date(), owner: owner.uid, shared: owner.shared))
        totalBytes += total
        count(owner.uid) { $0.writes += 1 }
        evictToBudget(keeping: id)
        lock.unlock()
        return true
    }

    /// With the lock held.
    func evictToBudget(keeping: String?) {
        while totalBytes > budget, let (id, e) = index.leastRecent(skipping: keeping) {
            unlink(path(e.level, e.key))
            index.remove(id)
            totalBytes -= e.bytes
            counters.evictions += 1
        }
    }

    /// The entries `viewer` sees, most recently used first.
    public func list(limit: Int = .max, for viewer: Viewer) -> [Entry] {
        lock.lock()
        defer { lock.unlock() }
        return index.mostRecent(max(0, limit), where: viewer.sees)
    }

    /// Removes the entries whose storage key (hex) is given and that `viewer` may evict; entries
    /// of another user are left alone and counted as refused.
    public func evict(keys: [String], by viewer: Viewer) -> EvictResult {
        lock.lock()
        defer { lock.unlock() }
        var r = EvictResult()
        for k in keys {
            for level in Level.allCases {
                let id = "\(level.name)/\(k.lowercased())"
                guard let e = index.entry(id) else { continue }
                guard viewer.mayEvict(e) else {
                    r.refused += 1
                    continue
                }
                index.remove(id)
                unlink(path(level, e.key))
                totalBytes -= e.bytes
                r.removed += 1
            }
        }
        return r
    }

    /// Removes every entry `viewer` may evict; returns how many.
    public func evictAll(by viewer: Viewer) -> Int {
        lock.lock()
        defer { lock.unlock() }
        let mine = index.mostRecent(.max, where: viewer.mayEvict)
        for e in mine {
            index.remove("\(e.level.name)/\(e.key)")
            unlink(path(e.level, e.key))
            totalBytes -= e.bytes
        }
        return mine.count
    }

    /// The whole store's figures (the daemon's status and metrics).
    public var stats: Stats { stats(for: .all) }

    /// What `viewer` may know: the bytes and number of the entries it sees, and its own hits,
    /// misses and writes; the budget, evictions, damaged entries and write errors are the
    /// store's. `Viewer.all` gets the whole store's figures.
    public func stats(for viewer: Viewer) -> Stats {
        lock.lock()
        defer { lock.unlock() }
        var s = counters
        s.budget = budget
        if viewer.seesAll {
            s.bytes = totalBytes
            s.entries = index.count
        } else {
            let own = perUser[viewer.uid] ?? Stats()
            (s.hits, s.misses, s.writes) = (own.hits, own.misses, own.writes)
            let seen = index.mostRecent(.max, where: viewer.sees)
            s.entries = seen.count
            s.bytes = seen.reduce(0) { $0 + $1.bytes }
        }
        return s
    }

    // MARK: bytes

    /// The bytes of a regular file (never through a symbolic link), or nil; a file larger than
    /// `maxEntryBytes` comes back as its header only, which then fails validation as damaged.
    func readFile(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        return Self.readUpTo(fd, st.st_size > maxEntryBytes ? Self.headerSize : Int(st.st_size))
    }

    /// Up to `n` bytes from `fd`: fewer if the file ends or a read fails first.
    static func readUpTo(_ fd: Int32, _ n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        out.withUnsafeMutableBytes { p in
            while got < n {
                let r = read(fd, p.baseAddress! + got, n - got)
                if r < 0 && errno == EINTR { continue }
                guard r > 0 else { return }
                got += r
            }
        }
        return got == n ? out : Array(out[0..<got])
    }

    static func writeAll(_ fd: Int32, _ b: UnsafeRawBufferPointer) -> Bool {
        var off = 0
        while off < b.count {
            let r = write(fd, b.baseAddress! + off, b.count - off)
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return false }
            off += r
        }
        return true
    }

    static func u32(_ d: [UInt8], _ o: Int) -> UInt32 {
        UInt32(d[o]) | UInt32(d[o + 1]) << 8 | UInt32(d[o + 2]) << 16 | UInt32(d[o + 3]) << 24
    }
    static func u64(_ d: [UInt8], _ o: Int) -> UInt64 { UInt64(u32(d, o)) | UInt64(u32(d, o + 4)) << 32 }
    static func put32(_ d: inout [UInt8], _ o: Int, _ v: UInt32) {
        for i in 0..<4 { d[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }
    static func put64(_ d: inout [UInt8], _ o: Int, _ v: UInt64) {
        for i in 0..<8 { d[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
    }
}
