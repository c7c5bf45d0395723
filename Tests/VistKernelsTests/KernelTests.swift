import CVistKernels
import Foundation
import Testing
import VistTestSupport

@testable import VistKernels

@Suite("Kernels against their naive references", .serialized)
struct KernelTests {
    @Test("Every finite half converts to the float it denotes, and back")
    func halfRoundTrip() {
        for h in 0...UInt16.max {
            let f = Half.toFloat(h)
            if f.isNaN { continue }
            // Reference decode from the IEEE binary16 definition.
            let sign: Float = h & 0x8000 != 0 ? -1 : 1
            let e = Int((h >> 10) & 0x1f), m = Float(h & 0x3ff)
            let ref: Float = e == 0 ? sign * m * powf(2, -24) : e == 31 ? sign * .infinity : sign * (1 + m / 1024) * powf(2, Float(e - 15))
            #expect(f == ref, "half \(h)")
            #expect(Half.fromFloat(f) == h || (f == 0 && Half.fromFloat(f) & 0x7fff == 0), "half \(h) round trip")
        }
    }

    @Test("Dequantization matches the byte-level reference for every type", arguments: TensorType.allCases)
    func dequantizeMatchesReference(type: TensorType) {
        var rng = TestRNG(1)
        let cols = 96, rows = 3
        let bytes = randomMatrixBytes(type, rows: rows, cols: cols, rng: &rng)
        bytes.withUnsafeBytes { raw in
            var fast = [Float](repeating: 0, count: rows * cols)
            fast.withUnsafeMutableBufferPointer { dequantize(type, raw.baseAddress!, $0.baseAddress!, count: rows * cols) }
            let ref = Reference.dequantizeRow(type, raw.baseAddress!, count: rows * cols)
            #expect(fast == ref)
        }
    }

    /// The error bound of llama.cpp-style 8-bit activation quantization: each activation moves by at
    /// most half a step (amax/127/2) of its 32-block, so |W x - W x'| <= sum |w| * step/2, plus float slack.
    func activationErrorBound(_ w: [Float], _ x: ArraySlice<Float>) -> Double {
        var bound = 0.0
        let xs = Array(x)
        for b in 0..<(xs.count / 32) {
            let amax = xs[(b * 32)..<(b * 32 + 32)].map { abs(Double($0)) }.max()!
            let half = amax / 127 / 2 * 1.001
            for j in (b * 32)..<(b * 32 + 32) { bound += abs(Double(w[j])) * half }
        }
        return bound + 1e-4 * (1 + w.map { abs(Double($0)) }.reduce(0, +))
    }

    @Test(
        "Matrix products match the reference on odd shapes (matvec and sgemm paths)",
        arguments: TensorType.allCases, [1, 3, 9, 33])
    func matmulMatchesReference(type: TensorType, n: Int) {
        var rng = TestRNG(UInt64(n) * 31 + UInt64(type.rawValue))
        let rows = 37, cols = 160
        let bytes = randomMatrixBytes(type, rows: rows, cols: cols, rng: &rng)
        let x = (0..<(n * cols)).map { _ in rng.float() }
        let pool = ThreadPool(threads: 3)
        let scratch = MatmulScratch()
        bytes.withUnsafeBytes { raw in
            let w = WeightMatrix(type: type, rows: rows, cols: cols, data: raw.baseAddress!)
            var y = [Float](repeating: .nan, count: n * rows)
            x.withUnsafeBufferPointer { xp in
                y.withUnsafeMutableBufferPointer { yp in
                    Matmul.forward(w, x: xp.baseAddress!, y: yp.baseAddress!, n: n, pool: pool, scratch: scratch)
                }
            }
            let ref = Reference.matmul(w, x: x, n: n)
            for i in 0..<n {
                for r in 0..<rows {
                    let row = Reference.dequantizeRow(w, r)
                    // Quantized weights on the matvec path also quantize activations to 8 bits.
                    let quantAct = type.isQuantized && Matmul.usesMatvec(w, n: n)
                    let tol =
                        quantAct
                        ? activationErrorBound(row, x[(i * cols)..<((i + 1) * cols)])
                        : 1e-4 * (1 + row.map { abs(Double($0)) }.reduce(0, +))
                    let err = abs(Double(y[i * rows + r]) - Double(ref[i * rows + r]))
                    #expect(err <= tol, "type \(type) n \(n) row \(r): \(y[i * rows + r]) vs \(ref[i * rows + r])")
                }
            }
        }
    }

