import Foundation
import VistProtocol

/// OpenDocument, UpdateDocument, CloseDocument: the connection's documents and their byte
/// accounting (per document, per connection, per daemon).
enum DocumentHandlers {
    static func open(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .openDocument(let o) = body else { return }
        let limits = s.limits
        guard o.path.utf8.count <= limits.maxPathBytes else {
            return s.error(id, .badRequest, "path longer than \(limits.maxPathBytes) bytes")
        }
        let size = o.text.utf8.count
        s.lock.lock()
        let full = s.documents.count >= limits.maxDocuments
        s.lock.unlock()
        guard !full else { return s.error(id, .tooManyRequests, "at most \(limits.maxDocuments) documents open per connection") }
        guard takeBytes(s, id, size) else { return }
        s.lock.lock()
        var docID = ""
        repeat { docID = String(format: "d%016llx", UInt64.random(in: 0...UInt64.max)) } while s.documents[docID] != nil
        s.documents[docID] = Session.Document(path: o.path, text: o.text)
        s.lock.unlock()
        s.context.adjust(documents: 1)
        s.reply(id) { $0.document = s.info(docID) }
    }

    static func update(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .updateDocument(let u) = body else { return }
        s.lock.lock()
        let old = s.documents[u.documentID]
        s.lock.unlock()
        guard let old else { return s.error(id, .unknownDocument, "no document '\(u.documentID.prefix(64))' is open on this connection") }
        let oldSize = old.text.utf8.count, size = u.text.utf8.count
        guard takeBytes(s, id, size - oldSize, replacing: oldSize) else { return }
        s.lock.lock()
        s.documents[u.documentID] = Session.Document(path: old.path, text: u.text, chunking: old.chunking)
        s.lock.unlock()
        s.reply(id) { $0.document = s.info(u.documentID) }
    }

    static func close(_ s: Session, _ id: UInt64, _ body: Vist2_V1_ClientMessage.OneOf_Body) {
        guard case .closeDocument(let c) = body else { return }
        s.lock.lock()
        let removed = s.documents.removeValue(forKey: c.documentID)
        if let removed { s.documentBytes -= removed.text.utf8.count }
        s.lock.unlock()
        guard let removed else {
            return s.error(id, .unknownDocument, "no document '\(c.documentID.prefix(64))' is open on this connection")
        }
        s.context.adjust(documents: -1, bytes: -removed.text.utf8.count)
        s.reply(id) { $0.ack = Vist2_V1_Ack() }
    }

    /// Accounts `delta` more bytes of document text to the connection and the daemon, or
    /// replies DOCUMENT_TOO_LARGE (this document, or this connection's documents, over their
    /// limit) or BUSY (the daemon's documents over theirs) and returns false. `replacing`: the
    /// size of the text being replaced, for the per-document check.
    static func takeBytes(_ s: Session, _ id: UInt64, _ delta: Int, replacing: Int = 0) -> Bool {
        let limits = s.limits
        let size = replacing + delta
        guard size <= limits.maxDocumentBytes else {
            s.error(id, .documentTooLarge, "the document has \(size) bytes; at most \(limits.maxDocumentBytes) are accepted")
            return false
        }
        s.lock.lock()
        let mine = s.documentBytes
        s.lock.unlock()
        guard delta <= 0 || mine + delta <= limits.maxConnectionDocumentBytes else {
            s.error(
                id, .documentTooLarge,
                "this connection's documents would hold \(mine + delta) bytes; at most \(limits.maxConnectionDocumentBytes) are accepted (close some)"
            )
            return false
        }
        guard s.context.reserveDocumentBytes(delta) else {
            s.error(id, .busy, "the daemon holds its limit of \(limits.maxTotalDocumentBytes) bytes of open documents; retry later")
            return false
        }
        s.lock.lock()
        s.documentBytes += delta
        s.lock.unlock()
        return true
    }
}
