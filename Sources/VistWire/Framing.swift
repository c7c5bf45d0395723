/// The vist2 frame: an 8-byte header, then one protobuf message (see Protocols/PROTOCOL.md).
///
///     0        1        2        3        4                                   8
///     +--------+--------+--------+--------+--------+--------+--------+--------+----------
///     |  0x56  |  0x32  | version| flags  |     payload length (u32, big-endian)     | payload
///     |  'V'   |  '2'   |   1    |   0    |                                   |
///     +--------+--------+--------+--------+--------+--------+--------+--------+----------
///
/// The length is checked against the receiver's maximum as soon as the header is complete,
/// before anything is allocated for the payload. Pure value types, no I/O: the daemon and the
/// clients feed bytes in and get payloads out, so this is tested on byte arrays.
public enum Frame {
    public static let magic0: UInt8 = 0x56  // 'V'
    public static let magic1: UInt8 = 0x32  // '2'
    public static let version: UInt8 = 1
    public static let headerBytes = 8
    /// The default maximum payload (4 MiB); daemons and clients may configure their own.
    public static let defaultMaxPayload = 4 << 20
    /// No configuration may raise the maximum above this (the length field is u32 anyway).
    public static let hardMaxPayload = 256 << 20

    /// Header + payload.
    public static func encode(_ payload: [UInt8], maxPayload: Int = defaultMaxPayload) throws(FrameError) -> [UInt8] {
        guard payload.count <= min(maxPayload, hardMaxPayload) else {
            throw FrameError.tooLarge(length: UInt64(payload.count), max: min(maxPayload, hardMaxPayload))
        }
        var out: [UInt8] = [magic0, magic1, version, 0]
        out.reserveCapacity(headerBytes + payload.count)
        let n = UInt32(payload.count)
        out.append(contentsOf: [UInt8(n >> 24), UInt8((n >> 16) & 0xff), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)])
        out.append(contentsOf: payload)
        return out
    }
}

/// Why a byte stream is not a valid sequence of frames. Each is final for the connection.
public enum FrameError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The first bytes of a header are not "V2": not a vist2 peer (or a desynchronised stream).
    case badMagic(UInt8, UInt8)
    case unsupportedVersion(UInt8)
    /// Flags are reserved and must be zero in version 1.
    case reservedFlags(UInt8)
    case tooLarge(length: UInt64, max: Int)

    public var description: String {
        switch self {
        case .badMagic(let a, let b):
            return "not a vist2 frame (header starts with 0x\(String(a, radix: 16)) 0x\(String(b, radix: 16)), expected 'V2')"
        case .unsupportedVersion(let v): return "unsupported frame version \(v) (this side speaks \(Frame.version))"
        case .reservedFlags(let f): return "reserved frame flags 0x\(String(f, radix: 16)) are set"
        case .tooLarge(let n, let max): return "frame payload of \(n) bytes exceeds the limit of \(max)"
        }
    }
}

/// Incremental frame decoder: feed it bytes as they arrive, in any split, and take out whole
/// payloads. After an error it stays failed: the connection must be closed.
public struct FrameDecoder: Sendable {
    public let maxPayload: Int
    private var buffer: [UInt8] = []
    private var start = 0  // bytes of `buffer` already consumed
    private var pendingLength: Int? = nil  // payload length once a header has been read
    public private(set) var failure: FrameError? = nil

    public init(maxPayload: Int = Frame.defaultMaxPayload) {
        self.maxPayload = max(0, min(maxPayload, Frame.hardMaxPayload))
    }

    /// Bytes received but not yet returned as payloads (a header already parsed is not counted).
    public var bufferedBytes: Int { buffer.count - start }

    /// Part of a frame has arrived (some header bytes, or a header whose payload is incomplete).
    public var isMidFrame: Bool { pendingLength != nil || bufferedBytes > 0 }

    /// Adds bytes and returns every payload they complete, in order.
    public mutating func feed<C: Collection>(_ bytes: C) throws(FrameError) -> [[UInt8]] where C.Element == UInt8 {
        if let failure { throw failure }
        buffer.append(contentsOf: bytes)
        var out: [[UInt8]] = []
        do {
            while let p = try next() { out.append(p) }
        } catch {
            failure = error
            buffer = []
            start = 0
            throw error
        }
        // Drop consumed bytes once they dominate, so a long-lived connection stays small.
        if start > 0 && start * 2 >= buffer.count {
            buffer.removeFirst(start)
            start = 0
        }
        return out
    }

    private mutating func next() throws(FrameError) -> [UInt8]? {
        if pendingLength == nil {
            let avail = buffer.count - start
            // Check the magic as soon as its bytes arrive, so garbage is refused at once.
            if avail >= 1 && buffer[start] != Frame.magic0 { throw .badMagic(buffer[start], avail >= 2 ? buffer[start + 1] : 0) }
            if avail >= 2 && buffer[start + 1] != Frame.magic1 { throw .badMagic(buffer[start], buffer[start + 1]) }
            if avail >= 3 && buffer[start + 2] != Frame.version { throw .unsupportedVersion(buffer[start + 2]) }
            if avail >= 4 && buffer[start + 3] != 0 { throw .reservedFlags(buffer[start + 3]) }
            guard avail >= Frame.headerBytes else { return nil }
            let b = buffer[(start + 4)..<(start + 8)].map(UInt64.init)
            let n = b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3]
            guard n <= UInt64(maxPayload) else { throw .tooLarge(length: n, max: maxPayload) }
            pendingLength = Int(n)
            start += Frame.headerBytes
        }
        let n = pendingLength!
        guard buffer.count - start >= n else {
            // The length is within the limit, so reserving it is bounded too.
            buffer.reserveCapacity(start + n)
            return nil
        }
        let payload = Array(buffer[start..<(start + n)])
        start += n
        pendingLength = nil
        return payload
    }
}
