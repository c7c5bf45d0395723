import CBLAS
import CVistKernels
import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A weight matrix stored in its file's element type: `rows` output features, each a row of
/// `cols` input features (GGUF's ne1 x ne0). The memory usually belongs to a memory-mapped model
/// file and is never dequantized as a whole.
///
/// `layout` says how the rows lie in `data`: one after another as in the file, or, for the block
/// types, repacked at load into groups of 8 rows whose blocks are interleaved
/// (`WeightArena.interleaved`), which the decoding kernels read about twice as fast.
public struct WeightMatrix: @unchecked Sendable {
    public enum Layout: Sendable {
        /// Row r at `data + r * rowBytes`, as in the model file.
        case rows
        /// Groups of 8 rows, block i of the 8 rows together (CVistKernels.h, vk_repack_x8).
        case interleaved8
    }

    public let type: TensorType
    public let rows: Int
    public let cols: Int
    public let data: UnsafeRawPointer
    /// Bytes of one row's blocks (in either layout).
    public let rowBytes: Int
    public let layout: Layout

    public init(type: TensorType, rows: Int, cols: Int, data: UnsafeRawPointer) {
        self.init(type: type, rows: rows, cols: cols, data: data, layout: .rows)
    }

    init(type: TensorType, rows: Int, cols: Int, data: UnsafeRawPointer, layout: Layout) {
        precondition(cols % type.blockSize == 0, "row length must be a whole number of blocks")
        self.type = type
        self.rows = rows
        self.cols = cols
        self.data = data
        self.rowBytes = type.rowBytes(cols)!
        self.layout = layout
    }

    /// Dequantizes rows `range` into `dst` (row-major, `cols` floats per row): the same floats in
    /// either layout.
    public func dequantizeRows(_ range: Range<Int>, into dst: UnsafeMutablePointer<Float>) {
        guard !range.isEmpty else { return }
        switch layout {
        case .rows: dequantize(type, data + range.lowerBound * rowBytes, dst, count: range.count * cols)
        case .interleaved8:
            vk_dequantize_rows_x8(Int32(type.rawValue), data, Int64(cols), Int64(range.lowerBound), Int64(range.upperBound), dst)
        }
    }
}

/// Owns the memory of weight matrices repacked at load (`interleaved`) and frees it with the
/// model that holds it.
public final class WeightArena: @unchecked Sendable {
    private var buffers: [UnsafeMutableRawPointer] = []
    private let lock = NSLock()

    public init() {}

    deinit { for b in buffers { b.deallocate() } }

    /// `w` with its rows interleaved in groups of 8 (a copy this arena owns), when it is of a
    /// block type in the row layout; otherwise `w` itself. The products and dequantized rows of
    /// the copy are those of `w`, except that a matrix-vector product sums each row's blocks in
    /// a different (exact integer, then fused) order. With `releaseSource`, the pages wholly
    /// inside `w`'s data are dropped from this process's memory afterwards (for a read-only file
    /// mapping: the copy replaces them, and they would be read again from the file if touched).
    public func interleaved(_ w: WeightMatrix, releaseSource: Bool = false) -> WeightMatrix {
        guard w.layout == .rows, w.type.isQuantized else { return w }
        let bytes = vk_x8_bytes(Int32(w.type.rawValue), Int64(w.rows), Int64(w.cols))
        guard bytes > 0 else { return w }
        let p = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        guard vk_repack_x8(Int32(w.type.rawValue), w.data, w.rowBytes, Int64(w.rows), Int64(w.cols), p) == 0 else {
            p.deallocate()
            return w
        }
        lock.withLock { buffers.append(p) }
        if releaseSource { releasePages(w.data, byteCount: w.rows * w.rowBytes) }
        return WeightMatrix(type: w.type, rows: w.rows, cols: w.cols, data: p, layout: .interleaved8)
    }

    /// Drops the whole pages of [p, p + byteCount) from this process (MADV_DONTNEED; advice only).
    private func releasePages(_ p: UnsafeRawPointer, byteCount: Int) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard page > 0 else { return }
        let start = (Int(bitPattern: p) + page - 1) / page * page
        let end = (Int(bitPattern: p) + byteCount) / page * page
        guard end > start, let first = UnsafeMutableRawPointer(bitPattern: start) else { return }
        _ = madvise(first, end - start, Int32(MADV_DONTNEED))
    }
}

/// Scratch memory reused across matrix products so the hot loop allocates nothing.
public final class MatmulScratch: @unchecked Sendable {
    /// Activation blocks for one input row: (cols / 32).
    public private(set) var xq: UnsafeMutablePointer<ActivationBlock>
    private var xqCapacity: Int
    /// Dequantized weight tile: (tileRows, cols).
    public private(set) var tile: UnsafeMutablePointer<Float>
    private var tileCapacity: Int

