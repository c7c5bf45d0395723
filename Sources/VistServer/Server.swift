import Foundation
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The Unix-socket server: one SwiftNIO event loop group, one `Session` per connection.
public final class UnixServer: @unchecked Sendable {
    public let context: ServerContext
    public let socketPath: String
    /// A listening socket passed by systemd (LISTEN_FDS); it is neither created nor unlinked here.
    public let inheritedFD: Int32?
    let group: MultiThreadedEventLoopGroup
    var channel: Channel?
    let stopped = Atomic<Bool>(false)
    /// The socket path's lock file, held while serving (-1: none).
    var lockFD: Int32 = -1

    public init(context: ServerContext, socketPath: String, inheritedFD: Int32? = nil, eventLoops: Int = 1) {
        self.context = context
        self.socketPath = socketPath
        self.inheritedFD = inheritedFD
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, eventLoops))
    }

    public enum StartError: Error, CustomStringConvertible {
        case inUse(String)
        case bind(String)

        public var description: String {
            switch self {
            case .inUse(let s), .bind(let s): return s
            }
        }
    }

    /// With an inherited socket: serves it as it is. Otherwise creates the directory 0700, takes
    /// the socket path's lock (`PATH.lock`; held by another daemon: an error), probes for a stale
    /// socket (a socket nobody answers on is removed; a live daemon is an error; anything that is
    /// not a socket is left alone and refused), binds, and restricts the socket to its owner (0600).
    public func start() throws {
        let ctx = context
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ConnectionHandler(context: ctx)) }
            }
        if let fd = inheritedFD {
            do {
                channel = try bootstrap.withBoundSocket(fd).wait()
            } catch {
                throw StartError.bind("cannot serve the socket passed by systemd (fd \(fd)): \(error)")
            }
            return
        }
        let dir = (socketPath as NSString).deletingLastPathComponent
        if !dir.isEmpty && !FileManager.default.fileExists(atPath: dir) {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        // One daemon per socket path: a lock file beside it, held for the daemon's life, so two
        // daemons starting at the same moment cannot both decide the socket is stale.
        let lockPath = socketPath + ".lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw StartError.bind("cannot open \(lockPath): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw StartError.inUse("another daemon holds \(lockPath) (it is serving or starting on \(socketPath))")
        }
        lockFD = fd
        do {
            try bindLocked(bootstrap)
        } catch {
            close(fd)
            lockFD = -1
            throw error
        }
    }

    /// `start` once the socket path's lock is held.
    private func bindLocked(_ bootstrap: ServerBootstrap) throws {
        // A stale socket (nobody answers on it) is removed; anything else at the path is left
        // alone and refused: a live daemon, or a file that is not a socket.
        var st = stat()
        if lstat(socketPath, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw StartError.bind("\(socketPath) exists and is not a socket; not removing it")
            }
            if Self.someoneListens(socketPath) { throw StartError.inUse("another daemon is listening on \(socketPath)") }
            unlink(socketPath)
        }
        do {
            channel = try bootstrap.bind(unixDomainSocketPath: socketPath).wait()
        } catch {
            throw StartError.bind("cannot listen on \(socketPath): \(error)")
        }
        // Owner only. Until this chmod the socket has the umask's mode, which under any usual
        // umask lacks the write bit for others that connect(2) needs; and the directory is 0700.
        chmod(socketPath, 0o600)
    }

    /// Stops accepting, lets the engine's queue drain for `limits.drainTimeout`, cancels what is
    /// left (every request still gets its final reply), closes the socket (and removes it,
    /// unless systemd owns it).
    public func stop() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        context.beginDraining()
        try? channel?.close().wait()
        switch context.worker.drain(deadline: context.limits.drainTimeout) {
        case 0: break
        case let n?: context.log("drain: cancelled \(n) requests still running or queued after \(context.limits.drainTimeout)")
        case nil: context.log("drain: a request did not stop after being cancelled; exiting without it")
        }
        try? group.syncShutdownGracefully()
        // Nothing writes to the cache any more: let another daemon open it.
        context.cache?.close()
        if inheritedFD == nil && lockFD >= 0 { unlink(socketPath) }
        if lockFD >= 0 {
            close(lockFD)
            lockFD = -1
        }
    }

    static func someoneListens(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }
}

