// Quantized and float dot products, dequantization and activation quantization.
// Block layouts match llama.cpp's ggml-common.h (block_q4_0, block_q4_1, block_q8_0): within a
// 32-element block, element j < 16 is the low nibble of qs[j] and element j + 16 its high nibble.
#include "CVistKernels.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VK_X86 1
#endif

typedef struct { uint16_t d; uint8_t qs[16]; } blk_q4_0;            // 18 bytes
typedef struct { uint16_t d; uint16_t m; uint8_t qs[16]; } blk_q4_1; // 20 bytes
typedef struct { uint16_t d; int8_t qs[32]; } blk_q8_0;              // 34 bytes

_Static_assert(sizeof(blk_q4_0) == 18, "block_q4_0 layout");
_Static_assert(sizeof(blk_q4_1) == 20, "block_q4_1 layout");
_Static_assert(sizeof(blk_q8_0) == 34, "block_q8_0 layout");

// Interleaved groups: block i of 8 consecutive rows (see vk_repack_x8), the same bytes as the
// 8 blocks they hold. Q4 quant bytes in four chunks: qs[c][k][b] is byte 4c + b of row k's 16,
// so 32-bit lane k of a chunk is row k's (the kernels then need no horizontal sums).
typedef struct { uint16_t d[8]; uint8_t qs[4][8][4]; } blk8_q4_0;             // 144 bytes
typedef struct { uint16_t d[8]; uint16_t m[8]; uint8_t qs[4][8][4]; } blk8_q4_1; // 160 bytes
typedef struct { uint16_t d[8]; int8_t qs[8][32]; } blk8_q8_0;              // 272 bytes

_Static_assert(sizeof(blk8_q4_0) == 8 * sizeof(blk_q4_0), "interleaved q4_0 group");
_Static_assert(sizeof(blk8_q4_1) == 8 * sizeof(blk_q4_1), "interleaved q4_1 group");
_Static_assert(sizeof(blk8_q8_0) == 8 * sizeof(blk_q8_0), "interleaved q8_0 group");

// Input rows one interleaved Q4 kernel call takes at once (vk_matvec_x8 buffers their outputs).
#define VK_X8_NX 4

size_t vk_row_bytes(int type, int64_t n) {
    if (n < 0) return 0;
    switch (type) {
    case VK_TYPE_F32: return (size_t)n * 4;
    case VK_TYPE_F16:
    case VK_TYPE_BF16: return (size_t)n * 2;
    case VK_TYPE_Q4_0: return n % VK_QK ? 0 : (size_t)(n / VK_QK) * sizeof(blk_q4_0);
    case VK_TYPE_Q4_1: return n % VK_QK ? 0 : (size_t)(n / VK_QK) * sizeof(blk_q4_1);
    case VK_TYPE_Q8_0: return n % VK_QK ? 0 : (size_t)(n / VK_QK) * sizeof(blk_q8_0);
    default: return 0;
    }
}

// ---- half precision ------------------------------------------------------------------------