    @Test("combineRows (d = W^T x over a column range) matches a naive sum on both paths", arguments: [TensorType.f32, .f16, .bf16])
    func combineRows(type: TensorType) {
        var rng = TestRNG(11 + UInt64(type.rawValue))
        let rows = 7, cols = 101  // not a multiple of 32: the tail runs too
        let bytes = randomMatrixBytes(type, rows: rows, cols: cols, rng: &rng)
        let x = (0..<rows).map { _ in rng.float() }
        var w = [Float](repeating: 0, count: rows * cols)
        bytes.withUnsafeBytes { raw in
            WeightMatrix(type: type, rows: rows, cols: cols, data: raw.baseAddress!).dequantizeRows(0..<rows, into: &w)
        }
        for scalar in [false, true] {
            let old = forceScalarKernels(scalar)
            defer { forceScalarKernels(old) }
            for columns in [0..<cols, 3..<70, 64..<96, 100..<101] {
                var d = [Float](repeating: .nan, count: cols)
                bytes.withUnsafeBytes { raw in
                    let m = WeightMatrix(type: type, rows: rows, cols: cols, data: raw.baseAddress!)
                    Matmul.combineRows(m, x: x, d: &d, columns: columns)
                }
                for c in 0..<cols {
                    if columns.contains(c) {
                        let want = (0..<rows).reduce(Float(0)) { $0 + x[$1] * w[$1 * cols + c] }
                        #expect(abs(d[c] - want) <= 1e-5 * max(1, abs(want)), "\(type) column \(c) scalar \(scalar)")
                    } else {
                        #expect(d[c].isNaN, "column \(c) outside \(columns) was written")
                    }
                }
            }
        }
    }

    @Test("The SIMD dot products equal the scalar ones", arguments: TensorType.allCases)
    func simdEqualsScalar(type: TensorType) {
        var rng = TestRNG(7 + UInt64(type.rawValue))
        let rows = 19, cols = 224
        let bytes = randomMatrixBytes(type, rows: rows, cols: cols, rng: &rng)
        let x = (0..<cols).map { _ in rng.float() }
        let pool = ThreadPool(threads: 2)
        let scratch = MatmulScratch()
        func run() -> [Float] {
            var y = [Float](repeating: 0, count: rows)
            bytes.withUnsafeBytes { raw in
                let w = WeightMatrix(type: type, rows: rows, cols: cols, data: raw.baseAddress!)
                x.withUnsafeBufferPointer { xp in
                    y.withUnsafeMutableBufferPointer {
                        Matmul.matvec(w, x: xp.baseAddress!, y: $0.baseAddress!, pool: pool, scratch: scratch)
                    }
                }
            }
            return y
        }
        let fast = run()
        let old = forceScalarKernels(true)
        let slow = run()
        forceScalarKernels(old)
        for r in 0..<rows {
            // Integer sums are exact on both paths; only the float accumulation order differs.
            #expect(abs(fast[r] - slow[r]) <= 1e-4 * max(1, abs(slow[r])), "row \(r) on \(simdPath)")
        }
    }

    @Test("Products of one input in one region (q, k, v) give each matrix's own matvec, bit for bit", arguments: [1, 3, 8, 12])
    func groupedProducts(n: Int) {
        var rng = TestRNG(41 + UInt64(n))
        let cols = 96
        // Matrices of mixed types and row counts that do not split evenly between the threads.
        let shapes: [(TensorType, Int)] = [(.q4_1, 37), (.q8_0, 16), (.f32, 5), (.q4_0, 50), (.q4_1, 24)]
        let bytes = shapes.map { randomMatrixBytes($0.0, rows: $0.1, cols: cols, rng: &rng) }
        let arena = WeightArena()
        let x = (0..<(n * cols)).map { _ in rng.float() }
        let pool = ThreadPool(threads: 3)
        var alone = shapes.map { [Float](repeating: 0, count: n * $0.1) }
        var grouped = alone
        withExtendedLifetime(bytes) {
            let ws = zip(shapes, bytes).map { shape, b in
                b.withUnsafeBytes { WeightMatrix(type: shape.0, rows: shape.1, cols: cols, data: $0.baseAddress!) }
            }.enumerated().map { $0.offset >= 3 ? arena.interleaved($0.element) : $0.element }  // both layouts in one region
            x.withUnsafeBufferPointer { xp in
                for i in ws.indices {
                    alone[i].withUnsafeMutableBufferPointer {
                        Matmul.forward(ws[i], x: xp.baseAddress!, y: $0.baseAddress!, n: n, pool: pool, scratch: MatmulScratch())
                    }
                }
                let outs = grouped.map { UnsafeMutablePointer<Float>.allocate(capacity: $0.count) }
                defer { outs.forEach { $0.deallocate() } }
                Matmul.forward(Array(zip(ws, outs)), x: xp.baseAddress!, n: n, pool: pool, scratch: MatmulScratch())
                for i in ws.indices { grouped[i] = Array(UnsafeBufferPointer(start: outs[i], count: grouped[i].count)) }
            }
        }
        #expect(grouped == alone)
    }

