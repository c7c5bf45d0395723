import CVistKernels
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
/// File layout (little-endian, 128-byte header, then the payload):
///
///     0   8  magic "V2CACHE\0"
///     8   4  format version (1)
///     12  4  level (1 chunk, 2 prefix)
///     16 32  model fingerprint (sha256)
///     48 32  render config hash (sha256)
///     80 32  key (sha256)
///     112 8  payload length in bytes
///     120 4  CRC-32C of the payload
///     124 4  CRC-32C of bytes 0..<124
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

    public struct Entry: Sendable, Equatable {
        public var level: Level
        public var key: String  // hex
        public var bytes: Int
        public var lastUsed: Date
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
    public static let formatVersion: UInt32 = 1
    public static let headerSize = 128

    public let directory: URL
    public let budget: Int
    public let identity: Identity
    /// Largest entry file read or written (header included); a larger file is damaged.
    public let maxEntryBytes: Int
    let log: @Sendable (String) -> Void
    let lock = NSLock()
    var index = Recency()  // by "level/keyhex"
    var counters = Stats()
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
                let e = Entry(
                    level: level, key: key, bytes: Int(st.st_size),
                    lastUsed: Date(timeIntervalSince1970: Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9))
                found.append(("\(level.name)/\(key)", e))
                totalBytes += e.bytes
            }
        }
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

    func path(_ level: Level, _ key: String) -> String {
        directory.appendingPathComponent(level.name).appendingPathComponent(key + ".v2c").path
    }

    public static func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }

    /// The payload stored under `key`, or nil (a miss: absent, damaged or foreign).
    public func get(_ level: Level, key: [UInt8]) -> [UInt8]? { get(level, key: key) { Array($0) } }

    /// `decode` applied to the payload stored under `key` (read straight from the file's bytes,
    /// without copying the payload first), or nil on a miss.
    public func get<T>(_ level: Level, key: [UInt8], decode: (UnsafeRawBufferPointer) -> T) -> T? {
        let k = Self.hex(key)
        let p = path(level, k)
        let id = "\(level.name)/\(k)"
        guard isOpen, let data = readFile(p) else {
            lock.lock()
            counters.misses += 1
            if let e = index.remove(id) { totalBytes -= e.bytes }
            lock.unlock()
            return nil
        }
        switch validate(data, level: level, key: key) {
        case .success(let payloadRange):
            lock.lock()
            counters.hits += 1
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
            counters.misses += 1
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

    func validate(_ d: [UInt8], level: Level, key: [UInt8]) -> Result<Range<Int>, Invalid> {
        let h = Self.headerSize
        guard d.count >= h else { return .failure(.problem("truncated header (\(d.count) bytes)")) }
        guard Array(d[0..<8]) == Self.magic else { return .failure(.problem("bad magic")) }
        let headerCRC = Self.u32(d, 124)
        guard d.withUnsafeBytes({ vk_crc32c(0, $0.baseAddress!, 124) }) == headerCRC else {
            return .failure(.problem("header checksum mismatch"))
        }
        guard Self.u32(d, 8) == Self.formatVersion else { return .failure(.problem("format version \(Self.u32(d, 8))")) }
        guard Self.u32(d, 12) == level.rawValue else { return .failure(.problem("level \(Self.u32(d, 12))")) }
        guard Array(d[16..<48]) == identity.fingerprint else { return .failure(.problem("made by another model")) }
        guard Array(d[48..<80]) == identity.renderConfig else { return .failure(.problem("made with another render config")) }
        guard Array(d[80..<112]) == key else { return .failure(.problem("key mismatch")) }
        let n = Self.u64(d, 112)
        guard n == UInt64(d.count - h) else { return .failure(.problem("payload is \(d.count - h) bytes, header says \(n)")) }
        let crc = d.withUnsafeBytes { vk_crc32c(0, $0.baseAddress! + h, d.count - h) }
        guard crc == Self.u32(d, 120) else { return .failure(.problem("payload checksum mismatch")) }
        return .success(h..<d.count)
    }

    /// Stores `payload` under `key` atomically, then evicts to the budget. Errors (a full disk,
    /// a read-only directory) are logged and counted; the cache is an accelerator, never a
    /// reason for a request to fail.
    @discardableResult
    public func put(_ level: Level, key: [UInt8], payload: UnsafeRawBufferPointer) -> Bool {
        let k = Self.hex(key)
        let total = Self.headerSize + payload.count
        if total > budget || total > maxEntryBytes || !isOpen { return false }
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        header.replaceSubrange(0..<8, with: Self.magic)
        Self.put32(&header, 8, Self.formatVersion)
        Self.put32(&header, 12, level.rawValue)
        header.replaceSubrange(16..<48, with: identity.fingerprint)
        header.replaceSubrange(48..<80, with: identity.renderConfig)
        header.replaceSubrange(80..<112, with: key)
        Self.put64(&header, 112, UInt64(payload.count))
        Self.put32(&header, 120, payload.count == 0 ? 0 : vk_crc32c(0, payload.baseAddress!, payload.count))
        Self.put32(&header, 124, header.withUnsafeBytes { vk_crc32c(0, $0.baseAddress!, 124) })
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
        index.touch(id, Entry(level: level, key: k, bytes: total, lastUsed: Date()))
        totalBytes += total
        counters.writes += 1
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

    /// Entries, most recently used first.
    public func list(limit: Int = .max) -> [Entry] {
        lock.lock()
        defer { lock.unlock() }
        return index.mostRecent(max(0, limit))
    }

    /// Removes the entries whose key (hex) is given; returns how many existed.
    public func evict(keys: [String]) -> Int {
        lock.lock()
        defer { lock.unlock() }
        var n = 0
        for k in keys {
            for level in Level.allCases {
                if let e = index.remove("\(level.name)/\(k.lowercased())") {
                    unlink(path(level, e.key))
                    totalBytes -= e.bytes
                    n += 1
                }
            }
        }
        return n
    }

    public func evictAll() -> Int {
        lock.lock()
        defer { lock.unlock() }
        let all = index.mostRecent(.max)
        for e in all { unlink(path(e.level, e.key)) }
        index = Recency()
        totalBytes = 0
        return all.count
    }

    public var stats: Stats {
        lock.lock()
        defer { lock.unlock() }
        var s = counters
        s.bytes = totalBytes
        s.budget = budget
        s.entries = index.count
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
        let n = st.st_size > maxEntryBytes ? Self.headerSize : Int(st.st_size)
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        let ok = out.withUnsafeMutableBytes { p -> Bool in
            while got < n {
                let r = read(fd, p.baseAddress! + got, n - got)
                if r < 0 && errno == EINTR { continue }
                guard r > 0 else { return false }
                got += r
            }
            return true
        }
        return ok ? out : Array(out[0..<got])
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