float vk_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalize
            exp = 127 - 15 + 1;
            while ((man & 0x400) == 0) { man <<= 1; exp--; }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t vk_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7fffffff;
    if (absx >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
    if (absx >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to infinity
    if (absx < 0x38800000) {                                     // subnormal or zero in half
        if (absx < 0x33000000) return (uint16_t)sign;
        const uint32_t e = absx >> 23;
        const uint32_t m = (absx & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e;  // 14 + (113 - e) - 1 ... mantissa shift into half subnormal
        uint32_t r = m >> (shift);
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = absx - 0x38000000;  // rebias exponent 127 -> 15
    const uint32_t rem = r & 0x1fff;
    r >>= 13;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

float vk_bf16_to_fp32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// fp16 -> fp32 through a table: the block scales are read once per 32 weights in the hot loops.
static float fp16_table[65536];
static pthread_once_t fp16_once = PTHREAD_ONCE_INIT;
static void fp16_table_init(void) {
    for (uint32_t i = 0; i < 65536; i++) fp16_table[i] = vk_fp16_to_fp32((uint16_t)i);
}
static inline float h2f(uint16_t h) { return fp16_table[h]; }

// ---- run-time dispatch ---------------------------------------------------------------------

enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_VNNI = 2 };
static int simd_path = -1;
static int forced_scalar = 0;
static pthread_once_t dispatch_once = PTHREAD_ONCE_INIT;

static void dispatch_init(void) {
    fp16_table_init();
    simd_path = PATH_SCALAR;
#ifdef VK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) simd_path = PATH_AVX2;
    if (simd_path == PATH_AVX2 && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
        simd_path = PATH_VNNI;
#endif
}

static inline int path(void) {
    pthread_once(&dispatch_once, dispatch_init);
    return forced_scalar ? PATH_SCALAR : simd_path;
}

/// 0 scalar, 1 AVX2, 2 AVX-512 VNNI (for the other kernel files).
int vk_simd_level(void) { return path(); }

const char *vk_simd_path(void) {
    switch (path()) {
    case PATH_VNNI: return "avx512vnni";
    case PATH_AVX2: return "avx2";
    default: return "scalar";
    }
}

int vk_force_scalar(int on) {
    pthread_once(&dispatch_once, dispatch_init);
    const int prev = forced_scalar;
    forced_scalar = on;
    return prev;
}

// ---- dequantization ------------------------------------------------------------------------

// One block of 32 weights to floats: the one definition both layouts (rows and interleaved
// groups) use, so they dequantize to the same floats.
static inline void dequantize_q4_0(uint16_t dh, const uint8_t *qs, float *dst) {
    const float d = h2f(dh);
    for (int j = 0; j < 16; j++) {
        dst[j] = (float)((qs[j] & 0x0f) - 8) * d;
        dst[j + 16] = (float)((qs[j] >> 4) - 8) * d;
    }
}

static inline void dequantize_q4_1(uint16_t dh, uint16_t mh, const uint8_t *qs, float *dst) {
    const float d = h2f(dh), m = h2f(mh);
    for (int j = 0; j < 16; j++) {
        dst[j] = (float)(qs[j] & 0x0f) * d + m;
        dst[j + 16] = (float)(qs[j] >> 4) * d + m;
    }
}

static inline void dequantize_q8_0(uint16_t dh, const int8_t *qs, float *dst) {
    const float d = h2f(dh);
    for (int j = 0; j < 32; j++) dst[j] = (float)qs[j] * d;
}

void vk_dequantize(int type, const void *src, float *dst, int64_t n) {
    pthread_once(&dispatch_once, dispatch_init);
    switch (type) {
    case VK_TYPE_F32: memcpy(dst, src, (size_t)n * 4); return;
    case VK_TYPE_F16: {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = h2f(s[i]);
        return;
    }
    case VK_TYPE_BF16: {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = vk_bf16_to_fp32(s[i]);
        return;
    }
    case VK_TYPE_Q4_0: {
        const blk_q4_0 *b = src;
        for (int64_t i = 0; i < n / VK_QK; i++, dst += VK_QK) dequantize_q4_0(b[i].d, b[i].qs, dst);
        return;
    }
    case VK_TYPE_Q4_1: {
        const blk_q4_1 *b = src;
        for (int64_t i = 0; i < n / VK_QK; i++, dst += VK_QK) dequantize_q4_1(b[i].d, b[i].m, b[i].qs, dst);
        return;
    }
    case VK_TYPE_Q8_0: {
        const blk_q8_0 *b = src;
        for (int64_t i = 0; i < n / VK_QK; i++, dst += VK_QK) dequantize_q8_0(b[i].d, b[i].qs, dst);
        return;
    }
    default: return;
    }
}

void vk_quantize_q8a(const float *x, vk_block_q8a *y, int64_t n) {
    for (int64_t i = 0; i < n / VK_QK; i++) {
        const float *xb = x + i * VK_QK;
        float amax = 0.0f;
        for (int j = 0; j < VK_QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < VK_QK; j++) {
            const int q = (int)lrintf(xb[j] * id);
            y[i].qs[j] = (int8_t)q;
            sum += q;
        }
        y[i].d = d;
        y[i].s = d * (float)sum;
    }
}

// ---- scalar dot products -------------------------------------------------------------------

static float dot_q4_0_scalar(const blk_q4_0 *w, const vk_block_q8a *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int s = 0;
        for (int j = 0; j < 16; j++) {
            s += (w[i].qs[j] & 0x0f) * x[i].qs[j] + (w[i].qs[j] >> 4) * x[i].qs[j + 16];
        }
        const float d = h2f(w[i].d);
        acc += d * (x[i].d * (float)s - 8.0f * x[i].s);
    }
    return acc;
}

static float dot_q4_1_scalar(const blk_q4_1 *w, const vk_block_q8a *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int s = 0;
        for (int j = 0; j < 16; j++) {
            s += (w[i].qs[j] & 0x0f) * x[i].qs[j] + (w[i].qs[j] >> 4) * x[i].qs[j + 16];
        }
        acc += h2f(w[i].d) * x[i].d * (float)s + h2f(w[i].m) * x[i].s;
    }
    return acc;
}

static float dot_q8_0_scalar(const blk_q8_0 *w, const vk_block_q8a *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int s = 0;
        for (int j = 0; j < 32; j++) s += w[i].qs[j] * x[i].qs[j];
        acc += h2f(w[i].d) * x[i].d * (float)s;
    }
    return acc;
}

static float dot_f32_scalar(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

static float dot_f16_scalar(const uint16_t *a, const float *b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += h2f(a[i]) * b[i];
    return acc;
}

static float dot_bf16_scalar(const uint16_t *a, const float *b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += vk_bf16_to_fp32(a[i]) * b[i];
    return acc;
}

// ---- AVX2 / AVX-512 VNNI dot products ------------------------------------------------------

#ifdef VK_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

// 32 unsigned nibbles of a Q4 block: low nibbles in the low 128 bits (elements 0..15).
AVX2 static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
}

// sum over 32 lanes of u8 * s8, as 8 int32 lanes converted to float.
AVX2 static inline __m256 dot_u8s8_avx2(__m256i u, __m256i s) {
    const __m256i p16 = _mm256_maddubs_epi16(u, s);  // |15 * 127 * 2| and |127 * 127 * 2| fit in int16
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

VNNI static inline __m256 dot_u8s8_vnni(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
}

#define DEFINE_Q4_DOTS(SUFFIX, ATTR, DOTU8)                                                        \
    ATTR static float dot_q4_1_##SUFFIX(const blk_q4_1 *w, const vk_block_q8a *x, int64_t nb) {    \
        __m256 acc = _mm256_setzero_ps();                                                          \
        float summ = 0.0f;                                                                         \
        for (int64_t i = 0; i < nb; i++) {                                                         \
            const __m256i q = unpack_nibbles(w[i].qs);                                             \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)x[i].qs);                       \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * x[i].d), DOTU8(q, xv), acc);        \
            summ += h2f(w[i].m) * x[i].s;                                                          \
        }                                                                                          \
        return hsum256(acc) + summ;                                                                \
    }                                                                                              \
    ATTR static float dot_q4_0_##SUFFIX(const blk_q4_0 *w, const vk_block_q8a *x, int64_t nb) {    \
        __m256 acc = _mm256_setzero_ps();                                                          \
        float summ = 0.0f;                                                                         \
        for (int64_t i = 0; i < nb; i++) {                                                         \
            const __m256i q = unpack_nibbles(w[i].qs);                                             \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)x[i].qs);                       \
            const float d = h2f(w[i].d);                                                           \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x[i].d), DOTU8(q, xv), acc);                  \
            summ -= 8.0f * d * x[i].s;                                                             \
        }                                                                                          \
        return hsum256(acc) + summ;                                                                \
    }                                                                                              \
    ATTR static float dot_q8_0_##SUFFIX(const blk_q8_0 *w, const vk_block_q8a *x, int64_t nb) {    \
        __m256 acc = _mm256_setzero_ps();                                                          \
        for (int64_t i = 0; i < nb; i++) {                                                         \
            const __m256i wv = _mm256_loadu_si256((const __m256i *)w[i].qs);                       \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)x[i].qs);                       \
            /* |w| * sign(w) x: llama.cpp's trick to reuse the u8 x s8 product for s8 x s8 */       \
            const __m256 p = DOTU8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));            \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * x[i].d), p, acc);                   \
        }                                                                                          \
        return hsum256(acc);                                                                       \
    }

DEFINE_Q4_DOTS(avx2, AVX2, dot_u8s8_avx2)
DEFINE_Q4_DOTS(vnni, VNNI, dot_u8s8_vnni)

