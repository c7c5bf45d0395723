// Prototype, not part of the build: the Q4_1 x q8 matrix-vector product as CVistKernels does it
// (one weight row at a time, ~20 µops per block of 32 weights) against an 8-row interleaved
// layout ({d[8], m[8], qs[8][16]}: the same 160 bytes as 8 blocks, so it can be repacked in
// place), whose 8 integer block sums are reduced into one vector and whose scales and mins are
// converted 8 at a time. Single thread, 12,288 x 576 random rows, one activation row.
//
//   gcc -O3 -mavx2 -mfma -mf16c scripts/prototypes/q4_1_repack.c -o /tmp/q4_1_repack -lm && /tmp/q4_1_repack
//
// 2026-12-02, AVX2 machine of BENCHMARKS.md, nothing else running, four runs: per-row 7.6-9.5
// GB/s, repacked 13.5-17.0 GB/s: 1.75x-1.79x; max relative difference 1.4e-4 (a different
// float order). See BENCHMARKS.md "Engine II" for what integrating it involves.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>
typedef struct { uint16_t d, m; uint8_t qs[16]; } blk;              // 20 bytes
typedef struct { float d, s; int8_t qs[32]; } xblk;                // activation block
typedef struct { uint16_t d[8], m[8]; uint8_t qs[8][16]; } blk8;   // 160 bytes
static float tab[65536];
static inline float h2f(uint16_t h) { return tab[h]; }
static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static inline __m256i unpack(const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
}
static inline float hsum(__m256 v) { __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a)); a = _mm_add_ss(a, _mm_movehdup_ps(a)); return _mm_cvtss_f32(a); }
static float dot1(const blk *w, const xblk *x, int nb) {
    __m256 acc = _mm256_setzero_ps(); float summ = 0;
    for (int i = 0; i < nb; i++) {
        __m256i q = unpack(w[i].qs), xv = _mm256_loadu_si256((const __m256i *)x[i].qs);
        __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), _mm256_set1_epi16(1)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * x[i].d), p, acc);
        summ += h2f(w[i].m) * x[i].s;
    }
    return hsum(acc) + summ;
}
static void dot8(const blk8 *w, const xblk *x, int nb, float *out) {
    __m256 acc = _mm256_setzero_ps(), summ = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < nb; i++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[i].qs);
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = _mm256_madd_epi16(_mm256_maddubs_epi16(unpack(w[i].qs[k]), xv), ones);
        __m256i t01 = _mm256_hadd_epi32(p[0], p[1]), t23 = _mm256_hadd_epi32(p[2], p[3]);
        __m256i t45 = _mm256_hadd_epi32(p[4], p[5]), t67 = _mm256_hadd_epi32(p[6], p[7]);
        __m256i u0 = _mm256_hadd_epi32(t01, t23), u1 = _mm256_hadd_epi32(t45, t67);
        __m256i s = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[i].d));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[i].m));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x[i].d)), _mm256_cvtepi32_ps(s), acc);
        summ = _mm256_fmadd_ps(m, _mm256_set1_ps(x[i].s), summ);
    }
    _mm256_storeu_ps(out, _mm256_add_ps(acc, summ));
}
int main(int argc, char **argv) {
    for (int i = 0; i < 65536; i++) tab[i] = _cvtsh_ss(i);
    const int rows = 1536 * 8, cols = 576, nb = cols / 32;   // ~ several layers' worth: not cache resident per pass
    const int reps = 400;
    blk *w = aligned_alloc(64, (size_t)rows * nb * sizeof(blk));
    blk8 *w8 = aligned_alloc(64, (size_t)rows * nb * sizeof(blk));
    xblk *x = aligned_alloc(64, nb * sizeof(xblk));
    srand(1);
    for (size_t i = 0; i < (size_t)rows * nb; i++) { w[i].d = _cvtss_sh((rand() % 1000) / 1e5f, 0); w[i].m = _cvtss_sh(-(rand() % 1000) / 1e5f, 0);
        for (int j = 0; j < 16; j++) w[i].qs[j] = rand(); }
    for (int i = 0; i < nb; i++) { x[i].d = 0.01f; x[i].s = 3; for (int j = 0; j < 32; j++) x[i].qs[j] = rand() % 255 - 127; }
    for (int g = 0; g < rows / 8; g++) for (int i = 0; i < nb; i++) for (int k = 0; k < 8; k++) {
        const blk *b = &w[(size_t)(g * 8 + k) * nb + i]; blk8 *o = &w8[(size_t)g * nb + i];
        o->d[k] = b->d; o->m[k] = b->m; memcpy(o->qs[k], b->qs, 16); }
    float *y1 = malloc(rows * 4), *y8 = malloc(rows * 4);
    double t0 = now();
    for (int r = 0; r < reps; r++) for (int i = 0; i < rows; i++) y1[i] = dot1(w + (size_t)i * nb, x, nb);
    double t1 = now();
    for (int r = 0; r < reps; r++) for (int g = 0; g < rows / 8; g++) dot8(w8 + (size_t)g * nb, x, nb, y8 + g * 8);
    double t2 = now();
    double maxrel = 0; for (int i = 0; i < rows; i++) { double e = fabs(y1[i] - y8[i]) / (fabs(y1[i]) + 1e-3); if (e > maxrel) maxrel = e; }
    double bytes = (double)rows * nb * 20 * reps;
    printf("per-row %.1f GB/s, repacked8 %.1f GB/s, speedup %.2fx, max rel diff %.2e\n", bytes / (t1 - t0) / 1e9, bytes / (t2 - t1) / 1e9, (t1 - t0) / (t2 - t1), maxrel);
}
