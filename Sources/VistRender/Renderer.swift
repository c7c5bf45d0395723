import CImageIO
import Foundation

/// An 8-bit grayscale image, row-major, 255 = white paper, 0 = full ink.
public struct GrayImage: Sendable, Equatable {
    public let width: Int
    public let height: Int
    public var pixels: [UInt8]

    public init(width: Int, height: Int, fill: UInt8 = 255) {
        self.width = width
        self.height = height
        pixels = [UInt8](repeating: fill, count: width * height)
    }

    public func writePNG(to path: String) throws(RenderError) {
        let rc = pixels.withUnsafeBufferPointer { vk_png_write_gray8(path, $0.baseAddress!, Int32(width), Int32(height)) }
        guard rc == 0 else { throw .io("cannot write PNG \(path) (\(rc == -1 ? "cannot open the file" : "libpng error"))") }
    }

    /// The same bytes `writePNG` writes, in memory (what the daemon's render request streams).
    public func pngData() throws(RenderError) -> [UInt8] {
        var out: UnsafeMutablePointer<UInt8>? = nil
        var len = 0
        let rc = pixels.withUnsafeBufferPointer { vk_png_encode_gray8($0.baseAddress!, Int32(width), Int32(height), &out, &len) }
        defer { free(out) }
        guard rc == 0, let out else { throw .io("cannot encode PNG (\(rc == -1 ? "out of memory" : "libpng error"))") }
        return Array(UnsafeBufferPointer(start: out, count: len))
    }

    /// An image decoded from PNG bytes (converted to 8-bit gray), for example the chunks the
    /// daemon's render request streams. Images of more than `maxPixels` pixels are refused before
    /// they are decoded.
    public init(png: [UInt8], maxPixels: Int = 1 << 24) throws(RenderError) {
        var out: UnsafeMutablePointer<UInt8>? = nil
        var w: Int32 = 0
        var h: Int32 = 0
        let rc = png.withUnsafeBufferPointer { vk_png_decode_gray8($0.baseAddress, $0.count, max(0, maxPixels), &out, &w, &h) }
        defer { free(out) }
        guard rc == 0, let out else {
            throw .io(
                rc == -3
                    ? "the PNG image is empty or larger than \(maxPixels) pixels" : rc == -1 ? "out of memory" : "not a readable PNG image")
        }
        width = Int(w)
        height = Int(h)
        pixels = Array(UnsafeBufferPointer(start: out, count: width * height))
    }

    /// Pixels as the vision encoder reads them: x / 255 * 2 - 1, in [-1, 1] (SigLIP's normalisation).
    public func normalized() -> [Float] { pixels.map { Float($0) / 127.5 - 1 } }

    /// Tiles images left to right, top to bottom, `columns` per row, with a 1-pixel gray border.
    public static func contactSheet(_ images: [GrayImage], columns: Int) -> GrayImage {
        guard let first = images.first else { return GrayImage(width: 1, height: 1) }
        let cols = max(1, min(columns, images.count)), rows = (images.count + cols - 1) / cols
        let cw = first.width + 2, ch = first.height + 2
        var sheet = GrayImage(width: cols * cw, height: rows * ch, fill: 128)
        for (i, img) in images.enumerated() {
            let ox = (i % cols) * cw + 1, oy = (i / cols) * ch + 1
            for y in 0..<min(img.height, first.height) {
                for x in 0..<min(img.width, first.width) { sheet.pixels[(oy + y) * sheet.width + ox + x] = img.pixels[y * img.width + x] }
            }
        }
        return sheet
    }
}

/// Renders text into sketch images as a `RenderConfig` says.
///
/// Layout: text flows through pages — the whole canvas, or with `tile` set, the canvas's tiles
/// left to right, top to bottom. On a page the pen starts at the top-left margin; each line's
/// baseline is `ascender` below the top of its row and rows are `lineHeight` apart; the row after
/// a page's last is the next page's first. `\n` starts a new row, `\t` advances to the next
/// multiple of `tabWidth` space advances, `\r` takes no space (CRLF renders like LF), and a
/// glyph that would cross the page's right margin wraps to the next row (indentation is kept
/// because spaces and tabs are laid out like any other character). Ink is clipped to its page.
/// Text that needs more rows than the canvas has does not fit; the chunker never asks for that.
public final class SketchRenderer: @unchecked Sendable {
    public let config: RenderConfig
    let font: Font

    /// `baseDirectory` resolves a relative font path (the model directory).
    public init(config: RenderConfig, baseDirectory: URL? = nil) throws(RenderError) {
        try config.validate()
        self.config = config
        let path =
            config.font.hasPrefix("/") || baseDirectory == nil ? config.font : baseDirectory!.appendingPathComponent(config.font).path
        let font = try Font(path: path, sha256: config.fontSHA256, pixelSize: config.pixelSize)
        self.font = font
        if let mark = config.newlineMark?.unicodeScalars.first {
            let g = font.glyph(mark.value)
            guard !g.missing else { throw .badConfig("render.newline_mark \"\(mark)\" is not in the font \(path)") }
            newlineGlyph = g
        } else {
            newlineGlyph = nil
        }
    }

