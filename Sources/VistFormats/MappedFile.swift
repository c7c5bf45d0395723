import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// A read-only memory map of a whole file. Pages are loaded on demand and shared with the page
/// cache, so a mapped model costs resident memory only for what is read.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let base: UnsafeRawPointer
    public let size: Int

    public init(path: String) throws(FormatError) {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw FormatError(file: path, problem: .io("cannot open: \(String(cString: strerror(errno)))"))
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw FormatError(file: path, problem: .io("cannot stat: \(String(cString: strerror(errno)))"))
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw FormatError(file: path, problem: .io("not a regular file"))
        }
        size = Int(st.st_size)
        guard size > 0 else { throw FormatError(file: path, problem: .truncated("the file is empty")) }
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw FormatError(file: path, problem: .io("cannot map: \(String(cString: strerror(errno)))"))
        }
        base = UnsafeRawPointer(p)
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), size) }
}

/// A format error names the file, the tensor or field at fault when there is one, and the problem.
public struct FormatError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Problem: Equatable, Sendable {
        case io(String)
        case truncated(String)
        case badMagic(String)
        case unsupportedVersion(UInt32)
        case unsupportedType(String)
        case invalid(String)
        case missing(String)
    }

    public var file: String
    public var tensor: String?
    public var problem: Problem

    public init(file: String, tensor: String? = nil, problem: Problem) {
        self.file = file
        self.tensor = tensor
        self.problem = problem
    }

    /// A stable short code for scripts and the wire protocol.
    public var code: String {
        switch problem {
        case .io: return "io"
        case .truncated: return "truncated"
        case .badMagic: return "bad_magic"
        case .unsupportedVersion: return "unsupported_version"
        case .unsupportedType: return "unsupported_type"
        case .invalid: return "invalid"
        case .missing: return "missing"
        }
    }

    public var description: String {
        let what: String
        switch problem {
        case .io(let s): what = s
        case .truncated(let s): what = "truncated: \(s)"
        case .badMagic(let s): what = s
        case .unsupportedVersion(let v): what = "unsupported format version \(v)"
        case .unsupportedType(let s): what = "unsupported type: \(s)"
        case .invalid(let s): what = s
        case .missing(let s): what = "missing \(s)"
        }
        if let tensor { return "\(file): tensor '\(tensor)': \(what)" }
        return "\(file): \(what)"
    }
}