// The same dot products of one weight row with nx <= VK_NXMAX activation rows (x + i * nb): the
// weight block is unpacked and its scales converted once for all rows, and each row's arithmetic
// is exactly the single-row kernel's (same operations in the same order), so results are
// bit-identical to nx calls of it. Batched decoding runs on these.
// A copy of the body for each row count, so its loops over rows unroll and the accumulators
// stay in registers.
#define VK_MULTI_DISPATCH(NAME, BLK, SUFFIX, ATTR)                                                                   \
    ATTR static void dot_##NAME##_multi_##SUFFIX(const BLK *w, const vk_block_q8a *x, int64_t nb, int64_t nx, float *out) { \
        switch (nx) {                                                                                                \
        case 1: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 1, out); break;                                           \
        case 2: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 2, out); break;                                           \
        case 3: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 3, out); break;                                           \
        case 4: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 4, out); break;                                           \
        case 5: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 5, out); break;                                           \
        case 6: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 6, out); break;                                           \
        case 7: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 7, out); break;                                           \
        default: dot_##NAME##_multi_body_##SUFFIX(w, x, nb, 8, out); break;                                          \
        }                                                                                                            \
    }

#define VK_NXMAX 8
#define DEFINE_MULTI_DOTS(SUFFIX, ATTR, DOTU8)                                                                       \
    ATTR static inline __attribute__((always_inline)) void dot_q4_1_multi_body_##SUFFIX(const blk_q4_1 *w, const vk_block_q8a *x, int64_t nb, int64_t nx, float *out) { \
        __m256 acc[VK_NXMAX];                                                                                        \
        float summ[VK_NXMAX];                                                                                        \
        for (int64_t j = 0; j < nx; j++) { acc[j] = _mm256_setzero_ps(); summ[j] = 0.0f; }                          \
        for (int64_t i = 0; i < nb; i++) {                                                                           \
            const __m256i q = unpack_nibbles(w[i].qs);                                                               \
            const float d = h2f(w[i].d), m = h2f(w[i].m);                                                            \
            for (int64_t j = 0; j < nx; j++) {                                                                       \
                const vk_block_q8a *xb = x + j * nb + i;                                                             \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)xb->qs);                                      \
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), DOTU8(q, xv), acc[j]);                           \
                summ[j] += m * xb->s;                                                                                \
            }                                                                                                        \
        }                                                                                                            \
        for (int64_t j = 0; j < nx; j++) out[j] = hsum256(acc[j]) + summ[j];                                         \
    }                                                                                                                \
    ATTR static inline __attribute__((always_inline)) void dot_q4_0_multi_body_##SUFFIX(const blk_q4_0 *w, const vk_block_q8a *x, int64_t nb, int64_t nx, float *out) { \
        __m256 acc[VK_NXMAX];                                                                                        \
        float summ[VK_NXMAX];                                                                                        \
        for (int64_t j = 0; j < nx; j++) { acc[j] = _mm256_setzero_ps(); summ[j] = 0.0f; }                          \
        for (int64_t i = 0; i < nb; i++) {                                                                           \
            const __m256i q = unpack_nibbles(w[i].qs);                                                               \
            const float d = h2f(w[i].d);                                                                             \
            for (int64_t j = 0; j < nx; j++) {                                                                       \
                const vk_block_q8a *xb = x + j * nb + i;                                                             \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)xb->qs);                                      \
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), DOTU8(q, xv), acc[j]);                           \
                summ[j] -= 8.0f * d * xb->s;                                                                         \
            }                                                                                                        \
        }                                                                                                            \
        for (int64_t j = 0; j < nx; j++) out[j] = hsum256(acc[j]) + summ[j];                                         \
    }                                                                                                                \
    ATTR static inline __attribute__((always_inline)) void dot_q8_0_multi_body_##SUFFIX(const blk_q8_0 *w, const vk_block_q8a *x, int64_t nb, int64_t nx, float *out) { \
        __m256 acc[VK_NXMAX];                                                                                        \
        for (int64_t j = 0; j < nx; j++) acc[j] = _mm256_setzero_ps();                                               \
        for (int64_t i = 0; i < nb; i++) {                                                                           \
            const __m256i wv = _mm256_loadu_si256((const __m256i *)w[i].qs);                                         \
            const __m256i aw = _mm256_sign_epi8(wv, wv);                                                             \
            const float d = h2f(w[i].d);                                                                             \
            for (int64_t j = 0; j < nx; j++) {                                                                       \
                const vk_block_q8a *xb = x + j * nb + i;                                                             \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)xb->qs);                                      \
                const __m256 p = DOTU8(aw, _mm256_sign_epi8(xv, wv));                                                \
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), p, acc[j]);                                      \
            }                                                                                                        \
        }                                                                                                            \
        for (int64_t j = 0; j < nx; j++) out[j] = hsum256(acc[j]);                                                   \
    } \
    VK_MULTI_DISPATCH(q4_1, blk_q4_1, SUFFIX, ATTR)                                                                  \
    VK_MULTI_DISPATCH(q4_0, blk_q4_0, SUFFIX, ATTR)                                                                  \
    VK_MULTI_DISPATCH(q8_0, blk_q8_0, SUFFIX, ATTR)

DEFINE_MULTI_DOTS(avx2, AVX2, dot_u8s8_avx2)
DEFINE_MULTI_DOTS(vnni, VNNI, dot_u8s8_vnni)

// ---- interleaved weights (8 rows per group): the SIMD kernels -------------------------------
//
// A group holds block i of 8 consecutive rows together: their 8 scales (and mins), then their
// quant bytes. One activation block serves the 8 rows, their integer block sums end in one
// vector (lane k = row k: Q8_0 reduces 8 rows' vectors into it, Q4's chunk layout has lane k =
// row k from the start), and the scales are converted 8 at a time. Each lane's arithmetic is
// one fused multiply-add per block in block order (see the scalar versions below, which compute
// exactly the same floats).

