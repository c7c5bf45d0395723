import CVistKernels

/// A fork-join pool over `vk_pool` (C): `parallel { ith, nth in ... }` runs the body on every
/// thread of the pool, the caller included, and returns when all are done.
///
/// One pool belongs to one engine; `parallel` is not reentrant and must be called from one thread
/// at a time (the engine serialises its requests).
public final class ThreadPool: @unchecked Sendable {
    private let pool: OpaquePointer

    /// Number of threads, the caller included.
    public let size: Int

    public init(threads: Int) {
        let n = max(1, threads)
        pool = vk_pool_create(Int32(n))
        size = Int(vk_pool_size(pool))
    }

    deinit { vk_pool_destroy(pool) }

    /// Runs `body(ith, nth)` for ith in 0..<nth on the pool's threads.
    public func parallel(_ body: (Int, Int) -> Void) {
        withoutActuallyEscaping(body) { escapable in
            var job = escapable
            withUnsafeMutablePointer(to: &job) { ptr in
                vk_pool_run(
                    pool,
                    { ctx, ith, nth in
                        let job = ctx!.assumingMemoryBound(to: ((Int, Int) -> Void).self)
                        job.pointee(Int(ith), Int(nth))
                    }, UnsafeMutableRawPointer(ptr))
            }
        }
    }

    /// Runs `body(range, ith)` over the ranges of `0..<units` the threads claim while the region
    /// runs (vk_pool_split_next): each thread starts on its own contiguous share and, when done,
    /// takes part of another's that is still left, so a thread slowed down by a busy core does
    /// not hold up the others. For items whose results do not depend on which thread does them.
    public func parallel(units: Int, _ body: (Range<Int>, Int) -> Void) {
        guard units < 1 << 32 else {
            parallel { ith, nth in body(Self.slice(units, ith, nth), ith) }
            return
        }
        vk_pool_split_init(pool, Int64(units))
        parallel { ith, _ in
            var lo: Int64 = 0, hi: Int64 = 0
            while vk_pool_split_next(pool, Int32(ith), &lo, &hi) != 0 { body(Int(lo)..<Int(hi), ith) }
        }
    }

    /// The half-open range of `0..<count` that thread `ith` of `nth` owns, in contiguous slices
    /// whose starts are multiples of `align` (so threads do not share cache lines of output).
    @inlinable
    public static func slice(_ count: Int, _ ith: Int, _ nth: Int, align: Int = 1) -> Range<Int> {
        let units = (count + align - 1) / align
        let per = (units + nth - 1) / nth
        let lo = min(count, ith * per * align)
        let hi = min(count, (ith + 1) * per * align)
        return lo..<hi
    }
}
