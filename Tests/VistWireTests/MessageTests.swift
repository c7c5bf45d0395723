import SwiftProtobuf
import Testing

@testable import VistProtocol
@testable import VistWire

@Suite("Protocol messages through frames")
struct MessageTests {
    @Test("A request and its streamed replies survive encoding, framing and byte-wise decoding")
    func roundTrip() throws {
        var hello = Vist2_V1_ClientMessage()
        hello.requestID = 0
        hello.hello = .with {
            $0.protocolVersion = 1
            $0.clientName = "test"
        }
        var gen = Vist2_V1_ClientMessage()
        gen.requestID = 7
        gen.generate = .with {
            $0.documentIds = ["doc-1"]
            $0.instruction = "Summarize."
            $0.maxTokens = 64
            $0.sampling = .with { $0.temperature = 0.7 }
            $0.stop = ["\n\n"]
        }
        func bytes(_ m: some SwiftProtobuf.Message) throws -> [UInt8] { try m.serializedBytes() }
        let stream = try [hello, gen].flatMap { try Frame.encode(try bytes($0)) }
        var d = FrameDecoder()
        var payloads: [[UInt8]] = []
        for b in stream { payloads += try d.feed([b]) }
        let decoded = try payloads.map { try Vist2_V1_ClientMessage(serializedBytes: $0) }
        #expect(decoded == [hello, gen])
        #expect(decoded[1].generate.sampling.temperature == 0.7)

        var err = Vist2_V1_ServerMessage()
        err.requestID = 7
        err.final = true
        err.error = .with {
            $0.code = .busy
            $0.message = "the queue is full"
        }
        let framed = try Frame.encode(try bytes(err))
        let back = try Vist2_V1_ServerMessage(serializedBytes: Array(framed.dropFirst(Frame.headerBytes)))
        #expect(back.error.code == Vist2_V1_ErrorCode.busy && back.error.code.rawValue == 7 && back.final)
    }

    @Test("Unknown fields from a newer peer are kept and ignored; garbage is an error, not a crash")
    func compatibility() throws {
        var m = Vist2_V1_ClientMessage()
        m.requestID = 3
        m.status = Vist2_V1_StatusRequest()
        var bytes: [UInt8] = try m.serializedBytes()
        bytes += [0xF8, 0x07, 0x2A]  // field 127, varint 42: unknown to this version
        let parsed = try Vist2_V1_ClientMessage(serializedBytes: bytes)
        #expect(parsed.requestID == 3 && parsed.body == .status(Vist2_V1_StatusRequest()))
        let garbage: [UInt8] = [0xFF, 0xFF, 0xFF]
        #expect(throws: (any Error).self) { try Vist2_V1_ClientMessage(serializedBytes: garbage) }
    }
}