/// Glue between a NIO channel and a `Session`: checks the peer's credentials, and bounds the
/// replies waiting for a client that does not read them.
final class ConnectionHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let context: ServerContext
    var session: Session?
    var counted = false
    var timer: RepeatedTask?

    init(context: ServerContext) { self.context = context }

    func channelActive(context ctx: ChannelHandlerContext) {
        let channel = ctx.channel
        let pending = Atomic<Int>(0)
        let limits = context.limits
        let shared = context
        let log = context.log
        let s = Session(
            context: context,
            send: { bytes in
                // Each queued reply costs its bytes plus the buffer, closure and promise that
                // carry it to the event loop: count that too, so a flood of tiny replies is
                // bounded in memory, not only in bytes.
                let cost = bytes.count + ServerLimits.pendingReplyOverhead
                let mine = pending.add(cost, ordering: .relaxed).newValue
                let all = shared.pendingOutput.add(cost, ordering: .relaxed).newValue
                // The peer stopped reading: drop it rather than buffer without bound. Past the
                // daemon-wide bound, the connections holding more than their share go first.
                let over = mine > limits.maxPendingOutput || (all > limits.maxTotalPendingOutput && mine > limits.pendingOutputShare)
                if over {
                    pending.subtract(cost, ordering: .relaxed)
                    shared.pendingOutput.subtract(cost, ordering: .relaxed)
                    if mine - cost <= limits.maxPendingOutput {
                        log("closing a connection that left \(mine) bytes of replies unread (\(all) over all connections)")
                    }
                    channel.eventLoop.execute { channel.close(promise: nil) }
                    return
                }
                channel.eventLoop.execute {
                    var buf = channel.allocator.buffer(capacity: bytes.count)
                    buf.writeBytes(bytes)
                    let p = channel.eventLoop.makePromise(of: Void.self)
                    p.futureResult.whenComplete { _ in
                        pending.subtract(cost, ordering: .relaxed)
                        shared.pendingOutput.subtract(cost, ordering: .relaxed)
                    }
                    channel.writeAndFlush(buf, promise: p)
                }
            },
            close: { channel.eventLoop.execute { channel.close(promise: nil) } })
        session = s
        context.metrics.with { $0.connections += 1 }
        guard context.admitConnection() else {
            context.metrics.with { $0.connectionsRefused += 1 }
            log("refused a connection: \(limits.maxConnections) are open")
            s.refuse(.busy, "the daemon serves at most \(limits.maxConnections) connections at once; retry later")
            ctx.fireChannelActive()
            return
        }
        counted = true
        // The connection's timeouts (handshake, frame, idle), checked on its own event loop.
        let tick = TimeAmount.nanoseconds(Int64(limits.timerTick.asSeconds * 1e9))
        timer = channel.eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in s.checkTimeouts() }
        if let cred = Self.peerCredentials(channel) {
            s.peerUID = cred.uid
            if !context.peers.allows(uid: cred.uid, gid: cred.gid, supplementary: Self.peerGroups(channel)) {
                context.metrics.with { $0.peersRejected += 1 }
                log("refused a client: uid \(cred.uid) gid \(cred.gid) pid \(cred.pid) is not an allowed user or group")
                s.deny("uid \(cred.uid) is not allowed to use this daemon (see vist2d --allow-user / --allow-group)")
            }
        } else {
            log("refused a client whose credentials could not be read")
            s.deny("peer credentials unavailable")
        }
        ctx.fireChannelActive()
    }

    /// Linux's `struct ucred` (glibc only declares it under _GNU_SOURCE).
    struct PeerCred {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    /// Room for 128 supplementary groups (Linux's SO_PEERGROUPS fills a gid_t array; NIO
    /// zero-fills the buffer first).
    struct PeerGroups {
        var low = SIMD64<UInt32>()
        var high = SIMD64<UInt32>()
    }

    /// The supplementary groups the peer had when it connected (SO_PEERGROUPS, Linux 4.13+), or
    /// nil when the kernel cannot say (older kernels; more than 128 groups). Zero entries are the
    /// unfilled rest of the buffer: group 0 counts only as a peer's primary group.
    static func peerGroups(_ channel: Channel) -> [UInt32]? {
        #if os(Linux)
            guard let p = channel as? SocketOptionProvider else { return nil }
            let f: EventLoopFuture<PeerGroups> = p.unsafeGetSocketOption(
                level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET), name: NIOBSDSocket.Option(rawValue: Self.soPeerGroups))
            final class Box: @unchecked Sendable { var value: PeerGroups? = nil }
            let box = Box()
            f.whenSuccess { box.value = $0 }
            guard let g = box.value else { return nil }
            return (0..<64).flatMap { [g.low[$0], g.high[$0]] }.filter { $0 != 0 }
        #else
            return nil
        #endif
    }

    /// SO_PEERGROUPS from <asm-generic/socket.h> (Glibc does not export it to Swift).
    static let soPeerGroups: Int32 = 59

    static func peerCredentials(_ channel: Channel) -> PeerCred? {
        guard let p = channel as? SocketOptionProvider else { return nil }
        let f: EventLoopFuture<PeerCred> = p.unsafeGetSocketOption(
            level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET), name: NIOBSDSocket.Option(rawValue: SO_PEERCRED))
        // channelActive runs on the channel's loop, where the future is already complete.
        final class Box: @unchecked Sendable { var value: PeerCred? = nil }
        let box = Box()
        f.whenSuccess { box.value = $0 }
        return box.value
    }

    func channelRead(context ctx: ChannelHandlerContext, data: NIOAny) {
        var buf = unwrapInboundIn(data)
        if let bytes = buf.readBytes(length: buf.readableBytes) { session?.receive(bytes) }
    }

    func channelInactive(context ctx: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        session?.disconnected()
        if let s = session { context.worker.cancelAll(owner: ObjectIdentifier(s)) }
        if counted {
            context.adjust(clients: -1)
            counted = false
        }
        ctx.fireChannelInactive()
    }

    func errorCaught(context ctx: ChannelHandlerContext, error: Error) {
        ctx.close(promise: nil)
    }
}
