// CVistKernels — the hot inner loops of the engine, in C with SIMD intrinsics.
//
// Every kernel has a portable scalar version; x86-64 builds add AVX2/FMA and AVX-512 VNNI
// versions compiled with per-function target attributes and chosen once at run time, so one
// binary runs on any CPU. The Swift target VistKernels wraps these and keeps naive reference
// implementations beside them for the tests.
#ifndef VIST2_CVISTKERNELS_H
#define VIST2_CVISTKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Tensor element types, numbered exactly as GGML's `enum ggml_type` (and so as GGUF stores them).
enum vk_type {
    VK_TYPE_F32 = 0,
    VK_TYPE_F16 = 1,
    VK_TYPE_Q4_0 = 2,  ///< blocks of 32: fp16 d, 16 bytes of nibbles; x = (q - 8) * d
    VK_TYPE_Q4_1 = 3,  ///< blocks of 32: fp16 d, fp16 m, 16 bytes of nibbles; x = q * d + m
    VK_TYPE_Q8_0 = 8,  ///< blocks of 32: fp16 d, 32 int8; x = q * d
    VK_TYPE_BF16 = 30,
};

/// Elements per quantization block for the block types above (llama.cpp's QK4_0 = QK4_1 = QK8_0).
#define VK_QK 32

/// Activation blocks for the integer dot products: 32 int8 values with their float scale `d`
/// and `s = d * sum(qs)` (so the Q4_1 offset term and the Q4_0 bias fold in without a second pass).
/// This is an in-memory format only; it is never written to disk.
typedef struct {
    float d;
    float s;
    int8_t qs[VK_QK];
} vk_block_q8a;

/// Bytes of one row of `n` elements of `type`; 0 for an unknown type or an `n` that is not a
/// multiple of the block size of a block type.
size_t vk_row_bytes(int type, int64_t n);

/// IEEE half and bfloat16 to float.
float vk_fp16_to_fp32(uint16_t h);
uint16_t vk_fp32_to_fp16(float f);
float vk_bf16_to_fp32(uint16_t h);

/// Dequantize `n` elements (a multiple of the block size for block types) from `src` to `dst`.
void vk_dequantize(int type, const void *src, float *dst, int64_t n);

/// Quantize `n` floats (a multiple of 32) to activation blocks, scale = max|x| / 127, round to nearest.
void vk_quantize_q8a(const float *x, vk_block_q8a *y, int64_t n);

/// Dot product of one weight row of `type` with an activation vector of `n` elements.
/// Block types read `xq` (n/32 activation blocks); float types read `xf` (n floats).
float vk_dot_row(int type, const void *row, const vk_block_q8a *xq, const float *xf, int64_t n);

/// d[c] = sum_j x[j] * w[j][c] for columns c in [c0, c1): a combination of the n_rows rows of a
/// float-type matrix (F32, F16, BF16), i.e. d = W^T x. Used with a transposed LoRA factor.
void vk_combine_rows(int type, const void *w, size_t row_bytes, const float *x, int64_t n_rows, float *d, int64_t c0,
                     int64_t c1);

/// y[r] = dot(W[r], x) for rows r in [r0, r1) of a row-major matrix with `n` columns.
void vk_matvec_rows(int type, const void *w, size_t row_bytes, const vk_block_q8a *xq,
                    const float *xf, float *y, int64_t n, int64_t r0, int64_t r1);

/// y[i * y_stride + r] = dot(W[r], x_i) for rows r in [r0, r1) and the nx input rows x_i (block
/// types: xq + i * n/32; float types: xf + i * n). Each weight row is read once for all nx inputs,
/// and every dot product is the one vk_matvec_rows computes, so results are bit-identical to nx
/// separate calls (batched decoding gives each request exactly what it would get alone).
void vk_matvec_rows_multi(int type, const void *w, size_t row_bytes, const vk_block_q8a *xq, const float *xf, float *y,
                          int64_t n, int64_t nx, int64_t y_stride, int64_t r0, int64_t r1);

/// Interleaved weights, for the matrix-vector products of decoding: a block-type matrix (Q4_0,
/// Q4_1, Q8_0) repacked so that block i of 8 consecutive rows lies together, their 8 scales (and
/// Q4_1 mins) first, then their quant bytes — the same bytes as the 8 blocks. Q8_0: the 8 rows'
/// 32-byte arrays one after another. Q4_0 and Q4_1: four 32-byte chunks, chunk c holding bytes
/// 4c..<4c+4 of row 0's 16 quant bytes, then those of row 1, ... row 7 (so in one 256-bit load,
/// 32-bit lane k is row k's). Group g holds rows 8g ..< 8g + 8 as n/32 such blocks; a last group
/// with fewer rows is padded with zeros.
/// Bytes of the repacked matrix (0 for a type that has no interleaved form or a bad shape).
size_t vk_x8_bytes(int type, int64_t rows, int64_t n);
/// Repacks `rows` rows of `row_bytes` from `src` into `dst` (vk_x8_bytes of it); -1 if the type
/// or shape is not supported, else 0.
int vk_repack_x8(int type, const void *src, size_t row_bytes, int64_t rows, int64_t n, void *dst);
/// Rows [r0, r1) of an interleaved matrix as floats (row-major, n per row): the same floats as
/// vk_dequantize of the original rows.
void vk_dequantize_rows_x8(int type, const void *w, int64_t n, int64_t r0, int64_t r1, float *dst);
/// vk_matvec_rows_multi for an interleaved matrix: y[i * y_stride + r] = dot(W[r], x_i), rows r
/// in [r0, r1). Every row's result is the same whatever nx, r0 and r1 are, and the same on the
/// scalar and SIMD paths (exact integer block sums, one fused multiply-add per block).
void vk_matvec_x8(int type, const void *w, const vk_block_q8a *xq, float *y, int64_t n, int64_t nx, int64_t y_stride, int64_t r0,
                  int64_t r1);

