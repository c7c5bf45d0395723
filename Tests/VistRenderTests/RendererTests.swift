import Foundation
import Testing

@testable import VistRender

let dejaVuMono = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
let dejaVuMonoSHA = "0f5db4f1749979d961019838b160bec74abdf7f9eca69553fe1aa856bbff49a4"

func testConfig(width: Int = 224, height: Int = 112) -> RenderConfig {
    RenderConfig(
        font: dejaVuMono, fontSHA256: dejaVuMonoSHA, pixelSize: 10, lineHeight: 11, width: width, height: height, margin: 2, tabWidth: 4)
}

/// Columns of `img` in rows [y0, y1) that hold ink.
func inkColumns(_ img: GrayImage, rows: Range<Int>) -> [Int] {
    (0..<img.width).filter { x in rows.contains { img.pixels[$0 * img.width + x] < 128 } }
}

@Suite("Sketch renderer")
struct RendererTests {
    @Test("Rendering is deterministic: same text and config, same bytes")
    func deterministic() throws {
        let text = "func main() {\n\tprint(\"héllo, wörld\")\n}\n"
        let a = try SketchRenderer(config: testConfig()).render(text).image
        let b = try SketchRenderer(config: testConfig()).render(text).image
        #expect(a == b)
        #expect(a.pixels.contains { $0 < 64 } && a.pixels.contains { $0 == 255 })
        // Antialiased: intermediate gray levels appear.
        #expect(a.pixels.contains { $0 > 32 && $0 < 224 })
    }

    @Test("Placements say where each drawn character is: its cell holds its ink and nothing else does")
    func placements() throws {
        let r = try SketchRenderer(config: testConfig())
        let text = "ab c\n\tdé\r\nxyz"
        let img = r.render(text).image
        let p = r.placements(Substring(text))
        let scalars = Array(text.unicodeScalars)
        // Every scalar but the newlines, tab and carriage return, in order.
        #expect(p.map(\.scalar) == scalars.indices.filter { !["\n", "\t", "\r"].contains(scalars[$0]) })
        #expect(p.map(\.row) == [0, 0, 0, 0, 1, 1, 2, 2, 2])
        // Cells of one row follow each other; the tab moves the pen to the next tab stop.
        #expect(p[1].x == p[0].x + p[0].advance && p[0].x == r.config.margin)
        #expect(p[4].x == r.config.margin + r.config.tabWidth * p[2].advance)
        let c = r.config
        #expect(p.allSatisfy { $0.y == c.margin + $0.row * c.lineHeight })
        func ink(_ q: SketchRenderer.Placement) -> Bool {
            (q.y..<(q.y + c.lineHeight)).contains { y in
                (q.x..<(q.x + q.advance)).contains { x in img.pixels[y * img.width + x] < 160 }
            }
        }
        #expect(p.filter { scalars[$0.scalar] != " " }.allSatisfy(ink))
        #expect(!ink(p[2]))  // the space
    }