    @Test("Interleaved weights hold the file's rows and dequantize to the same floats", arguments: [TensorType.q4_0, .q4_1, .q8_0])
    func interleavedLayout(type: TensorType) {
        var rng = TestRNG(51 + UInt64(type.rawValue))
        let cols = 96
        let arena = WeightArena()
        for rows in [1, 8, 13, 37] {
            let bytes = randomMatrixBytes(type, rows: rows, cols: cols, rng: &rng)
            bytes.withUnsafeBytes { raw in
                let w = WeightMatrix(type: type, rows: rows, cols: cols, data: raw.baseAddress!)
                let p = arena.interleaved(w)
                #expect(p.layout == .interleaved8 && p.rows == rows && p.cols == cols && p.rowBytes == w.rowBytes)
                // Every row's blocks, read from the groups by the layout's definition, are the file's.
                for r in 0..<rows { #expect(Reference.fileRow(p, r) == Reference.fileRow(w, r), "\(type) rows \(rows) row \(r)") }
                for range in [0..<rows, (rows / 3)..<rows, (rows - 1)..<rows, 0..<0] {
                    var a = [Float](repeating: .nan, count: range.count * cols), b = a
                    a.withUnsafeMutableBufferPointer { w.dequantizeRows(range, into: $0.baseAddress!) }
                    b.withUnsafeMutableBufferPointer { p.dequantizeRows(range, into: $0.baseAddress!) }
                    #expect(a == b, "\(type) rows \(rows) range \(range)")
                }
                #expect(arena.interleaved(p).data == p.data, "an interleaved matrix is not repacked again")
            }
        }
        // Float matrices keep the row layout (their kernels read rows).
        let f = randomMatrixBytes(.f16, rows: 8, cols: 32, rng: &rng)
        f.withUnsafeBytes { raw in
            let w = WeightMatrix(type: .f16, rows: 8, cols: 32, data: raw.baseAddress!)
            #expect(arena.interleaved(w).layout == .rows && arena.interleaved(w).data == w.data)
        }
    }

    @Test(
        "Interleaved products match the reference, equal alone and batched, scalar and SIMD, and any row range",
        arguments: [TensorType.q4_0, .q4_1, .q8_0])
    func interleavedProducts(type: TensorType) {
        var rng = TestRNG(61 + UInt64(type.rawValue))
        let rows = 37, cols = 160  // 37 rows: the last group is padded
        let bytes = randomMatrixBytes(type, rows: rows, cols: cols, rng: &rng)
        let x = (0..<(12 * cols)).map { _ in rng.float() }
        let pool = ThreadPool(threads: 3)
        let arena = WeightArena()
        bytes.withUnsafeBytes { raw in
            let w = WeightMatrix(type: type, rows: rows, cols: cols, data: raw.baseAddress!)
            let p = arena.interleaved(w)
            func product(_ m: WeightMatrix, _ n: Int, from i0: Int = 0) -> [Float] {
                var y = [Float](repeating: .nan, count: n * rows)
                x.withUnsafeBufferPointer { xp in
                    y.withUnsafeMutableBufferPointer {
                        Matmul.forward(m, x: xp.baseAddress! + i0 * cols, y: $0.baseAddress!, n: n, pool: pool, scratch: MatmulScratch())
                    }
                }
                return y
            }
            let ref = Reference.matmul(w, x: x, n: 12)
            var alone: [[Float]] = []
            for i in 0..<8 {
                let y = product(p, 1, from: i)
                alone.append(y)
                for r in 0..<rows {
                    let row = Reference.dequantizeRow(w, r)
                    let err = abs(Double(y[r]) - Double(ref[i * rows + r]))
                    #expect(err <= activationErrorBound(row, x[(i * cols)..<((i + 1) * cols)]), "\(type) input \(i) row \(r)")
                }
            }
            for n in [2, 5, 8] {
                let y = product(p, n)
                for i in 0..<n { #expect(Array(y[(i * rows)..<((i + 1) * rows)]) == alone[i], "\(type) batch \(n) input \(i)") }
            }
            // The scalar kernels compute the same floats (exact integer sums, one fma per block).
            let old = forceScalarKernels(true)
            let scalar = product(p, 5)
            forceScalarKernels(old)
            #expect(scalar == product(p, 5), "\(type) scalar vs \(simdPath)")
            // Any split of the rows gives each row the same result and writes nothing else.
            let blocks = UnsafeMutablePointer<vk_block_q8a>.allocate(capacity: cols / 32)
            defer { blocks.deallocate() }
            x.withUnsafeBufferPointer { quantizeActivations($0.baseAddress!, blocks, count: cols) }
            for range in [3..<11, 8..<16, 36..<37, 0..<37] {
                var y = [Float](repeating: .nan, count: rows)
                vk_matvec_x8(
                    Int32(type.rawValue), p.data, blocks, &y, Int64(cols), 1, Int64(rows), Int64(range.lowerBound), Int64(range.upperBound))
                for r in 0..<rows {
                    if range.contains(r) { #expect(y[r] == alone[0][r], "\(type) rows \(range) row \(r)") } else { #expect(y[r].isNaN) }
                }
            }
            if Matmul.usesMatvec(p, n: 12) {
                // Larger batches take the same integer kernels (with the SIMD kernels): each
                // input's rows are what it gets alone.
                let y = product(p, 12)
                for i in 0..<8 { #expect(Array(y[(i * rows)..<((i + 1) * rows)]) == alone[i], "\(type) batch 12 input \(i)") }
            } else {
                // Else both layouts dequantize for sgemm: the same floats, so the same result.
                #expect(product(p, 12) == product(w, 12))
            }
        }
    }

    @Test("RMSNorm, softmax and RoPE match the reference", arguments: [1, 7, 64, 1000])
    func elementwise(n: Int) {
        var rng = TestRNG(UInt64(n))
        let x = (0..<n).map { _ in rng.float() * 4 }
        let w = (0..<n).map { _ in rng.float() }
        var out = [Float](repeating: 0, count: n)
        x.withUnsafeBufferPointer { xp in
            w.withUnsafeBufferPointer { wp in
                out.withUnsafeMutableBufferPointer {
                    Ops.rmsNorm(xp.baseAddress!, weight: wp.baseAddress!, out: $0.baseAddress!, n: n, eps: 1e-5)
                }
            }
        }
        for (a, b) in zip(out, Reference.rmsNorm(x, weight: w, eps: 1e-5)) { #expect(abs(a - b) <= 1e-5 * max(1, abs(b))) }

        var s = x.map { $0 * 10 }
        s.withUnsafeMutableBufferPointer { Ops.softmax($0.baseAddress!, n: n) }
        for (a, b) in zip(s, Reference.softmax(x.map { $0 * 10 })) { #expect(abs(a - b) <= 1e-6 + 1e-5 * b) }

        if n % 2 == 0 {
            for style in [RopeStyle.interleaved, .halves] {
                let table = RopeTable(dims: n, base: 10000, style: style)
                table.reserve(300)
                for pos in [0, 1, 17, 299] {
                    var v = x
                    v.withUnsafeMutableBufferPointer { table.apply($0.baseAddress!, pos: pos) }
                    for (a, b) in zip(v, Reference.rope(x, pos: pos, base: 10000, style: style)) {
                        #expect(abs(a - b) <= 2e-4 * max(1, abs(b)), "style \(style) pos \(pos)")
                    }
                }
            }
        }
    }

    @Test("SwiGLU and log-sum-exp match direct formulas")
    func swigluAndLSE() {
        var rng = TestRNG(99)
        let n = 203
        let g = (0..<n).map { _ in rng.float() * 20 }
        let u = (0..<n).map { _ in rng.float() }
        var out = g
        out.withUnsafeMutableBufferPointer { o in u.withUnsafeBufferPointer { Ops.swiglu(o.baseAddress!, up: $0.baseAddress!, n: n) } }
        for i in 0..<n {
            let ref = Double(g[i]) / (1 + exp(-Double(g[i]))) * Double(u[i])
            #expect(abs(Double(out[i]) - ref) <= 1e-5 * max(1, abs(ref)))
        }
        let lse = g.withUnsafeBufferPointer { Ops.logSumExp($0.baseAddress!, n: n) }
        let m = Double(g.max()!)
        let ref = m + log(g.map { exp(Double($0) - m) }.reduce(0, +))
        #expect(abs(lse - ref) < 1e-5)
    }

    @Test("GELU (tanh form) matches the direct formula on the vector and the scalar path", .serialized, arguments: [false, true])
    func geluTanh(scalar: Bool) {
        let old = forceScalarKernels(scalar)
        defer { _ = forceScalarKernels(old) }
        var rng = TestRNG(7)
        // Both tails (exp's clamp at +-88), zero, and the rest; n = 203 leaves a scalar tail.
        let x = [-1000, -90, -30, -5, -1e-6, 0, 1e-6, 5, 30, 90, 1000] + (0..<192).map { _ in rng.float() * 8 }
        var out = x
        out.withUnsafeMutableBufferPointer { Ops.geluTanh($0.baseAddress!, n: $0.count) }
        for (z, y) in zip(x.map(Double.init), out.map(Double.init)) {
            let ref = 0.5 * z * (1 + tanh(0.797_884_560_802_865_4 * (z + 0.044715 * z * z * z)))
            #expect(abs(y - ref) <= 1e-6 * max(1, abs(ref)), "x = \(z): \(y) vs \(ref)")
        }
    }

    @Test("The thread pool runs every index exactly once, many times over")
    func threadPool() {
        let pool = ThreadPool(threads: 4)
        let counts = UnsafeMutablePointer<Int>.allocate(capacity: 1000)
        defer { counts.deallocate() }
        counts.initialize(repeating: 0, count: 1000)
        for _ in 0..<500 {
            pool.parallel { ith, nth in
                for i in ThreadPool.slice(1000, ith, nth, align: 16) { counts[i] += 1 }
            }
        }
        #expect((0..<1000).allSatisfy { counts[$0] == 500 })
        for count in [0, 1, 15, 16, 17, 1000] {
            for nth in 1...5 {
                let covered = (0..<nth).flatMap { Array(ThreadPool.slice(count, $0, nth, align: 16)) }
                #expect(covered == Array(0..<count))
            }
        }
    }

    @Test("A balanced region hands every unit out exactly once, and a late thread's share goes to the others")
    func balancedRegion() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool(threads: threads)
            for units in [0, 1, 5, 37, 1000] {
                let counts = UnsafeMutablePointer<Int>.allocate(capacity: max(1, units))
                defer { counts.deallocate() }
                counts.initialize(repeating: 0, count: max(1, units))
                for _ in 0..<200 {
                    pool.parallel(units: units) { range, _ in
                        #expect(range.lowerBound >= 0 && range.upperBound <= units && !range.isEmpty)
                        for i in range { counts[i] += 1 }
                    }
                }
                #expect((0..<units).allSatisfy { counts[$0] == 200 }, "\(threads) threads, \(units) units")
            }
        }
        // Thread 1 stops for 50 ms in its first claim (a quarter of its 100 units, or nothing if it
        // woke after the others had taken all): the others take the rest of its share meanwhile.
        let pool = ThreadPool(threads: 3)
        let done = UnsafeMutablePointer<Int>.allocate(capacity: 3)
        defer { done.deallocate() }
        done.initialize(repeating: 0, count: 3)
        var late = true
        pool.parallel(units: 300) { range, ith in
            if ith == 1 && late {
                late = false
                usleep(50_000)
            }
            done[ith] += range.count
        }
        #expect(done[0] + done[1] + done[2] == 300)
        #expect(done[1] <= 25, "the late thread did \(done[1]) of 300 units")
    }
}
