import ArgumentParser
import Foundation
import VistEngine
import VistTokenizer

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the token ids of a text.")

    @OptionGroup var modelOptions: ModelOptions

    @OptionGroup var socketOption: SocketOption

    @Flag(help: "Tokenize in this process with --model instead of asking the daemon.")
    var local = false

    @Flag(help: "Parse the text of special tokens such as <|im_start|> as those tokens.")
    var parseSpecial = false

    @Flag(help: "Do not add BOS/EOS even if the model asks for them.")
    var noSpecial = false

    @Flag(help: "Print {\"ids\": [...]}.")
    var json = false

    @Argument(help: "The text.")
    var text: String

    func run() throws {
        if !local {
            let c = socketOption.connect(json: json)
            do {
                let ids = try c.tokenize(text, parseSpecial: parseSpecial, noSpecial: noSpecial)
                if json { printJSON(["ids": ids]) } else { print(ids.map(String.init).joined(separator: " ")) }
            } catch { fail("\(error)", code: daemonCode(error), json: json) }
            return
        }
        try runReportingErrors(json: json) {
            let tokenizer = try modelOptions.loadTokenizer()
            let ids = tokenizer.encode(text, addSpecial: !noSpecial, parseSpecial: parseSpecial)
            if json {
                printJSON(["ids": ids])
            } else {
                print(ids.map(String.init).joined(separator: " "))
            }
        }
    }
}
