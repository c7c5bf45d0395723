import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Who may talk to the daemon, checked against each connection's SO_PEERCRED. The socket's file
/// mode is the first fence; this is the second, so a socket made group- or world-accessible by
/// mistake still does not let strangers in.
public struct PeerPolicy: Sendable, Equatable {
    public var users: Set<UInt32>
    public var groups: Set<UInt32>

    public init(users: Set<UInt32>, groups: Set<UInt32>) {
        self.users = users
        self.groups = groups
    }

    /// The daemon's own user and root.
    public static var sameUser: PeerPolicy { PeerPolicy(users: [getuid(), 0], groups: []) }

    /// A peer is allowed if its uid is listed, or its gid or one of its supplementary groups is.
    /// `supplementary` are the groups the peer held when it connected (SO_PEERGROUPS), checked
    /// without asking the user database; only when the kernel could not give them (nil) are the
    /// user's groups looked up through NSS.
    public func allows(uid: UInt32, gid: UInt32, supplementary: [UInt32]? = nil) -> Bool {
        if users.contains(uid) || groups.contains(gid) { return true }
        guard !groups.isEmpty else { return false }
        return (supplementary ?? Self.groups(ofUID: uid, primary: gid)).contains { groups.contains($0) }
    }

    static func groups(ofUID uid: UInt32, primary: UInt32) -> [UInt32] {
        var pwd = passwd()
        var result: UnsafeMutablePointer<passwd>? = nil
        var buf = [CChar](repeating: 0, count: 16384)
        guard getpwuid_r(uid, &pwd, &buf, buf.count, &result) == 0, result != nil, let name = pwd.pw_name else { return [primary] }
        var n: Int32 = 64
        var list = [gid_t](repeating: 0, count: Int(n))
        if getgrouplist(name, primary, &list, &n) < 0 {
            list = [gid_t](repeating: 0, count: Int(n))
            guard getgrouplist(name, primary, &list, &n) >= 0 else { return [primary] }
        }
        return Array(list.prefix(Int(n)))
    }

    /// A user given by name or number.
    public static func uid(_ s: String) -> UInt32? {
        if let n = UInt32(s) { return n }
        guard let p = getpwnam(s) else { return nil }
        return p.pointee.pw_uid
    }

    /// A group given by name or number.
    public static func gid(_ s: String) -> UInt32? {
        if let n = UInt32(s) { return n }
        guard let g = getgrnam(s) else { return nil }
        return g.pointee.gr_gid
    }
}
