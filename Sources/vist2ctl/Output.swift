import ArgumentParser
import Foundation
import VistBridge
import VistClient
import VistEngine
import VistRender

/// A failure of vist2ctl itself (an argument only a command can check, a file it cannot write),
/// reported like an engine or daemon error.
struct CLIError: Error {
    var code: String
    var message: String

    static func badArgument(_ message: String) -> CLIError { CLIError(code: "bad_argument", message: message) }
    static func io(_ message: String) -> CLIError { CLIError(code: "io", message: message) }
}

/// The stable code and the message of any error a command can meet: the engine's codes, the
/// protocol's error codes for a daemon's answer (lowercased), `daemon_unavailable` when there is
/// no daemon, and vist2ctl's own.
func describe(_ error: Error) -> (code: String, message: String) {
    switch error {
    case let e as CLIError: return (e.code, e.message)
    case let e as EngineError: return (e.code, e.description)
    case let e as RenderError: return ("io", "\(e)")
    case let e as VistClient.ClientError:
        switch e {
        case .server(let code, let message): return (errorCodeName(code), message)
        case .connect: return ("daemon_unavailable", e.description)
        case .closed: return ("connection_closed", e.description)
        case .protocolError: return ("protocol", e.description)
        case .io: return ("io", e.description)
        }
    default: return ("internal", "\(error)")
    }
}

/// Where a command's results go: one JSON object per result on stdout with `--json`, a line of
/// text otherwise. Progress and streamed text appear only without `--json`; every failure is one
/// line on stderr (a JSON error object with `--json`) and exit status 1.
struct Output {
    let json: Bool

    /// Runs a command's body; whatever it throws is reported here, and only here.
    func run(_ body: () throws -> Void) throws {
        do {
            try body()
        } catch let e as ExitCode {
            throw e
        } catch {
            let (code, message) = describe(error)
            Self.reportFailure(code: code, message: message, json: json)
            throw ExitCode(1)
        }
    }

    static func reportFailure(code: String, message: String, json: Bool) {
        if json {
            printJSON(JSONValue.object(["error": .object(["code": .string(code), "message": .string(message)])]), to: .standardError)
        } else {
            FileHandle.standardError.write(Data("vist2ctl: error [\(code)]: \(message)\n".utf8))
        }
    }

    /// A result: the value as JSON, or `text` as a line.
    func result<T: Encodable>(_ value: T, text: @autoclosure () -> String) {
        if json { printJSON(value) } else { print(text()) }
    }

    /// Text streamed as it is generated (not with --json, whose object carries it).
    func stream(_ piece: String) {
        if !json { FileHandle.standardOutput.write(Data(piece.utf8)) }
    }

    /// A progress line on stderr (not with --json).
    func progress(_ line: String) {
        if !json { FileHandle.standardError.write(Data(line.utf8)) }
    }
}

enum Stream { case standardOutput, standardError }

func printJSON<T: Encodable>(_ value: T, to stream: Stream = .standardOutput) {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    let data = (try? enc.encode(value)) ?? Data("{}".utf8)
    let h = stream == .standardOutput ? FileHandle.standardOutput : FileHandle.standardError
    h.write(data)
    h.write(Data("\n".utf8))
}

/// A value's JSON object fields, to add a field to an engine result (compress adds "file").
func jsonFields<T: Encodable>(_ value: T) -> [String: JSONValue] {
    guard let data = try? JSONEncoder().encode(value), case .object(let fields)? = try? JSONDecoder().decode(JSONValue.self, from: data)
    else { return [:] }
    return fields
}

/// A UTF-8 text file (a document, a prompt file), or the error that says why not.
func readText(_ path: String) throws(EngineError) -> String {
    guard let data = FileManager.default.contents(atPath: path) else { throw .io("cannot read \(path)") }
    guard let text = String(data: data, encoding: .utf8) else { throw .badArgument("\(path) is not valid UTF-8") }
    return text
}
