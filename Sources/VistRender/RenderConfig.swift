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

    enum CodingKeys: String, CodingKey {
        case font
        case fontSHA256 = "font_sha256"
        case pixelSize = "pixel_size"
        case lineHeight = "line_height"
        case width, height, margin
        case tabWidth = "tab_width"
    }

    public init(font: String, fontSHA256: String, pixelSize: Int, lineHeight: Int, width: Int, height: Int, margin: Int, tabWidth: Int = 4)
    {
        self.font = font
        self.fontSHA256 = fontSHA256
        self.pixelSize = pixelSize
        self.lineHeight = lineHeight
        self.width = width
        self.height = height
        self.margin = margin
        self.tabWidth = tabWidth
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
        guard margin >= 0, 2 * margin + pixelSize <= min(width, height), 2 * margin + lineHeight <= height else {
            throw .badConfig("render.margin \(margin) leaves no room for text on a \(width)x\(height) canvas")
        }
        guard (1...16).contains(tabWidth) else { throw .badConfig("render.tab_width must be in 1...16, got \(tabWidth)") }
    }

    /// Text rows that fit on the canvas.
    public var rows: Int { (height - 2 * margin) / lineHeight }
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
