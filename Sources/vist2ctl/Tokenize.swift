import ArgumentParser
import Foundation

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the token ids of a text.")

    @OptionGroup var target: BackendOptions

    @Flag(help: "Parse the text of special tokens such as <|im_start|> as those tokens.")
    var parseSpecial = false

    @Flag(help: "Do not add BOS/EOS even if the model asks for them.")
    var noSpecial = false

    @Flag(help: "Print {\"ids\": [...]}.")
    var json = false

    @Argument(help: "The text.")
    var text: String

    func run() throws {
        let output = Output(json: json)
        try output.run {
            let ids = try target.backend().tokenize(text, parseSpecial: parseSpecial, noSpecial: noSpecial)
            output.result(["ids": ids], text: ids.map(String.init).joined(separator: " "))
        }
    }
}
