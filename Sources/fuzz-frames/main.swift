import Foundation
import VistFuzz

/// libFuzzer entry point (a build with --sanitize=fuzzer; see scripts/fuzz.sh).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    Harness.frames(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

#if !FUZZING
    /// A normal build replays inputs: `fuzz-frames FILE|DIR...`.
    @main struct Replay {
        static func main() {
            let args = Array(CommandLine.arguments.dropFirst())
            exit(Harness.replay(Harness.frames, arguments: args))
        }
    }
#endif