// lane k = the sum of the 8 int32 lanes of p[k].
AVX2 static inline __m256i sum8x8_epi32(const __m256i p[8]) {
    const __m256i t01 = _mm256_hadd_epi32(p[0], p[1]), t23 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i t45 = _mm256_hadd_epi32(p[4], p[5]), t67 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i u0 = _mm256_hadd_epi32(t01, t23), u1 = _mm256_hadd_epi32(t45, t67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// u8 x s8 products of 32 lanes summed into 8 int32 lanes.
AVX2 static inline __m256i dot_u8s8_i32_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
VNNI static inline __m256i dot_u8s8_i32_vnni(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }

#define DEFINE_X8_Q8_0(SUFFIX, ATTR, DOTI)                                                                           \
    ATTR static void dot_q8_0_x8_##SUFFIX(const void *w, const vk_block_q8a *x, int64_t nb, float *out) {           \
        const blk8_q8_0 *b = w;                                                                                      \
        __m256 acc = _mm256_setzero_ps();                                                                            \
        for (int64_t i = 0; i < nb; i++) {                                                                           \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)x[i].qs);                                         \
            __m256i p[8];                                                                                            \
            for (int k = 0; k < 8; k++) {                                                                            \
                const __m256i wv = _mm256_loadu_si256((const __m256i *)b[i].qs[k]);                                  \
                p[k] = DOTI(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));                                     \
            }                                                                                                        \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b[i].d));                              \
            acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x[i].d)), _mm256_cvtepi32_ps(sum8x8_epi32(p)), acc); \
        }                                                                                                            \
        _mm256_storeu_ps(out, acc);                                                                                  \
    }

DEFINE_X8_Q8_0(avx2, AVX2, dot_u8s8_i32_avx2)
DEFINE_X8_Q8_0(vnni, VNNI, dot_u8s8_i32_vnni)

// The Q4 kernels, for nx <= VK_X8_NX input rows at once (x + j * nb, out + 8 * j): each group
// block's nibbles are unpacked once for all of them (four chunks, each into its low and high
// nibbles: 32-bit lane k holds 4 of row k's weights), then per input row: each of the 8 vectors
// times the 4 matching activations broadcast to every lane, summed lane by lane (no horizontal
// sums), one fused multiply-add for the scale and one for the offset (Q4_1's mins, Q4_0's -8 d).
// AVX2 sums the 8 u8 x s8 products in int16 (each |lane| <= 8 * 2 * 15 * 128 = 30720, exact)
// and widens once; VNNI accumulates int32 directly. The block sums are exact integers either way.
#define X8_Q4_SUMS_AVX2(lo, hi, xs)                                                                                  \
    ({                                                                                                               \
        __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(xs[0]));                                         \
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[0], _mm256_set1_epi32(xs[4])));                          \
        for (int c = 1; c < 4; c++) {                                                                                \
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(xs[c])));                      \
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(xs[4 + c])));                  \
        }                                                                                                            \
        _mm256_madd_epi16(s16, _mm256_set1_epi16(1));                                                                \
    })
#define X8_Q4_SUMS_VNNI(lo, hi, xs)                                                                                  \
    ({                                                                                                               \
        __m256i s32 = _mm256_setzero_si256();                                                                        \
        for (int c = 0; c < 4; c++) {                                                                                \
            s32 = _mm256_dpbusd_epi32(s32, lo[c], _mm256_set1_epi32(xs[c]));                                         \
            s32 = _mm256_dpbusd_epi32(s32, hi[c], _mm256_set1_epi32(xs[4 + c]));                                     \
        }                                                                                                            \
        s32;                                                                                                         \
    })
#define DEFINE_X8_MULTI(SUFFIX, ATTR, SUMS)                                                                          \
    ATTR static inline __attribute__((always_inline)) void dot_q4_x8_multi_body_##SUFFIX(                            \
        const void *w, int q4_1, const vk_block_q8a *x, int64_t nb, int64_t nx, float *out) {                       \
        const size_t gb = q4_1 ? sizeof(blk8_q4_1) : sizeof(blk8_q4_0);                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0f);                                                                   \
        __m256 acc[VK_X8_NX], off[VK_X8_NX];                                                                         \
        for (int64_t j = 0; j < nx; j++) acc[j] = off[j] = _mm256_setzero_ps();                                      \
        for (int64_t i = 0; i < nb; i++) {                                                                           \
            const uint8_t *blk = (const uint8_t *)w + (size_t)i * gb;                                                \
            const uint8_t(*qs)[8][4] = q4_1 ? ((const blk8_q4_1 *)blk)->qs : ((const blk8_q4_0 *)blk)->qs;          \
            __m256i lo[4], hi[4];                                                                                    \
            for (int c = 0; c < 4; c++) {                                                                            \
                const __m256i v = _mm256_loadu_si256((const __m256i *)qs[c]);                                        \
                lo[c] = _mm256_and_si256(v, m4);                        /* elements 4c..4c+3 of each row */          \
                hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4); /* elements 16+4c..16+4c+3 */                \
            }                                                                                                        \
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));                                 \
            const __m256 m = q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))) : d;               \
            for (int64_t j = 0; j < nx; j++) {                                                                       \
                const vk_block_q8a *xb = x + j * nb + i;                                                             \
                int32_t xs[8];                                                                                       \
                memcpy(xs, xb->qs, 32);                                                                              \
                const __m256i sums = SUMS(lo, hi, xs);                                                               \
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)), _mm256_cvtepi32_ps(sums), acc[j]);   \
                off[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(q4_1 ? xb->s : -8.0f * xb->s), off[j]);                   \
            }                                                                                                        \
        }                                                                                                            \
        for (int64_t j = 0; j < nx; j++) _mm256_storeu_ps(out + 8 * j, _mm256_add_ps(acc[j], off[j]));              \
    }                                                                                                                \
    ATTR static void dot_q4_x8_multi_##SUFFIX(const void *w, int q4_1, const vk_block_q8a *x, int64_t nb, int64_t nx, \
                                              float *out) {                                                          \
        switch (nx) {                                                                                                \
        case 1: dot_q4_x8_multi_body_##SUFFIX(w, q4_1, x, nb, 1, out); break;                                        \
        case 2: dot_q4_x8_multi_body_##SUFFIX(w, q4_1, x, nb, 2, out); break;                                        \
        case 3: dot_q4_x8_multi_body_##SUFFIX(w, q4_1, x, nb, 3, out); break;                                        \
        default: dot_q4_x8_multi_body_##SUFFIX(w, q4_1, x, nb, 4, out); break;                                       \
        }                                                                                                            \
    }

DEFINE_X8_MULTI(avx2, AVX2, X8_Q4_SUMS_AVX2)
DEFINE_X8_MULTI(vnni, VNNI, X8_Q4_SUMS_VNNI)

