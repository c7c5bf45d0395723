import Foundation

/// How a chunk of text becomes its sketch image. This is configuration of the *model* (its
/// `config.json`, "render"): training and inference must render identically.
public struct RenderConfig: Codable, Sendable, Equatable {
    /// Font file: absolute, or relative to the model directory.
    public var font: String
    /// sha256 of the font file; a different file is refused.
    public var fontSHA256: String
    /// FreeType pixel size (the em square, in pixels).
    public var pixelSize: Int
    /// Distance between baselines, in pixels.
    public var lineHeight: Int
    /// Canvas width and height in pixels, multiples of 16 (the ViT patch size).
    public var width: Int
    public var height: Int
    /// Blank border on every side, in pixels.
    public var margin: Int
    /// Tab stops every `tabWidth` space advances.
    public var tabWidth: Int
    /// Tiled layout when set: the canvas is cut into `tile` x `tile` pixel squares, read left to
    /// right, top to bottom, and text flows through them like through small pages (each with
    /// `margin` on every side): a line that reaches a tile's right edge continues on the tile's
    /// next row, and the row after a tile's last continues in the next tile. With `tile` equal to
    /// the region one visual token sees (patch size x aligner merge), every visual token shows a
    /// contiguous run of the text in reading order. Unset (the default): one page, the canvas.
    public var tile: Int?
    /// Flowing layout when set: a newline does not start a row; it is drawn as this character
    /// (one Unicode scalar the font has, e.g. "↵") and the text runs on, so short and blank lines
    /// waste no canvas. Newlines stay visible and indentation stays as blank cells after the
    /// mark; rows still wrap at the right margin. Unset (the default): a newline starts a row.
    public var newlineMark: String?

    enum CodingKeys: String, CodingKey {
        case font
        case fontSHA256 = "font_sha256"
        case pixelSize = "pixel_size"
        case lineHeight = "line_height"
        case width, height, margin
        case tabWidth = "tab_width"
        case tile
        case newlineMark = "newline_mark"
    }

    public init(
        font: String, fontSHA256: String, pixelSize: Int, lineHeight: Int, width: Int, height: Int, margin: Int, tabWidth: Int = 4,
        tile: Int? = nil, newlineMark: String? = nil
    ) {
        self.font = font
        self.fontSHA256 = fontSHA256
        self.pixelSize = pixelSize
        self.lineHeight = lineHeight
        self.width = width
        self.height = height
        self.margin = margin
        self.tabWidth = tabWidth
        self.tile = tile
        self.newlineMark = newlineMark
    }

    /// Checks every field, naming the one at fault.
    public func validate() throws(RenderError) {
        guard fontSHA256.count == 64, fontSHA256.allSatisfy({ $0.isHexDigit }) else {
            throw .badConfig("render.font_sha256 must be 64 hex digits")
        }
        guard (4...128).contains(pixelSize) else { throw .badConfig("render.pixel_size must be in 4...128, got \(pixelSize)") }
        guard (pixelSize / 2...4 * pixelSize).contains(lineHeight) else {
            throw .badConfig("render.line_height must be between pixel_size/2 and 4*pixel_size, got \(lineHeight)")
        }
        guard width >= 16, height >= 16, width % 16 == 0, height % 16 == 0, width <= 4096, height <= 4096 else {
            throw .badConfig("render.width and render.height must be multiples of 16 in 16...4096, got \(width)x\(height)")
        }
        if let tile {
            guard tile >= 16, tile % 16 == 0, width % tile == 0, height % tile == 0 else {
                throw .badConfig("render.tile must be a multiple of 16 that divides the \(width)x\(height) canvas, got \(tile)")
            }
        }
        guard margin >= 0, 2 * margin + pixelSize <= min(pageWidth, pageHeight), 2 * margin + lineHeight <= pageHeight else {
            throw .badConfig("render.margin \(margin) leaves no room for text on a \(pageWidth)x\(pageHeight) page")
        }
        guard (1...16).contains(tabWidth) else { throw .badConfig("render.tab_width must be in 1...16, got \(tabWidth)") }
        if let mark = newlineMark {
            guard mark.unicodeScalars.count == 1, let m = mark.unicodeScalars.first, m.value >= 0x21, m.value != 0x7F,
                !(0x80..<0xA0).contains(m.value), !m.properties.isWhitespace
            else { throw .badConfig("render.newline_mark must be one visible character, got \(mark.debugDescription)") }
        }
    }

    /// One page: a tile, or the whole canvas.
    public var pageWidth: Int { tile ?? width }
    public var pageHeight: Int { tile ?? height }
    /// Pages on the canvas, read left to right, top to bottom.
    public var pagesPerRow: Int { width / pageWidth }
    public var pages: Int { pagesPerRow * (height / pageHeight) }
    /// Text rows on one page.
    public var rowsPerPage: Int { (pageHeight - 2 * margin) / lineHeight }
    /// Text rows that fit on the canvas (pages x rows per page).
    public var rows: Int { pages * rowsPerPage }
}

public enum RenderError: Error, CustomStringConvertible, Sendable, Equatable {
    case badConfig(String)
    case font(String)
    case io(String)

    public var code: String {
        switch self {
        case .badConfig: return "bad_render_config"
        case .font: return "font_mismatch"
        case .io: return "io"
        }
    }

    public var description: String {
        switch self {
        case .badConfig(let s), .font(let s), .io(let s): return s
        }
    }
}
