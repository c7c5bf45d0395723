import Foundation

/// Why a request line was refused before it reached the daemon: the code is one of the
/// protocol's (snake_case) or the bridge's own (`daemon_unavailable`).
struct BridgeError: Error {
    var code: String
    var message: String

    static func bad(_ m: String) -> BridgeError { BridgeError(code: "bad_request", message: m) }
}

/// One request line of the bridge protocol (docs/BRIDGE.md), read field by field so that a field
/// of the wrong type or out of range is named in the error. Fields an op does not use, and fields
/// the bridge does not know, are ignored.
struct BridgeRequest {
    let fields: [String: JSONValue]

    /// Parses one line; `id` is the request's id when the line is an object that has a usable one.
    static func parse(_ line: [UInt8]) -> (id: JSONValue, request: Result<BridgeRequest, BridgeError>) {
        let value: JSONValue
        do { value = try JSONDecoder().decode(JSONValue.self, from: Data(line)) } catch {
            return (.null, .failure(.bad("not valid JSON (one request object per line)")))
        }
        guard case .object(let o) = value else { return (.null, .failure(.bad("a request is a JSON object"))) }
        switch o["id"] {
        case .int?, .string?: return (o["id"]!, .success(BridgeRequest(fields: o)))
        case nil, .null?: return (.null, .failure(.bad("every request needs an 'id' (a number or a string)")))
        default: return (.null, .failure(.bad("'id' must be a number or a string")))
        }
    }

    var op: String? { if case .string(let s)? = fields["op"] { return s } else { return nil } }

    func string(_ key: String) throws -> String? {
        switch fields[key] {
        case nil, .null?: return nil
        case .string(let s)?: return s
        default: throw BridgeError.bad("'\(key)' must be a string")
        }
    }

    func bool(_ key: String) throws -> Bool? {
        switch fields[key] {
        case nil, .null?: return nil
        case .bool(let b)?: return b
        default: throw BridgeError.bad("'\(key)' must be true or false")
        }
    }

    func strings(_ key: String) throws -> [String]? {
        switch fields[key] {
        case nil, .null?: return nil
        case .array(let a)?:
            return try a.map {
                guard case .string(let s) = $0 else { throw BridgeError.bad("'\(key)' must be an array of strings") }
                return s
            }
        default: throw BridgeError.bad("'\(key)' must be an array of strings")
        }
    }

    /// A whole number in `range`.
    func integer(_ key: String, _ range: ClosedRange<Int64>) throws -> Int64? {
        switch fields[key] {
        case nil, .null?: return nil
        case .int(let i)? where range.contains(i): return i
        case .double(let d)? where d.rounded() == d && d >= Double(range.lowerBound) && d <= Double(range.upperBound): return Int64(d)
        default: throw BridgeError.bad("'\(key)' must be a whole number in \(range.lowerBound)...\(range.upperBound)")
        }
    }

    /// A finite number.
    func number(_ key: String) throws -> Float? {
        switch fields[key] {
        case nil, .null?: return nil
        case .int(let i)?: return Float(i)
        case .double(let d)? where d.isFinite && abs(d) <= Double(Float.greatestFiniteMagnitude): return Float(d)
        default: throw BridgeError.bad("'\(key)' must be a number")
        }
    }

    func uint32(_ key: String) throws -> UInt32? { try integer(key, 0...Int64(UInt32.max)).map { UInt32($0) } }
}