// One input row: the same body, so one row alone and one row of a batch are the same arithmetic
// by construction.
#define DEFINE_X8_Q4_SINGLE(SUFFIX, ATTR)                                                                            \
    ATTR static void dot_q4_1_x8_##SUFFIX(const void *w, const vk_block_q8a *x, int64_t nb, float *out) {           \
        dot_q4_x8_multi_body_##SUFFIX(w, 1, x, nb, 1, out);                                                          \
    }                                                                                                                \
    ATTR static void dot_q4_0_x8_##SUFFIX(const void *w, const vk_block_q8a *x, int64_t nb, float *out) {           \
        dot_q4_x8_multi_body_##SUFFIX(w, 0, x, nb, 1, out);                                                          \
    }

DEFINE_X8_Q4_SINGLE(avx2, AVX2)
DEFINE_X8_Q4_SINGLE(vnni, VNNI)

AVX2 static float dot_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float acc = hsum256(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

AVX2 static float dot_f16_avx2(const uint16_t *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 av = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i)));
        acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + i), acc);
    }
    float s = hsum256(acc);
    for (; i < n; i++) s += h2f(a[i]) * b[i];
    return s;
}

// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
AVX2 static float dot_bf16_avx2(const uint16_t *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(a + i)));
        const __m256 av = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + i), acc);
    }
    float s = hsum256(acc);
    for (; i < n; i++) s += vk_bf16_to_fp32(a[i]) * b[i];
    return s;
}
#endif

float vk_dot_row(int type, const void *row, const vk_block_q8a *xq, const float *xf, int64_t n) {
    const int p = path();
    const int64_t nb = n / VK_QK;
    switch (type) {
    case VK_TYPE_Q4_1:
#ifdef VK_X86
        if (p == PATH_VNNI) return dot_q4_1_vnni(row, xq, nb);
        if (p == PATH_AVX2) return dot_q4_1_avx2(row, xq, nb);
#endif
        return dot_q4_1_scalar(row, xq, nb);
    case VK_TYPE_Q4_0:
#ifdef VK_X86
        if (p == PATH_VNNI) return dot_q4_0_vnni(row, xq, nb);
        if (p == PATH_AVX2) return dot_q4_0_avx2(row, xq, nb);
#endif
        return dot_q4_0_scalar(row, xq, nb);
    case VK_TYPE_Q8_0:
#ifdef VK_X86
        if (p == PATH_VNNI) return dot_q8_0_vnni(row, xq, nb);
        if (p == PATH_AVX2) return dot_q8_0_avx2(row, xq, nb);
#endif
        return dot_q8_0_scalar(row, xq, nb);
    case VK_TYPE_F32:
#ifdef VK_X86
        if (p != PATH_SCALAR) return dot_f32_avx2(row, xf, n);
#endif
        return dot_f32_scalar(row, xf, n);
    case VK_TYPE_F16:
#ifdef VK_X86
        if (p != PATH_SCALAR) return dot_f16_avx2(row, xf, n);
#endif
        return dot_f16_scalar(row, xf, n);
    case VK_TYPE_BF16:
#ifdef VK_X86
        if (p != PATH_SCALAR) return dot_bf16_avx2(row, xf, n);
#endif
        return dot_bf16_scalar(row, xf, n);
    default: return 0.0f;
    }
}

// One element of a float-type row as f32.
static inline float float_at(int type, const uint8_t *row, int64_t c) {
    switch (type) {
    case VK_TYPE_F32: return ((const float *)row)[c];
    case VK_TYPE_F16: return h2f(((const uint16_t *)row)[c]);
    default: return vk_bf16_to_fp32(((const uint16_t *)row)[c]);
    }
}

#ifdef VK_X86
// Eight elements of a float-type row from column c on, as f32.
AVX2 static inline __m256 load8(int type, const uint8_t *row, int64_t c) {
    switch (type) {
    case VK_TYPE_F32: return _mm256_loadu_ps((const float *)row + c);
    case VK_TYPE_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + c)));
    default: {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + c)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    }
}

AVX2 static void combine_rows_avx2(int type, const uint8_t *w, size_t row_bytes, const float *x, int64_t n_rows,
                                   float *d, int64_t c0, int64_t c1) {
    int64_t c = c0;
    for (; c + 32 <= c1; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < n_rows; j++) {
            const uint8_t *row = w + (size_t)j * row_bytes;
            const __m256 xj = _mm256_set1_ps(x[j]);
            a0 = _mm256_fmadd_ps(xj, load8(type, row, c), a0);
            a1 = _mm256_fmadd_ps(xj, load8(type, row, c + 8), a1);
            a2 = _mm256_fmadd_ps(xj, load8(type, row, c + 16), a2);
            a3 = _mm256_fmadd_ps(xj, load8(type, row, c + 24), a3);
        }
        _mm256_storeu_ps(d + c, a0);
        _mm256_storeu_ps(d + c + 8, a1);
        _mm256_storeu_ps(d + c + 16, a2);
        _mm256_storeu_ps(d + c + 24, a3);
    }
    for (; c < c1; c++) {
        float acc = 0;
        for (int64_t j = 0; j < n_rows; j++) acc += x[j] * float_at(type, w + (size_t)j * row_bytes, c);
        d[c] = acc;
    }
}
#endif

void vk_combine_rows(int type, const void *w, size_t row_bytes, const float *x, int64_t n_rows, float *d, int64_t c0,
                     int64_t c1) {
#ifdef VK_X86
    if (path() != PATH_SCALAR) {
        combine_rows_avx2(type, w, row_bytes, x, n_rows, d, c0, c1);
        return;
    }
#endif
    const uint8_t *base = w;
    for (int64_t c = c0; c < c1; c++) {
        float acc = 0;
        for (int64_t j = 0; j < n_rows; j++) acc += x[j] * float_at(type, base + (size_t)j * row_bytes, c);
        d[c] = acc;
    }
}

void vk_matvec_rows(int type, const void *w, size_t row_bytes, const vk_block_q8a *xq,
                    const float *xf, float *y, int64_t n, int64_t r0, int64_t r1) {
    const uint8_t *base = w;
    for (int64_t r = r0; r < r1; r++) {
        y[r] = vk_dot_row(type, base + (size_t)r * row_bytes, xq, xf, n);
    }
}

