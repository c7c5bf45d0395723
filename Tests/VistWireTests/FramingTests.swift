import Testing
import VistTestSupport

@testable import VistWire

@Suite("Wire framing")
struct FramingTests {
    func payloads(_ rng: inout TestRNG) -> [[UInt8]] {
        (0..<40).map { i in
            let n = i % 7 == 0 ? 0 : Int(rng.next() % (i % 5 == 0 ? 70_000 : 300))
            return (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        }
    }

    @Test("Frames fed one byte at a time decode to the same payloads")
    func byteAtATime() throws {
        var rng = TestRNG(1)
        let ps = Array(payloads(&rng).prefix(12))
        let stream = try ps.flatMap { try Frame.encode($0) }
        var d = FrameDecoder()
        var out: [[UInt8]] = []
        for b in stream { out += try d.feed([b]) }
        #expect(out == ps)
        #expect(d.bufferedBytes == 0)
    }

    @Test("Frames fed in random splits decode to the same payloads", arguments: 1...20)
    func randomSplits(seed: UInt64) throws {
        var rng = TestRNG(seed)
        let ps = payloads(&rng)
        let stream = try ps.flatMap { try Frame.encode($0) }
        var d = FrameDecoder()
        var out: [[UInt8]] = []
        var i = 0
        while i < stream.count {
            let n = min(stream.count - i, Int(rng.next() % 9000))
            out += try d.feed(stream[i..<(i + n)])
            i += n
        }
        #expect(out == ps)
    }

    @Test("An oversized length is refused as soon as the header is complete, before any payload")
    func oversized() throws {
        var d = FrameDecoder(maxPayload: 1000)
        let header: [UInt8] = [0x56, 0x32, 1, 0, 0xff, 0xff, 0xff, 0xff]
        #expect(try d.feed(header.prefix(7)).isEmpty)
        #expect(throws: FrameError.tooLarge(length: 0xffff_ffff, max: 1000)) { _ = try d.feed(header.suffix(1)) }
        #expect(d.bufferedBytes == 0)
        // The decoder stays failed.
        #expect(throws: FrameError.self) { _ = try d.feed(try Frame.encode([1, 2, 3])) }
        // Exactly the limit is fine.
        var ok = FrameDecoder(maxPayload: 1000)
        #expect(try ok.feed(try Frame.encode([UInt8](repeating: 7, count: 1000), maxPayload: 1000)).count == 1)
        #expect(throws: FrameError.self) { _ = try Frame.encode([UInt8](repeating: 7, count: 1001), maxPayload: 1000) }
    }

    @Test("Garbage, other versions and reserved flags are refused at their first byte")
    func garbage() {
        var d = FrameDecoder()
        #expect(throws: FrameError.badMagic(0x47, 0)) { _ = try d.feed(Array("G".utf8)) }  // e.g. "GET / HTTP/1.1"
        d = FrameDecoder()
        #expect(throws: FrameError.badMagic(0x56, 0x33)) { _ = try d.feed([0x56, 0x33]) }
        d = FrameDecoder()
        #expect(throws: FrameError.unsupportedVersion(2)) { _ = try d.feed([0x56, 0x32, 2]) }
        d = FrameDecoder()
        #expect(throws: FrameError.reservedFlags(0x80)) { _ = try d.feed([0x56, 0x32, 1, 0x80]) }
        // Random bytes never crash the decoder and never produce a payload over the limit.
        var rng = TestRNG(99)
        for _ in 0..<2000 {
            var dec = FrameDecoder(maxPayload: 64)
            let n = Int(rng.next() % 40)
            var bytes = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 2 == 0 { bytes = [0x56, 0x32, 1, 0] + bytes }
            if let out = try? dec.feed(bytes) { #expect(out.allSatisfy { $0.count <= 64 }) }
        }
        #expect(FrameError.tooLarge(length: 5, max: 4).description.contains("exceeds the limit of 4"))
    }

    @Test("Truncated streams keep their partial frame buffered, and empty payloads are frames")
    func partial() throws {
        var d = FrameDecoder()
        let f = try Frame.encode([1, 2, 3, 4, 5])
        #expect(try d.feed(f.dropLast(2)).isEmpty)
        #expect(d.bufferedBytes == f.count - 2 - Frame.headerBytes || d.bufferedBytes == f.count - 2)
        #expect(try d.feed(f.suffix(2)) == [[1, 2, 3, 4, 5]])
        #expect(try d.feed(try Frame.encode([])) == [[]])
        #expect(try Frame.encode([9]) == [0x56, 0x32, 1, 0, 0, 0, 0, 1, 9])
    }

    @Test("A decoder is mid-frame from a frame's first byte until its last, even with the header parsed and no byte buffered")
    func midFrame() throws {
        var d = FrameDecoder()
        #expect(!d.isMidFrame)
        let f = try Frame.encode([1, 2, 3])
        _ = try d.feed(f.prefix(3))
        #expect(d.isMidFrame && d.bufferedBytes == 3)
        _ = try d.feed(f[3..<8])  // the whole header: parsed, nothing left in the buffer
        #expect(d.isMidFrame && d.bufferedBytes == 0)
        #expect(try d.feed(f.suffix(3)) == [[1, 2, 3]])
        #expect(!d.isMidFrame)
    }
}
