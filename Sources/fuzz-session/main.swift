import Foundation
import VistFuzz

/// libFuzzer entry point (a build with --sanitize=fuzzer; see scripts/fuzz.sh).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    Harness.session(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

#if !FUZZING
    /// A normal build replays inputs: `fuzz-session FILE|DIR...`.
    @main struct Replay {
        static func main() {
            let args = Array(CommandLine.arguments.dropFirst())
            if args.first == "--write-seeds", args.count == 2 {
                do {
                    try Seeds.write(to: URL(fileURLWithPath: args[1]))
                    exit(0)
                } catch {
                    FileHandle.standardError.write(Data("\(error)\n".utf8))
                    exit(1)
                }
            }
            exit(Harness.replay(Harness.session, arguments: args))
        }
    }
#endif
