import CFreeType
import Crypto
import Foundation

/// One glyph rasterised at the configured pixel size: an 8-bit coverage bitmap and its metrics.
struct Glyph {
    var advance: Int  // pixels
    var left: Int  // bitmap offset from the pen position
    var top: Int  // bitmap top above the baseline
    var width: Int
    var rows: Int
    var coverage: [UInt8]  // rows x width, 0 = no ink, 255 = full
    var missing: Bool  // the font has no glyph for this scalar
}

/// A FreeType face at one pixel size, with a glyph cache. Rasterisation uses FreeType's
/// default hinting and 8-bit antialiasing (FT_RENDER_MODE_NORMAL), so the same FreeType build and
/// font file give the same bytes.
final class Font: @unchecked Sendable {
    private var library: FT_Library?
    private var face: FT_Face?
    private let fontData: Data
    private var cache: [UInt32: Glyph] = [:]
    private let lock = NSLock()
    let pixelSize: Int
    /// Ascender in pixels: the baseline of the first line sits this far below the margin.
    let ascender: Int
    /// Advance of the space glyph: the unit of tabs and of the replacement box.
    private(set) var spaceAdvance = 0

    init(path: String, sha256 expected: String, pixelSize: Int) throws(RenderError) {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw .font("cannot read the font file \(path)")
        }
        let digest = SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
        guard digest == expected.lowercased() else {
            throw .font(
                "\(path) has sha256 \(digest), but the model was trained with a font of sha256 \(expected); install that exact font file")
        }
        fontData = data
        self.pixelSize = pixelSize
        var lib: FT_Library?
        guard FT_Init_FreeType(&lib) == 0, let lib else { throw .font("FreeType failed to initialise") }
        library = lib
        var f: FT_Face?
        let err = fontData.withUnsafeBytes { raw in
            FT_New_Memory_Face(lib, raw.baseAddress!.assumingMemoryBound(to: FT_Byte.self), FT_Long(raw.count), 0, &f)
        }
        guard err == 0, let f else {
            FT_Done_FreeType(lib)
            throw .font("FreeType cannot open \(path) (error \(err))")
        }
        face = f
        guard FT_Set_Pixel_Sizes(f, 0, FT_UInt(pixelSize)) == 0 else {
            FT_Done_Face(f)
            FT_Done_FreeType(lib)
            throw .font("\(path) cannot be set to \(pixelSize) px")
        }
        ascender = Int((f.pointee.size.pointee.metrics.ascender + 63) >> 6)
        spaceAdvance = glyph(0x20).advance
    }

    deinit {
        if let face { FT_Done_Face(face) }
        if let library { FT_Done_FreeType(library) }
    }

    /// The glyph of a scalar; a scalar the font lacks gets a hollow box one space wide.
    func glyph(_ scalar: UInt32) -> Glyph {
        lock.lock()
        defer { lock.unlock() }
        if let g = cache[scalar] { return g }
        let g = rasterise(scalar)
        cache[scalar] = g
        return g
    }

    private func rasterise(_ scalar: UInt32) -> Glyph {
        guard let face else { return replacement() }
        let index = FT_Get_Char_Index(face, FT_ULong(scalar))
        guard index != 0, FT_Load_Glyph(face, index, FT_Int32(FT_LOAD_DEFAULT)) == 0,
            FT_Render_Glyph(face.pointee.glyph, FT_RENDER_MODE_NORMAL) == 0
        else { return replacement() }
        let slot = face.pointee.glyph.pointee
        let bm = slot.bitmap
        let w = Int(bm.width), rows = Int(bm.rows), pitch = Int(bm.pitch)
        var coverage = [UInt8](repeating: 0, count: w * rows)
        if let buf = bm.buffer, w > 0, rows > 0 {
            for y in 0..<rows {
                // A negative pitch means rows are stored bottom-up.
                let src = pitch >= 0 ? buf + y * pitch : buf + (rows - 1 - y) * (-pitch)
                for x in 0..<w { coverage[y * w + x] = src[x] }
            }
        }
        return Glyph(
            advance: Int((slot.advance.x + 32) >> 6), left: Int(slot.bitmap_left), top: Int(slot.bitmap_top),
            width: w, rows: rows, coverage: coverage, missing: false)
    }

    /// A hollow box: visible, one space advance wide, as tall as the ascender.
    private func replacement() -> Glyph {
        let adv = max(3, spaceAdvance > 0 ? spaceAdvance : pixelSize / 2)
        let w = max(2, adv - 1), h = max(3, ascender - 1)
        var cov = [UInt8](repeating: 0, count: w * h)
        for y in 0..<h {
            for x in 0..<w where y == 0 || y == h - 1 || x == 0 || x == w - 1 { cov[y * w + x] = 255 }
        }
        return Glyph(advance: adv, left: 0, top: h, width: w, rows: h, coverage: cov, missing: true)
    }
}
