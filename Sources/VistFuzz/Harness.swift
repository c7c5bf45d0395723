import Foundation
import SwiftProtobuf
import VistEngine
import VistProtocol
import VistServer
import VistWire

/// The fuzz harnesses behind the libFuzzer targets `fuzz-frames`, `fuzz-messages` and
/// `fuzz-session` (scripts/fuzz.sh builds them with `--sanitize=fuzzer --sanitize=address`).
/// Each takes arbitrary bytes and must neither crash nor trap; their seed inputs are written by
/// `Seeds` and kept in Tests/Fuzz/corpus/<target>/.
public enum Harness {
    /// Arbitrary bytes through the frame decoder, in splits chosen by the bytes themselves; a
    /// frame that decodes must re-encode to the same bytes.
    public static func frames(_ bytes: [UInt8]) {
        var d = FrameDecoder(maxPayload: 1 << 16)
        var out: [[UInt8]] = []
        var i = 0
        while i < bytes.count {
            let n = Int(bytes[i] % 17) + 1
            guard let p = try? d.feed(bytes[i..<min(bytes.count, i + n)]) else { break }
            out += p
            i += n
        }
        // Input that ends between frames is exactly the frames it held, re-encoded (a header
        // whose payload never came is mid-frame, not a frame).
        if d.failure == nil && !d.isMidFrame {
            let again = out.flatMap { (try? Frame.encode($0, maxPayload: 1 << 16)) ?? [] }
            precondition(again == bytes, "frames do not round-trip")
        }
    }

    /// Arbitrary bytes as a ClientMessage and a ServerMessage; what decodes re-encodes to bytes
    /// that decode and re-encode to the same bytes. (Compared as bytes, not as messages: a NaN
    /// float field, which the daemon refuses later, makes a message unequal to itself.)
    public static func messages(_ bytes: [UInt8]) {
        roundTrip(Vist2_V1_ClientMessage.self, bytes)
        roundTrip(Vist2_V1_ServerMessage.self, bytes)
    }

    static func roundTrip<M: SwiftProtobuf.Message>(_ type: M.Type, _ bytes: [UInt8]) {
        guard let m = try? M(serializedBytes: bytes) else { return }
        let again: [UInt8] = (try? m.serializedBytes()) ?? []
        let third: [UInt8]? = (try? M(serializedBytes: again)).flatMap { try? $0.serializedBytes() }
        precondition(third == again, "\(M.protoMessageName) does not round-trip")
    }

    /// A whole connection's protocol state fed arbitrary bytes (in splits chosen by the bytes)
    /// against the tiny test model, as a client would send them; then the client goes away and
    /// the engine finishes or cancels whatever the bytes asked for before the next input.
    public static func session(_ bytes: [UInt8]) {
        guard let context = shared else { return }
        let s = Session(context: context, send: { _ in }, close: {})
        var i = 0
        while i < bytes.count {
            let n = Int(bytes[i] % 61) + 1
            s.receive(Array(bytes[i..<min(bytes.count, i + n)]))
            i += n
        }
        s.disconnected()
        context.worker.cancelAll(owner: ObjectIdentifier(s))
        while !context.worker.isIdle { usleep(100) }
    }

    /// The tiny VIST2 model of the engine tests ($VIST2_FUZZ_MODEL, else found from the working
    /// directory), in a daemon context with small limits so that inputs stay fast.
    nonisolated(unsafe) static var shared: ServerContext? = {
        let env = ProcessInfo.processInfo.environment["VIST2_FUZZ_MODEL"]
        let path = env ?? FileManager.default.currentDirectoryPath + "/Tests/VistEngineTests/Fixtures/tiny-vist2"
        guard let model = try? VIST2Model(directory: URL(fileURLWithPath: path), threads: 1) else {
            FileHandle.standardError.write(Data("fuzz-session: cannot load the tiny model at \(path) (set VIST2_FUZZ_MODEL)\n".utf8))
            exit(2)
        }
        var limits = ServerLimits()
        limits.maxFrame = 1 << 16
        limits.maxTokens = 64
        limits.maxDocumentBytes = 8 << 10
        limits.queueCapacity = 4
        return ServerContext(model: .vist2(model), modelName: "tiny", limits: limits)
    }()

    /// Runs `harness` over every file named on the command line, or every file in the directories
    /// named there (a corpus): how a normal build of a fuzz target replays inputs.
    public static func replay(_ harness: ([UInt8]) -> Void, arguments: [String]) -> Int32 {
        var files: [String] = []
        for a in arguments {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: a, isDirectory: &isDir) else {
                FileHandle.standardError.write(Data("no such file or directory: \(a)\n".utf8))
                return 2
            }
            if isDir.boolValue {
                files += ((try? FileManager.default.contentsOfDirectory(atPath: a)) ?? []).sorted().map { a + "/" + $0 }
            } else {
                files.append(a)
            }
        }
        for f in files {
            guard let d = FileManager.default.contents(atPath: f) else { continue }
            harness(Array(d))
        }
        print("replayed \(files.count) inputs")
        return 0
    }
}