    /// The glyph a newline is drawn with in a flowing layout (render.newline_mark).
    let newlineGlyph: Glyph?

    /// How much of a text fits on one canvas.
    public struct Fit: Sendable, Equatable {
        /// Leading Unicode scalars that fit (all of them when `complete`).
        public var scalars: Int
        /// Rows used.
        public var rows: Int
        /// Scalars among those that the font lacks (drawn as boxes).
        public var missing: Int
        public var complete: Bool
    }

    /// Lays out `text`, calling `place` for each scalar that fits and is drawn with its glyph,
    /// pen position (x on its page, row counted over all pages) and index among the text's
    /// scalars.
    @discardableResult
    func layout(_ scalars: some Collection<Unicode.Scalar>, place: (Glyph, Int, Int, Int) -> Void = { _, _, _, _ in }) -> Fit {
        let c = config
        let maxRows = c.rows
        let right = c.pageWidth - c.margin
        let tab = max(1, c.tabWidth * font.spaceAdvance)
        var x = c.margin, row = 0, placed = 0, missing = 0
        var used = 0  // rows that hold at least one glyph or newline start
        for s in scalars {
            let g: Glyph
            switch s {
            case "\n":
                guard let mark = newlineGlyph else {
                    // A newline always belongs to the text before it; it only moves the pen.
                    row += 1
                    x = c.margin
                    placed += 1
                    continue
                }
                // Flowing layout: drawn as its mark, like any character.
                g = mark
            case "\r":
                placed += 1
                continue
            case "\t":
                if row >= maxRows { return Fit(scalars: placed, rows: used, missing: missing, complete: false) }
                let next = c.margin + ((x - c.margin) / tab + 1) * tab
                x = min(next, right)
                used = max(used, row + 1)
                placed += 1
                continue
            default:
                g = font.glyph(s.value)
            }
            if x + g.advance > right && x > c.margin {
                row += 1
                x = c.margin
            }
            if row >= maxRows { return Fit(scalars: placed, rows: used, missing: missing, complete: false) }
            place(g, x, row, placed)
            if g.missing { missing += 1 }
            x += g.advance
            used = max(used, row + 1)
            placed += 1
        }
        return Fit(scalars: placed, rows: used, missing: missing, complete: true)
    }

    /// Measures how much of `text` fits on one canvas.
    public func fit(_ text: Substring) -> Fit { layout(text.unicodeScalars) }

    /// Renders text that fits (see `fit`); scalars past the canvas are not drawn.
    public func render(_ text: Substring) -> (image: GrayImage, fit: Fit) {
        let c = config
        var img = GrayImage(width: c.width, height: c.height)
        let f = layout(text.unicodeScalars) { g, x, row, _ in
            let (px0, py0, top) = box(row: row)
            let baseline = top + font.ascender
            let ox = px0 + x + g.left, oy = baseline - g.top
            for gy in 0..<g.rows {
                let py = oy + gy
                guard py >= py0, py < py0 + c.pageHeight else { continue }
                for gx in 0..<g.width {
                    let px = ox + gx
                    guard px >= px0, px < px0 + c.pageWidth else { continue }
                    let ink = g.coverage[gy * g.width + gx]
                    let i = py * c.width + px
                    img.pixels[i] = min(img.pixels[i], 255 - ink)
                }
            }
        }
        return (img, f)
    }

    public func render(_ text: String) -> (image: GrayImage, fit: Fit) { render(Substring(text)) }

    /// Where `row` lies on the canvas: the top-left pixel of its page and the top of the row.
    func box(row: Int) -> (pageX: Int, pageY: Int, top: Int) {
        let c = config, page = row / c.rowsPerPage
        let pageY = (page / c.pagesPerRow) * c.pageHeight
        return ((page % c.pagesPerRow) * c.pageWidth, pageY, pageY + c.margin + (row % c.rowsPerPage) * c.lineHeight)
    }

    /// Where a drawn scalar lands: its index among the text's Unicode scalars, its cell on the
    /// canvas — left edge `x` and width `advance` (the pen position and advance), top `y` and
    /// height line_height (its row's box) — and its row, counted over all pages. Tabs and
    /// carriage returns draw nothing and are not listed; newlines neither, except in a flowing
    /// layout, where their mark is drawn. For training targets that need to know which pixels
    /// show which character.
    public struct Placement: Sendable, Equatable {
        public var scalar: Int
        public var x: Int
        public var y: Int
        public var advance: Int
        public var row: Int
    }

    /// The placements of the scalars of `text` that fit, in order.
    public func placements(_ text: Substring) -> [Placement] {
        var out: [Placement] = []
        layout(text.unicodeScalars) { g, x, row, i in
            let b = box(row: row)
            out.append(Placement(scalar: i, x: b.pageX + x, y: b.top, advance: g.advance, row: row))
        }
        return out
    }
}
