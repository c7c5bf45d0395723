// swift-tools-version: 6.1
// vist2 — a VIST2 context-compression engine, daemon and clients.
//
// Targets, with dependencies pointing one way (left depends on right):
//   vist2ctl -> VistEngine -> VistTokenizer -> VistFormats
//                          -> VistKernels -> CVistKernels, CBLAS
//            -> VistRender -> CFreeType, CImageIO, Crypto
//   VistWire (framing) depends on nothing; the daemon and clients will sit on it.
// The engine imports nothing of the daemon, the CLI or the wire protocol.
import PackageDescription

let package = Package(
    name: "vist2",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vist2ctl", targets: ["vist2ctl"]),
        .library(name: "VistEngine", targets: ["VistEngine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // C shim over OpenBLAS's cblas.h (Debian: libopenblas-dev).
        .target(
            name: "CBLAS",
            linkerSettings: [.linkedLibrary("openblas")]
        ),
        // Hot SIMD loops (quantized dot products, dequantization, a spin/sleep thread pool),
        // with scalar fallbacks selected at run time, so one binary runs on any x86-64 or ARM CPU.
        .target(
            name: "CVistKernels",
            cSettings: [.unsafeFlags(["-O3", "-fno-math-errno"])],
            linkerSettings: [.linkedLibrary("pthread")]
        ),
        // FreeType (Debian: libfreetype-dev) for the sketch renderer.
        .systemLibrary(name: "CFreeType", pkgConfig: "freetype2", providers: [.apt(["libfreetype-dev"])]),
        // PNG writing through libpng (Debian: libpng-dev), with its setjmp error handling kept in C.
        .target(name: "CImageIO", linkerSettings: [.linkedLibrary("png")]),
        .target(name: "VistKernels", dependencies: ["CBLAS", "CVistKernels"]),
        // The wire framing (Protocols/PROTOCOL.md): bytes in, payloads out; no sockets.
        .target(name: "VistWire"),
        // The sketch renderer and content-defined chunker: text in, grayscale canvases out.
        .target(name: "VistRender", dependencies: ["CFreeType", "CImageIO", .product(name: "Crypto", package: "swift-crypto")]),
        .target(name: "VistFormats", dependencies: ["VistKernels"]),
        .target(name: "VistTokenizer", dependencies: ["VistFormats"]),
        .target(
            name: "VistEngine",
            dependencies: ["VistKernels", "VistFormats", "VistTokenizer", "VistRender", .product(name: "Crypto", package: "swift-crypto")]),
        .executableTarget(
            name: "vist2ctl",
            dependencies: [
                "VistEngine",
                "VistTokenizer",
                "VistRender",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "VistKernelsTests", dependencies: ["VistKernels"]),
        .testTarget(name: "VistFormatsTests", dependencies: ["VistFormats"]),
        .testTarget(name: "VistRenderTests", dependencies: ["VistRender"]),
        .testTarget(name: "VistWireTests", dependencies: ["VistWire"]),
        .testTarget(
            name: "VistTokenizerTests", dependencies: ["VistTokenizer", "VistEngine"],
            resources: [.copy("Fixtures")]),
        .testTarget(
            name: "VistEngineTests", dependencies: ["VistEngine"],
            resources: [.copy("Fixtures")]),
        // Runs the built vist2ctl binary as a user would (depending on it makes `swift test` build it).
        .testTarget(name: "CLITests", dependencies: ["vist2ctl", "VistEngine"]),
    ]
)