/// f32 <-> IEEE half for n elements (round to nearest even; F16C when the CPU has AVX2).
void vk_f32_to_f16(const float *src, uint16_t *dst, int64_t n);
void vk_f16_to_f32(const uint16_t *src, float *dst, int64_t n);

/// Decoding attention of G query heads that share one KV head, over keys 0..<n of that head:
/// k and v point at the head's slice of key/value row 0 (f32, or f16 when `f16`), rows `stride`
/// elements apart; q holds the G queries (hd floats each, one after another): the query heads of
/// one KV head, of one row or of several rows that read the same keys. Each key and value row is
/// read once for all G queries. Outputs per query g, unnormalized so that parts over disjoint key
/// ranges can be merged: m[g] = max score, l[g] = sum of exp(score - m[g]), o[g*hd..] = sum of
/// exp(score - m[g]) v_s. `scores` is scratch of G*n floats. A query's outputs do not depend on
/// the other queries of the call, for any G up to 32 (above it the scalar path runs).
#define VK_ATTEND_GMAX 32
void vk_attend_group(int f16, const void *k, const void *v, int64_t stride, const float *q, int64_t G, int64_t hd, float scale,
                     int64_t n, float *scores, float *m, float *l, float *o);

/// x[i] = exp(x[i] - max); returns the sum (in double) and sets *max_out (n >= 1).
double vk_exp_shifted(float *x, int64_t n, float *max_out);

/// In-place softmax of n floats (max-subtracted, sum in double).
void vk_softmax(float *x, int64_t n);

/// log(sum(exp(x))) of n floats, max-subtracted.
double vk_logsumexp(const float *x, int64_t n);

/// gate[i] = silu(gate[i]) * up[i]  (SwiGLU), silu(g) = g / (1 + exp(-g)).
void vk_swiglu(float *gate, const float *up, int64_t n);

/// x[i] = gelu(x[i]), the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void vk_gelu_tanh(float *x, int64_t n);

/// Name of the SIMD path chosen at run time ("avx512vnni", "avx2", "scalar").
const char *vk_simd_path(void);
/// The same as a number: 0 scalar, 1 AVX2, 2 AVX-512 VNNI.
int vk_simd_level(void);

/// Force the scalar path (tests compare the paths); returns the previous setting.
int vk_force_scalar(int on);

// ---- checksums ----------------------------------------------------------------------------

/// CRC-32C of n bytes, continuing from `crc` (0 to start): hardware (SSE4.2) when available.
uint32_t vk_crc32c(uint32_t crc, const void *data, size_t n);
/// The same with the byte table only (tests compare the two).
uint32_t vk_crc32c_portable(uint32_t crc, const void *data, size_t n);

// ---- thread pool ---------------------------------------------------------------------------

/// A fixed pool of `n` threads including the caller: `vk_pool_run` runs `fn(ctx, ith, n)` for
/// ith = 0 ..< n, ith 0 on the calling thread, and returns when all are done. Idle workers spin
/// briefly (decode issues hundreds of small jobs per token) and then sleep on a condition
/// variable, so they do not steal cores from OpenBLAS during prefill.
typedef struct vk_pool vk_pool;
typedef void (*vk_task_fn)(void *ctx, int ith, int nth);

vk_pool *vk_pool_create(int n);
void vk_pool_run(vk_pool *pool, vk_task_fn fn, void *ctx);
int vk_pool_size(const vk_pool *pool);
/// A region whose work is `units` independent items (< 2^32), balanced while it runs: call
/// vk_pool_split_init before vk_pool_run; then each thread calls vk_pool_split_next until it
/// returns 0, doing [*lo, *hi) each time. Thread ith owns the ith contiguous slice and claims it
/// from the front; a thread done with its own takes from the back of another's, so a thread that
/// is slowed down (a busy core, a late start) no longer holds everyone up. Every unit is handed
/// out exactly once.
void vk_pool_split_init(vk_pool *pool, int64_t units);
int vk_pool_split_next(vk_pool *pool, int ith, int64_t *lo, int64_t *hi);
void vk_pool_destroy(vk_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
