import Foundation
import NIOCore
import NIOPosix

#if canImport(Glibc)
    import Glibc
#endif

/// The Unix-socket server: one SwiftNIO event loop group, one `Session` per connection.
public final class UnixServer: @unchecked Sendable {
    public let context: ServerContext
    public let socketPath: String
    let group: MultiThreadedEventLoopGroup
    var channel: Channel?

    public init(context: ServerContext, socketPath: String, eventLoops: Int = 1) {
        self.context = context
        self.socketPath = socketPath
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

    /// Probes for a stale socket (a file nobody answers on is removed; a live daemon is an error),
    /// creates the directory 0700, binds, and restricts the socket to its owner (0600).
    public func start() throws {
        let dir = (socketPath as NSString).deletingLastPathComponent
        if !dir.isEmpty && !FileManager.default.fileExists(atPath: dir) {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        if FileManager.default.fileExists(atPath: socketPath) {
            if Self.someoneListens(socketPath) { throw StartError.inUse("another daemon is listening on \(socketPath)") }
            unlink(socketPath)
        }
        let ctx = context
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ConnectionHandler(context: ctx)) }
            }
        do {
            channel = try bootstrap.bind(unixDomainSocketPath: socketPath).wait()
        } catch {
            throw StartError.bind("cannot listen on \(socketPath): \(error)")
        }
        chmod(socketPath, 0o600)
    }

    /// Stops accepting, drains the engine's queue, closes the socket.
    public func stop() {
        try? channel?.close().wait()
        context.worker.drain()
        try? group.syncShutdownGracefully()
        unlink(socketPath)
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

/// Glue between a NIO channel and a `Session`.
final class ConnectionHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let context: ServerContext
    var session: Session?

    init(context: ServerContext) { self.context = context }

    func channelActive(context ctx: ChannelHandlerContext) {
        let channel = ctx.channel
        session = Session(
            context: context,
            send: { bytes in
                channel.eventLoop.execute {
                    var buf = channel.allocator.buffer(capacity: bytes.count)
                    buf.writeBytes(bytes)
                    channel.writeAndFlush(buf, promise: nil)
                }
            },
            close: { channel.eventLoop.execute { channel.close(promise: nil) } })
        ctx.fireChannelActive()
    }

    func channelRead(context ctx: ChannelHandlerContext, data: NIOAny) {
        var buf = unwrapInboundIn(data)
        if let bytes = buf.readBytes(length: buf.readableBytes) { session?.receive(bytes) }
    }

    func channelInactive(context ctx: ChannelHandlerContext) {
        session?.disconnected()
        if let s = session { context.worker.cancelAll(owner: ObjectIdentifier(s)) }
        ctx.fireChannelInactive()
    }

    func errorCaught(context ctx: ChannelHandlerContext, error: Error) {
        ctx.close(promise: nil)
    }
}