void vk_matvec_rows_multi(int type, const void *w, size_t row_bytes, const vk_block_q8a *xq, const float *xf, float *y,
                          int64_t n, int64_t nx, int64_t y_stride, int64_t r0, int64_t r1) {
    const uint8_t *base = w;
    const int64_t nb = n / VK_QK;
#ifdef VK_X86
    const int p = path();
    if (p != PATH_SCALAR && nx > 1 && xq && (type == VK_TYPE_Q4_1 || type == VK_TYPE_Q4_0 || type == VK_TYPE_Q8_0)) {
        float out[VK_NXMAX];
        for (int64_t r = r0; r < r1; r++) {
            const void *row = base + (size_t)r * row_bytes;
            for (int64_t i0 = 0; i0 < nx; i0 += VK_NXMAX) {
                const int64_t m = nx - i0 < VK_NXMAX ? nx - i0 : VK_NXMAX;
                const vk_block_q8a *x = xq + i0 * nb;
                switch (type) {
                case VK_TYPE_Q4_1:
                    if (p == PATH_VNNI) dot_q4_1_multi_vnni(row, x, nb, m, out); else dot_q4_1_multi_avx2(row, x, nb, m, out);
                    break;
                case VK_TYPE_Q4_0:
                    if (p == PATH_VNNI) dot_q4_0_multi_vnni(row, x, nb, m, out); else dot_q4_0_multi_avx2(row, x, nb, m, out);
                    break;
                default:
                    if (p == PATH_VNNI) dot_q8_0_multi_vnni(row, x, nb, m, out); else dot_q8_0_multi_avx2(row, x, nb, m, out);
                    break;
                }
                for (int64_t i = 0; i < m; i++) y[(i0 + i) * y_stride + r] = out[i];
            }
        }
        return;
    }
    // One row of x (decoding one request): the kernel is chosen once, not per weight row.
#define VK_ROWS1(NAME, BLK)                                                                                          \
    if (p == PATH_VNNI) {                                                                                            \
        for (int64_t r = r0; r < r1; r++) y[r] = dot_##NAME##_vnni((const BLK *)(base + (size_t)r * row_bytes), xq, nb); \
    } else {                                                                                                         \
        for (int64_t r = r0; r < r1; r++) y[r] = dot_##NAME##_avx2((const BLK *)(base + (size_t)r * row_bytes), xq, nb); \
    }                                                                                                                \
    return;
    if (p != PATH_SCALAR && nx == 1 && xq) {
        switch (type) {
        case VK_TYPE_Q4_1: VK_ROWS1(q4_1, blk_q4_1)
        case VK_TYPE_Q4_0: VK_ROWS1(q4_0, blk_q4_0)
        case VK_TYPE_Q8_0: VK_ROWS1(q8_0, blk_q8_0)
        default: break;
        }
    }
#undef VK_ROWS1
#endif
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = base + (size_t)r * row_bytes;
        for (int64_t i = 0; i < nx; i++) {
            y[i * y_stride + r] = vk_dot_row(type, row, xq ? xq + i * nb : NULL, xf ? xf + i * n : NULL, n);
        }
    }
}

// ---- f16 rows (the f16 KV cache) -----------------------------------------------------------

#ifdef VK_X86
AVX2 static void f32_to_f16_avx2(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) dst[i] = vk_fp32_to_fp16(src[i]);
}

AVX2 static void f16_to_f32_avx2(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = h2f(src[i]);
}
#endif

void vk_f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
#ifdef VK_X86
    if (path() != PATH_SCALAR) {
        f32_to_f16_avx2(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = vk_fp32_to_fp16(src[i]);
}

void vk_f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
#ifdef VK_X86
    if (path() != PATH_SCALAR) {
        f16_to_f32_avx2(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = h2f(src[i]);
}

// ---- attention of a group of query heads over part of one KV head (decoding) ----------------

static inline float elem_at(int f16, const void *base, int64_t i) {
    return f16 ? h2f(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

#ifdef VK_X86
// Eight elements from element i of an f32 or f16 row, as f32.
AVX2 static inline __m256 load8kv(int f16, const void *base, int64_t i) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)))
               : _mm256_loadu_ps((const float *)base + i);
}

#define VK_HDMAX 256

AVX2 static void attend_group_avx2(int f16, const void *k, const void *v, int64_t stride, const float *q, int64_t G, int64_t hd,
                                   float scale, int64_t n, float *scores, float *m, float *l, float *o) {
    const size_t es = f16 ? 2 : 4;
    // scores[g][s] = scale * q_g . k_s, eight keys at a time: eight partial-sum vectors reduced
    // together by a transpose (three rounds of pairwise adds) instead of one horizontal sum per
    // key. A block of eight key rows stays in L1 while the G queries pass over it.
    const __m256 sv = _mm256_set1_ps(scale);
    int64_t s = 0;
    float kb[8 * VK_HDMAX];  // the block's keys as f32 (an f16 block is widened once, not once per query)
    for (; s + 8 <= n; s += 8) {
        const char *rows = (const char *)k + (size_t)(s * stride) * es;
        for (int j = 0; j < 8; j++)
            for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(kb + j * hd + i, load8kv(f16, rows + (size_t)(j * stride) * es, i));
        for (int64_t g = 0; g < G; g++) {
            __m256 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
            for (int64_t i = 0; i < hd; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + g * hd + i);
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(kb + j * hd + i), qv, a[j]);
            }
            const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
            const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
            const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
            const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
            _mm256_storeu_ps(scores + g * n + s, _mm256_mul_ps(r, sv));
        }
    }
    for (; s < n; s++) {
        const char *row = (const char *)k + (size_t)(s * stride) * es;
        for (int64_t g = 0; g < G; g++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t i = 0; i < hd; i += 8) acc = _mm256_fmadd_ps(load8kv(f16, row, i), _mm256_loadu_ps(q + g * hd + i), acc);
            scores[g * n + s] = scale * hsum256(acc);
        }
    }
    for (int64_t g = 0; g < G; g++) l[g] = (float)vk_exp_shifted(scores + g * n, n, m + g);
    // o[g] = sum_s p[g][s] v_s, 32 columns at a time: each value row is read once for all G.
    for (int64_t c = 0; c < hd; c += 32) {
        for (int64_t g0 = 0; g0 < G; g0 += 3) {
            const int64_t gn = G - g0 < 3 ? G - g0 : 3;
            __m256 a[3][4];
            for (int64_t g = 0; g < gn; g++)
                for (int j = 0; j < 4; j++) a[g][j] = _mm256_setzero_ps();
            for (int64_t s = 0; s < n; s++) {
                const char *row = (const char *)v + (size_t)(s * stride + c) * es;
                const __m256 v0 = load8kv(f16, row, 0), v1 = load8kv(f16, row, 8), v2 = load8kv(f16, row, 16),
                             v3 = load8kv(f16, row, 24);
                for (int64_t g = 0; g < gn; g++) {
                    const __m256 p = _mm256_set1_ps(scores[(g0 + g) * n + s]);
                    a[g][0] = _mm256_fmadd_ps(p, v0, a[g][0]);
                    a[g][1] = _mm256_fmadd_ps(p, v1, a[g][1]);
                    a[g][2] = _mm256_fmadd_ps(p, v2, a[g][2]);
                    a[g][3] = _mm256_fmadd_ps(p, v3, a[g][3]);
                }
            }
            for (int64_t g = 0; g < gn; g++)
                for (int j = 0; j < 4; j++) _mm256_storeu_ps(o + (g0 + g) * hd + c + 8 * j, a[g][j]);
        }
    }
}
#endif