    /// Products that use this scratch all run with f32 activations: dequantized weight tiles and
    /// sgemm even for one input (no 8-bit activations anywhere). The path whose logits equal the
    /// float64 reference, for tests and comparisons; the engine's workspaces leave it off.
    public var exactActivations = false

    /// Rows of a weight matrix each thread dequantizes at a time for sgemm: a tile stays in the
    /// L2/L3 cache while sgemm packs it, and a 50k-row output matrix never becomes f32 at once.
    public static let tileRows = 1024

    public init() {
        xqCapacity = 0
        tileCapacity = 0
        xq = .allocate(capacity: 1)
        tile = .allocate(capacity: 1)
    }

    deinit {
        xq.deallocate()
        tile.deallocate()
    }

    public func reserve(cols: Int, batch: Int = 1) {
        let blocks = (cols + 31) / 32 * batch
        if blocks > xqCapacity {
            xq.deallocate()
            xq = .allocate(capacity: blocks)
            xqCapacity = blocks
        }
    }

    public func reserveTile(_ floats: Int) {
        if floats > tileCapacity {
            tile.deallocate()
            tile = .allocate(capacity: floats)
            tileCapacity = floats
        }
    }
}

public enum Matmul {
    /// Batches at or below this size use the matrix-vector kernels (integer ones, with 8-bit
    /// activations, for block types); larger ones over float matrices (and over block types
    /// without the SIMD kernels) dequantize weight tiles and call sgemm (whose throughput then
    /// dominates).
    nonisolated(unsafe) public static var gemmThreshold = 8

    /// Whether a product of `n` inputs with `w` runs on the matrix-vector kernels. Interleaved
    /// block-type matrices take the integer kernels at every batch size when the SIMD kernels
    /// run: each weight block is unpacked once for 4 inputs and a group's 8 rows are summed
    /// without horizontal adds, which beats dequantizing tiles for sgemm at every batch size
    /// measured (AVX2, 2 threads: 3.5x at 16 rows, 1.8x at 102, 1.25x at 512). Activations are
    /// then 8-bit at every batch size, as in llama.cpp, and a row's result does not depend on the
    /// batch it is in. With `exact` (`MatmulScratch.exactActivations`) nothing does: every
    /// product dequantizes tiles for sgemm with f32 activations.
    public static func usesMatvec(_ w: WeightMatrix, n: Int, exact: Bool = false) -> Bool {
        !exact && (n <= gemmThreshold || (w.layout == .interleaved8 && vk_simd_level() > 0))
    }