    @Test("Tiled layout: text flows through the tiles in reading order, each tile a small page")
    func tiled() throws {
        // 96x64 in 32-pixel tiles: 3 x 2 pages of 2 rows (line height 16) of 5 cells (advance 6).
        var c = testConfig(width: 96, height: 64)
        c.margin = 0
        c.lineHeight = 16
        c.tile = 32
        let r = try SketchRenderer(config: c)
        #expect(c.pages == 6 && c.rowsPerPage == 2 && c.rows == 12)
        let text = "abcdefgh\nij\n\nklmnopqrstu"
        let p = r.placements(Substring(text))
        let at = { (ch: Character) in p.first { Array(text.unicodeScalars)[$0.scalar] == ch.unicodeScalars.first! }! }
        #expect(p[0].advance == 6)
        // "abcde" fills page 0's first row, "fgh" wraps to its second row, "ij" starts page 1,
        // an empty row ends page 1, "klmno" "pqrst" fill page 2 and "u" starts page 3 (the
        // second row of pages: left edge, y = 32).
        #expect((at("a").x, at("a").y) == (0, 0) && (at("e").x, at("e").y) == (24, 0))
        #expect((at("f").x, at("f").y) == (0, 16) && (at("h").x, at("h").y) == (12, 16))
        #expect((at("i").x, at("i").y) == (32, 0) && (at("k").x, at("k").y) == (64, 0) && (at("p").x, at("p").y) == (64, 16))
        #expect((at("u").x, at("u").y) == (0, 32) && at("u").row == 6)
        // Each character's ink lies in its own cell and nothing is drawn outside the cells.
        let img = r.render(text).image
        var inCell = [Bool](repeating: false, count: img.pixels.count)
        for q in p {
            for y in q.y..<(q.y + c.lineHeight) { for x in q.x..<(q.x + q.advance) { inCell[y * img.width + x] = true } }
        }
        #expect(img.pixels.indices.allSatisfy { inCell[$0] || img.pixels[$0] == 255 })
        #expect(
            p.allSatisfy { q in
                (q.y..<(q.y + c.lineHeight)).contains { y in (q.x..<(q.x + q.advance)).contains { img.pixels[y * 96 + $0] < 160 } }
            })
        // Twelve rows fit, a thirteenth does not.
        #expect(r.fit(Substring(String(repeating: "x\n", count: 12))).complete)
        let over = r.fit(Substring(String(repeating: "x\n", count: 12) + "y"))
        #expect(!over.complete && over.scalars == 24)
        // A tile must be a multiple of 16 dividing the canvas.
        for bad in [40, 48, 0] {
            var b = c
            b.tile = bad
            #expect(throws: RenderError.self) { try b.validate() }
        }
    }

    @Test("A different font file is refused with a clear error")
    func wrongFont() {
        var c = testConfig()
        c.fontSHA256 = String(repeating: "a", count: 64)
        #expect(throws: RenderError.self) { try SketchRenderer(config: c) }
        do {
            _ = try SketchRenderer(config: c)
        } catch {
            #expect(error.code == "font_mismatch" && error.description.contains(dejaVuMono) && error.description.contains(dejaVuMonoSHA))
        }
        c = testConfig()
        c.font = "/nonexistent/font.ttf"
        #expect(throws: RenderError.self) { try SketchRenderer(config: c) }
    }

    @Test("Invalid geometry names the field")
    func badConfig() {
        func message(_ edit: (inout RenderConfig) -> Void) -> String {
            var c = testConfig()
            edit(&c)
            do {
                try c.validate()
                return "accepted"
            } catch { return error.description }
        }
        #expect(message { $0.width = 100 }.contains("multiples of 16"))
        #expect(message { $0.pixelSize = 0 }.contains("pixel_size"))
        #expect(message { $0.lineHeight = 100 }.contains("line_height"))
        #expect(message { $0.margin = 60 }.contains("margin"))
        #expect(message { $0.tabWidth = 0 }.contains("tab_width"))
        #expect(message { $0.fontSHA256 = "xyz" }.contains("font_sha256"))
    }

    @Test("Newlines and indentation are kept")
    func layout() throws {
        let r = try SketchRenderer(config: testConfig())
        let img = r.render("x\n    x\n\tx").image
        let line = { (row: Int) in (2 + row * 11)..<(2 + (row + 1) * 11) }
        let first0 = try #require(inkColumns(img, rows: line(0)).first)
        let first1 = try #require(inkColumns(img, rows: line(1)).first)
        let first2 = try #require(inkColumns(img, rows: line(2)).first)
        let space = r.font.spaceAdvance
        #expect(first1 - first0 == 4 * space)  // four spaces
        #expect(first2 - first0 == 4 * space)  // one tab = four spaces here
        #expect(r.fit("x\n    x\n\tx").rows == 3)
    }

    @Test("Flowing layout: a newline is drawn as its mark and the text runs on; indentation stays as blank cells")
    func flowing() throws {
        var c = testConfig()
        c.newlineMark = "\u{21B5}"
        let r = try SketchRenderer(config: c)
        let text = "ab\n  cd\n\nx"
        let p = r.placements(Substring(text))
        let scalars = Array(text.unicodeScalars)
        // Every scalar is placed, newlines included, on one row.
        #expect(p.map(\.scalar) == Array(scalars.indices))
        #expect(p.allSatisfy { $0.row == 0 } && r.fit(Substring(text)).rows == 1)
        for i in 1..<p.count { #expect(p[i].x == p[i - 1].x + p[i - 1].advance) }
        // The mark has ink; the indentation after it does not.
        let img = r.render(text).image
        func ink(_ q: SketchRenderer.Placement) -> Bool {
            (q.y..<(q.y + c.lineHeight)).contains { y in (q.x..<(q.x + q.advance)).contains { x in img.pixels[y * img.width + x] < 160 } }
        }
        #expect(ink(p[2]) && ink(p[7]) && ink(p[8]) && !ink(p[3]) && !ink(p[4]))
        // Without the mark, the same text takes four rows; with it, short lines pack until the
        // right margin wraps the row.
        #expect(try SketchRenderer(config: testConfig()).fit(Substring(text)).rows == 4)
        let many = String(repeating: "ab\n", count: 30)
        let perRow = (c.width - 2 * c.margin) / p[0].advance
        let rows = r.fit(Substring(many)).rows
        #expect(rows == (90 + perRow - 1) / perRow, "\(rows) rows of \(perRow) cells")  // 90 cells
        // The mark must be one visible character the font has.
        for bad in ["", "ab", " ", "\u{7}", "\u{85}"] {
            c.newlineMark = bad
            #expect(throws: RenderError.self) { try c.validate() }
        }
        c.newlineMark = "\u{E000}"  // a private-use scalar DejaVu Sans Mono has no glyph for
        #expect {
            try SketchRenderer(config: c)
        } throws: { e in (e as? RenderError).map { "\($0)".contains("not in the font") } ?? false }
    }

    @Test("Characters the font lacks are drawn as visible boxes and counted")
    func missingGlyphs() throws {
        let r = try SketchRenderer(config: testConfig())
        let (img, fit) = r.render("日本")
        #expect(fit.missing == 2 && fit.complete)
        #expect(img.pixels.contains { $0 == 0 })
        #expect(r.fit("plain ascii").missing == 0)
    }

    @Test("Text longer than the canvas does not fit, and only what fits is drawn")
    func overflow() throws {
        let r = try SketchRenderer(config: testConfig())
        let long = String(repeating: "lorem ipsum dolor sit amet ", count: 100)
        let f = r.fit(Substring(long))
        #expect(!f.complete && f.scalars > 100 && f.scalars < long.unicodeScalars.count)
        #expect(f.rows == testConfig().rows)
        // Wrapping keeps every row inside the margins.
        let img = r.render(String(long.unicodeScalars.prefix(f.scalars))).image
        let cols = inkColumns(img, rows: 0..<img.height)
        #expect(cols.first! >= 2 && cols.last! < img.width - 2)
    }

    @Test("PNG files and the contact sheet are written; a bad path is an error")
    func png() throws {
        let r = try SketchRenderer(config: testConfig())
        let img = r.render("PNG test").image
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("vist2-\(UUID().uuidString).png").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try img.writePNG(to: path)
        let bytes = try #require(FileManager.default.contents(atPath: path))
        #expect(Array(bytes.prefix(8)) == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        #expect(throws: RenderError.self) { try img.writePNG(to: "/nonexistent-dir/x.png") }
        let sheet = GrayImage.contactSheet([img, img, img], columns: 2)
        #expect(sheet.width == 2 * (img.width + 2) && sheet.height == 2 * (img.height + 2))
        #expect(img.normalized().allSatisfy { $0 >= -1 && $0 <= 1 })
    }

    @Test("PNG bytes decode to the image that was encoded; damaged, truncated and oversized PNGs are refused")
    func pngDecode() throws {
        let r = try SketchRenderer(config: testConfig())
        let img = r.render("Decode me\n\tindented").image
        let png = try img.pngData()
        #expect(try GrayImage(png: png) == img)
        #expect(throws: RenderError.self) { try GrayImage(png: Array(png.prefix(png.count / 2))) }
        #expect(throws: RenderError.self) { try GrayImage(png: [UInt8](repeating: 0x89, count: 100)) }
        #expect(throws: RenderError.self) { try GrayImage(png: []) }
        var damaged = png
        damaged[damaged.count / 2] ^= 0xFF  // inside the compressed data: its CRC no longer matches
        #expect(throws: RenderError.self) { try GrayImage(png: damaged) }
        #expect(throws: RenderError.self) { try GrayImage(png: png, maxPixels: img.width * img.height - 1) }
    }
}
