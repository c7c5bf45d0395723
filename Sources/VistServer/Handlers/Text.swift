import Foundation
import VistEngine
import VistProtocol
import VistRender

/// Tokenize and Render: text work only, run on the text queue beside the engine (they hold a
/// place in the engine's queue while they run, so the queue bounds them and a drain waits for
/// them).
enum TextHandlers {
    static func tokenize(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .tokenize(let t) = body else { return }
        let tok = s.context.language.tokenizer
        guard let job = s.begin(id) else { return }
        s.textWork(id, job) { () throws(EngineError) in
            guard let ids = tok.encode(t.text, addSpecial: !t.noSpecial, parseSpecial: t.parseSpecial, step: { !job.isCancelled }) else {
                throw .cancelled
            }
            s.end(id, job, withdraw: true) { s.reply(id) { $0.tokenizeResult = .with { $0.ids = ids } } }
            return nil
        }
    }

    static func render(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .render(let r) = body else { return }
        guard let model = s.vist2 else {
            return s.error(id, .unsupported, "the loaded model (\(s.context.modelName)) has no renderer; render needs a VIST2 model")
        }
        guard let text = s.texts(id, [r.documentID]) else { return }
        let previous = s.chunking([r.documentID])
        guard let job = s.begin(id) else { return }
        s.textWork(id, job) { () throws(EngineError) in
            guard let chunking = model.chunker.chunking(text[0], reusing: previous, step: { !job.isCancelled }) else { throw .cancelled }
            s.keep(chunking, for: [r.documentID])
            let chunks = chunking.chunks
            for (i, c) in chunks.enumerated() {
                guard !job.isCancelled else { throw .cancelled }
                let encoded = Result { () throws(RenderError) in try model.renderer.render(c.text).image.pngData() }
                guard case .success(let png) = encoded else { throw .io("cannot encode chunk \(i) as PNG") }
                s.reply(id, final: false) {
                    $0.renderedChunk = .with {
                        $0.index = UInt32(i)
                        $0.png = Data(png)
                        $0.text = String(c.text)
                        $0.tokens = UInt32(c.tokens)
                        $0.missingGlyphs = UInt32(c.missing)
                        $0.rows = UInt32(c.rows)
                    }
                }
            }
            let totals = model.renderTotals(chunks)
            s.end(id, job, withdraw: true) {
                s.reply(id) {
                    $0.renderResult = .with {
                        $0.chunks = UInt32(chunks.count)
                        $0.textTokens = UInt32(totals.tokens)
                        $0.visualTokens = UInt32(totals.visualTokens)
                        $0.ratio = totals.ratio
                    }
                }
            }
            return nil
        }
    }
}