    /// y (n, rows) = x (n, cols) * W^T. x and y are row-major with leading dimensions cols / rows.
    public static func forward(
        _ w: WeightMatrix, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, n: Int,
        pool: ThreadPool, scratch: MatmulScratch
    ) {
        if usesMatvec(w, n: n, exact: scratch.exactActivations) {
            matvec(w, x: x, y: y, n: n, pool: pool, scratch: scratch)
            return
        }
        // Each thread owns a contiguous slice of the weight rows (output columns): it dequantizes
        // a tile of its rows and multiplies it with single-threaded sgemm. Splitting the work
        // ourselves beats OpenBLAS's own threading at these shapes (measured: ~1.9x on 2 cores)
        // and keeps one set of threads on the cores.
        let chunk = MatmulScratch.tileRows
        scratch.reserveTile(pool.size * chunk * w.cols)
        let tiles = scratch.tile
        pool.parallel { ith, nth in
            let part = ThreadPool.slice(w.rows, ith, nth, align: 16)
            let tile = tiles + ith * chunk * w.cols
            var r0 = part.lowerBound
            while r0 < part.upperBound {
                let r1 = min(part.upperBound, r0 + chunk)
                w.dequantizeRows(r0..<r1, into: tile)
                // C (n, r1-r0) = A (n, cols) * tile^T; C's rows have stride w.rows.
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(n), Int32(r1 - r0), Int32(w.cols),
                    1.0, x, Int32(w.cols), tile, Int32(w.cols), 0.0, y + r0, Int32(w.rows))
                r0 = r1
            }
        }
    }

    /// y[r] = W_r · x for the rows in `rows` only, on the calling thread: for callers that split
    /// several small products over the pool's threads in one step. Float types only (F32, F16,
    /// BF16: no activation quantization).
    public static func floatRows(_ w: WeightMatrix, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, rows: Range<Int>) {
        precondition(!w.type.isQuantized, "floatRows takes F32, F16 or BF16 matrices")
        guard !rows.isEmpty else { return }
        vk_matvec_rows(Int32(w.type.rawValue), w.data, w.rowBytes, nil, x, y, Int64(w.cols), Int64(rows.lowerBound), Int64(rows.upperBound))
    }

    /// d[c] = sum_j x[j] W[j][c] for the columns in `columns` only (d = W^T x), on the calling
    /// thread. Float types only.
    public static func combineRows(_ w: WeightMatrix, x: UnsafePointer<Float>, d: UnsafeMutablePointer<Float>, columns: Range<Int>) {
        precondition(!w.type.isQuantized, "combineRows takes F32, F16 or BF16 matrices")
        guard !columns.isEmpty else { return }
        vk_combine_rows(
            Int32(w.type.rawValue), w.data, w.rowBytes, x, Int64(w.rows), d, Int64(columns.lowerBound), Int64(columns.upperBound))
    }

    /// y (n, rows) = x (n, cols) W^T for a few rows of x, with the integer kernels for block
    /// types (each row of x is quantized to 8 bits per 32-element block first, as llama.cpp
    /// does) and float kernels otherwise. Each weight row is read once for all n inputs, and
    /// row i's result is exactly what a call with that row alone gives (batched decoding relies
    /// on it).
    public static func matvec(
        _ w: WeightMatrix, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, n: Int = 1,
        pool: ThreadPool, scratch: MatmulScratch
    ) {
        matvec([(w, y)], x: x, n: n, pool: pool, scratch: scratch)
    }

    /// Several products of one input, y_i (n, rows_i) = x (n, cols) W_i^T (q, k and v; gate and
    /// up). At decoding sizes they run as one parallel region over all their weight rows, with x
    /// quantized once: one fork and join instead of one per matrix, and the threads' shares
    /// balanced over the whole. Each row's result is exactly `matvec`'s. Larger batches run one
    /// `forward` each.
    public static func forward(
        _ products: [(w: WeightMatrix, y: UnsafeMutablePointer<Float>)], x: UnsafePointer<Float>, n: Int, pool: ThreadPool,
        scratch: MatmulScratch
    ) {
        guard products.allSatisfy({ usesMatvec($0.w, n: n, exact: scratch.exactActivations) }) else {
            for p in products { forward(p.w, x: x, y: p.y, n: n, pool: pool, scratch: scratch) }
            return
        }
        matvec(products, x: x, n: n, pool: pool, scratch: scratch)
    }

    /// `matvec` of matrices of the same width in one parallel region: the weight rows of all of
    /// them split between the threads, x quantized once when any is of a block type. Matrices of
    /// different widths run one region each.
    static func matvec(
        _ products: [(w: WeightMatrix, y: UnsafeMutablePointer<Float>)], x: UnsafePointer<Float>, n: Int, pool: ThreadPool,
        scratch: MatmulScratch
    ) {
        guard n > 0, let first = products.first else { return }
        let cols = first.w.cols
        guard products.allSatisfy({ $0.w.cols == cols }) else {
            for p in products { matvec([p], x: x, n: n, pool: pool, scratch: scratch) }
            return
        }
        var xq: UnsafeMutablePointer<ActivationBlock>? = nil
        if products.contains(where: { $0.w.type.isQuantized }) {
            scratch.reserve(cols: cols, batch: n)
            let blocks = cols / 32
            let q = scratch.xq
            let quantize = { (rows: Range<Int>) in
                for i in rows { quantizeActivations(x + i * cols, q + i * blocks, count: cols) }
            }
            if n >= 16 && pool.size > 1 {
                // A prefill's rows: each row's blocks are its own, so threads take rows apart.
                pool.parallel { ith, nth in quantize(ThreadPool.slice(n, ith, nth)) }
            } else {
                quantize(0..<n)
            }
            xq = q
        }
        let blocks = UnsafePointer(xq)
        let total = products.reduce(0) { $0 + $1.w.rows }
        // Units of 16 rows: whole groups of interleaved rows, and threads never write the same
        // cache line of y.
        let unit = 16
        pool.parallel(units: (total + unit - 1) / unit) { units, _ in
            let part = (units.lowerBound * unit)..<min(total, units.upperBound * unit)
            var offset = 0
            for (w, y) in products {
                let lo = max(part.lowerBound, offset) - offset, hi = min(part.upperBound, offset + w.rows) - offset
                if lo < hi {
                    switch w.layout {
                    case .rows:
                        vk_matvec_rows_multi(
                            Int32(w.type.rawValue), w.data, w.rowBytes, w.type.isQuantized ? blocks : nil, w.type.isQuantized ? nil : x,
                            y, Int64(cols), Int64(n), Int64(w.rows), Int64(lo), Int64(hi))
                    case .interleaved8:
                        vk_matvec_x8(Int32(w.type.rawValue), w.data, blocks, y, Int64(cols), Int64(n), Int64(w.rows), Int64(lo), Int64(hi))
                    }
                }
                offset += w.rows
            }
        }
    }
}

/// Sets OpenBLAS's thread count. The engine calls sgemm from its own pool's threads and sets this
/// to 1, so OpenBLAS never starts threads of its own that would compete for the cores.
public func setBLASThreads(_ n: Int) { openblas_set_num_threads(Int32(n)) }