void vk_attend_group(int f16, const void *k, const void *v, int64_t stride, const float *q, int64_t G, int64_t hd, float scale,
                     int64_t n, float *scores, float *m, float *l, float *o) {
#ifdef VK_X86
    if (path() != PATH_SCALAR && hd % 32 == 0 && hd <= VK_HDMAX && G <= VK_ATTEND_GMAX) {
        attend_group_avx2(f16, k, v, stride, q, G, hd, scale, n, scores, m, l, o);
        return;
    }
#endif
    for (int64_t s = 0; s < n; s++)
        for (int64_t g = 0; g < G; g++) {
            float acc = 0;
            for (int64_t i = 0; i < hd; i++) acc += elem_at(f16, k, s * stride + i) * q[g * hd + i];
            scores[g * n + s] = scale * acc;
        }
    for (int64_t g = 0; g < G; g++) l[g] = (float)vk_exp_shifted(scores + g * n, n, m + g);
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < hd; c++) {
            float acc = 0;
            for (int64_t s = 0; s < n; s++) acc += scores[g * n + s] * elem_at(f16, v, s * stride + c);
            o[g * hd + c] = acc;
        }
}

// ---- interleaved weights (8 rows per group) ------------------------------------------------

static size_t group_bytes(int type) {
    switch (type) {
    case VK_TYPE_Q4_0: return sizeof(blk8_q4_0);
    case VK_TYPE_Q4_1: return sizeof(blk8_q4_1);
    case VK_TYPE_Q8_0: return sizeof(blk8_q8_0);
    default: return 0;
    }
}

size_t vk_x8_bytes(int type, int64_t rows, int64_t n) {
    if (rows < 0 || n < 0 || n % VK_QK || !group_bytes(type)) return 0;
    return (size_t)((rows + 7) / 8) * (size_t)(n / VK_QK) * group_bytes(type);
}

int vk_repack_x8(int type, const void *src, size_t row_bytes, int64_t rows, int64_t n, void *dst) {
    const size_t gb = group_bytes(type);
    if (!gb || rows < 0 || n % VK_QK || row_bytes != vk_row_bytes(type, n)) return -1;
    const int64_t nb = n / VK_QK, groups = (rows + 7) / 8;
    memset(dst, 0, vk_x8_bytes(type, rows, n));  // rows past the end of the last group: zero scales
    const uint8_t *in = src;
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t k = 0; k < 8 && g * 8 + k < rows; k++) {
            const uint8_t *row = in + (size_t)(g * 8 + k) * row_bytes;
            for (int64_t i = 0; i < nb; i++) {
                void *out = (uint8_t *)dst + (size_t)(g * nb + i) * gb;
                switch (type) {
                case VK_TYPE_Q4_0: {
                    const blk_q4_0 *b = (const blk_q4_0 *)row + i;
                    blk8_q4_0 *o = out;
                    o->d[k] = b->d;
                    for (int c = 0; c < 4; c++) memcpy(o->qs[c][k], b->qs + 4 * c, 4);
                    break;
                }
                case VK_TYPE_Q4_1: {
                    const blk_q4_1 *b = (const blk_q4_1 *)row + i;
                    blk8_q4_1 *o = out;
                    o->d[k] = b->d;
                    o->m[k] = b->m;
                    for (int c = 0; c < 4; c++) memcpy(o->qs[c][k], b->qs + 4 * c, 4);
                    break;
                }
                default: {
                    const blk_q8_0 *b = (const blk_q8_0 *)row + i;
                    blk8_q8_0 *o = out;
                    o->d[k] = b->d;
                    memcpy(o->qs[k], b->qs, 32);
                    break;
                }
                }
            }
        }
    }
    return 0;
}

// Row k's 16 quant bytes of an interleaved Q4 block, in the model file's order.
static inline void x8_q4_row(const uint8_t (*qs)[8][4], int64_t k, uint8_t out[16]) {
    for (int c = 0; c < 4; c++) memcpy(out + 4 * c, qs[c][k], 4);
}

void vk_dequantize_rows_x8(int type, const void *w, int64_t n, int64_t r0, int64_t r1, float *dst) {
    pthread_once(&dispatch_once, dispatch_init);
    const size_t gb = group_bytes(type);
    const int64_t nb = n / VK_QK;
    // Group by group: a group's blocks (nb * gb bytes) are read once for its rows in the range,
    // each block's rows written to their own output rows.
    for (int64_t g = r0 / 8; g * 8 < r1; g++) {
        const int64_t k0 = g * 8 < r0 ? r0 - g * 8 : 0, k1 = g * 8 + 8 > r1 ? r1 - g * 8 : 8;
        float *out = dst + (g * 8 + k0 - r0) * n;  // row g*8+k0 of the range
        const uint8_t *group = (const uint8_t *)w + (size_t)(g * nb) * gb;
        switch (type) {
        case VK_TYPE_Q4_0:
            for (int64_t i = 0; i < nb; i++) {
                const blk8_q4_0 *b = (const blk8_q4_0 *)(group + (size_t)i * gb);
                for (int64_t k = k0; k < k1; k++) {
                    uint8_t qs[16];
                    x8_q4_row(b->qs, k, qs);
                    dequantize_q4_0(b->d[k], qs, out + (k - k0) * n + i * VK_QK);
                }
            }
            break;
        case VK_TYPE_Q4_1:
            for (int64_t i = 0; i < nb; i++) {
                const blk8_q4_1 *b = (const blk8_q4_1 *)(group + (size_t)i * gb);
                for (int64_t k = k0; k < k1; k++) {
                    uint8_t qs[16];
                    x8_q4_row(b->qs, k, qs);
                    dequantize_q4_1(b->d[k], b->m[k], qs, out + (k - k0) * n + i * VK_QK);
                }
            }
            break;
        default:
            for (int64_t i = 0; i < nb; i++) {
                const blk8_q8_0 *b = (const blk8_q8_0 *)(group + (size_t)i * gb);
                for (int64_t k = k0; k < k1; k++) dequantize_q8_0(b->d[k], b->qs[k], out + (k - k0) * n + i * VK_QK);
            }
            break;
        }
    }
}

