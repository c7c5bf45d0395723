// swift-tools-version: 6.1
// vist2 — a VIST2 context-compression engine, daemon and clients.
//
// Targets, with dependencies pointing one way (left depends on right):
//   vist2ctl -> VistEngine -> VistTokenizer -> VistFormats
//                          -> VistKernels -> CVistKernels, CBLAS
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
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2")
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
        .target(name: "VistKernels", dependencies: ["CBLAS", "CVistKernels"]),
        .target(name: "VistFormats", dependencies: ["VistKernels"]),
        .target(name: "VistTokenizer", dependencies: ["VistFormats"]),
        .target(name: "VistEngine", dependencies: ["VistKernels", "VistFormats", "VistTokenizer"]),
        .executableTarget(
            name: "vist2ctl",
            dependencies: [
                "VistEngine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "VistKernelsTests", dependencies: ["VistKernels"]),
        .testTarget(name: "VistFormatsTests", dependencies: ["VistFormats"]),
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