// The scalar kernels compute exactly what the SIMD ones do: exact integer block sums, then per
// block one fused multiply-add into each row's accumulator (and its offset term), added at the
// end. fmaf rounds once, as _mm256_fmadd_ps does.
static void dot_q4_x8_scalar(const void *w, int q4_1, const vk_block_q8a *x, int64_t nb, float *out) {
    const size_t gb = q4_1 ? sizeof(blk8_q4_1) : sizeof(blk8_q4_0);
    for (int k = 0; k < 8; k++) {
        float acc = 0.0f, off = 0.0f;
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *blk = (const uint8_t *)w + (size_t)i * gb;
            uint8_t qs[16];
            x8_q4_row(q4_1 ? ((const blk8_q4_1 *)blk)->qs : ((const blk8_q4_0 *)blk)->qs, k, qs);
            const float d = h2f(((const uint16_t *)blk)[k]);
            int s = 0;
            for (int j = 0; j < 16; j++) s += (qs[j] & 0x0f) * x[i].qs[j] + (qs[j] >> 4) * x[i].qs[j + 16];
            acc = fmaf(d * x[i].d, (float)s, acc);
            // Q4_1: + m * sum(x); Q4_0: - 8 d * sum(x).
            off = q4_1 ? fmaf(h2f(((const blk8_q4_1 *)blk)->m[k]), x[i].s, off) : fmaf(d, -8.0f * x[i].s, off);
        }
        out[k] = acc + off;
    }
}

static void dot_q4_1_x8_scalar(const void *w, const vk_block_q8a *x, int64_t nb, float *out) { dot_q4_x8_scalar(w, 1, x, nb, out); }
static void dot_q4_0_x8_scalar(const void *w, const vk_block_q8a *x, int64_t nb, float *out) { dot_q4_x8_scalar(w, 0, x, nb, out); }

static void dot_q8_0_x8_scalar(const void *w, const vk_block_q8a *x, int64_t nb, float *out) {
    const blk8_q8_0 *b = w;
    for (int k = 0; k < 8; k++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < nb; i++) {
            int s = 0;
            for (int j = 0; j < 32; j++) s += b[i].qs[k][j] * x[i].qs[j];
            acc = fmaf(h2f(b[i].d[k]) * x[i].d, (float)s, acc);
        }
        out[k] = acc;
    }
}

typedef void (*x8_dot_fn)(const void *w, const vk_block_q8a *x, int64_t nb, float *out);

static x8_dot_fn x8_kernel(int type) {
    const int p = path();
#ifdef VK_X86
    if (p == PATH_VNNI) return type == VK_TYPE_Q4_1 ? dot_q4_1_x8_vnni : type == VK_TYPE_Q4_0 ? dot_q4_0_x8_vnni : dot_q8_0_x8_vnni;
    if (p == PATH_AVX2) return type == VK_TYPE_Q4_1 ? dot_q4_1_x8_avx2 : type == VK_TYPE_Q4_0 ? dot_q4_0_x8_avx2 : dot_q8_0_x8_avx2;
#else
    (void)p;
#endif
    return type == VK_TYPE_Q4_1 ? dot_q4_1_x8_scalar : type == VK_TYPE_Q4_0 ? dot_q4_0_x8_scalar : dot_q8_0_x8_scalar;
}

void vk_matvec_x8(int type, const void *w, const vk_block_q8a *xq, float *y, int64_t n, int64_t nx, int64_t y_stride, int64_t r0,
                  int64_t r1) {
    const size_t gb = group_bytes(type);
    if (!gb || r0 >= r1) return;
    const x8_dot_fn dot = x8_kernel(type);
    const int64_t nb = n / VK_QK;
#ifdef VK_X86
    // Several input rows over a Q4 matrix: the kernels that unpack each block once for up to
    // VK_X8_NX rows (the same floats as the single-row kernel).
    const int p = path();
    const int multi = nx > 1 && p != PATH_SCALAR && (type == VK_TYPE_Q4_1 || type == VK_TYPE_Q4_0);
#else
    const int multi = 0;
#endif
    float out[8 * VK_X8_NX];
    for (int64_t g = r0 / 8; g * 8 < r1; g++) {
        const void *group = (const uint8_t *)w + (size_t)(g * nb) * gb;
        const int64_t k0 = g * 8 < r0 ? r0 - g * 8 : 0, k1 = g * 8 + 8 > r1 ? r1 - g * 8 : 8;
        // The input rows one chunk after another over the same group: its weights (nb * gb
        // bytes, a few KB) come from memory once and from L1 for the other chunks.
        for (int64_t j0 = 0; j0 < nx;) {
            int64_t m = 1;
            if (multi) {
                m = nx - j0 < VK_X8_NX ? nx - j0 : VK_X8_NX;
#ifdef VK_X86
                if (p == PATH_VNNI) dot_q4_x8_multi_vnni(group, type == VK_TYPE_Q4_1, xq + j0 * nb, nb, m, out);
                else dot_q4_x8_multi_avx2(group, type == VK_TYPE_Q4_1, xq + j0 * nb, nb, m, out);
#endif
            } else {
                dot(group, xq + j0 * nb, nb, out);
            }
            for (int64_t j = 0; j < m; j++)
                for (int64_t k = k0; k < k1; k++) y[(j0 + j) * y_stride + g * 8 + k] = out[8 * j + k];
            j0 += m;
        }
    }
}
