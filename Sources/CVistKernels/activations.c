// Softmax, SwiGLU and GELU over rows, with a vectorized exp. These run on every attention row and
// every feed-forward activation of a prefill (and of the vision encoder), where calling libm's
// expf or tanhf per element cost ~5-10% of the time.
#include "CVistKernels.h"

#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VK_X86 1
#endif

#ifdef VK_X86
#define AVX2 __attribute__((target("avx2,fma")))

// exp(x) = 2^k * exp(r), k = round(x / ln2), r = x - k ln2 (ln2 split in two for accuracy),
// exp(r) by a degree-6 Taylor/minimax polynomial on |r| <= ln2/2: relative error < 2e-7.
AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2 static float max_avx2(const float *x, int64_t n) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    float m = -INFINITY;
    float tmp[8];
    _mm256_storeu_ps(tmp, vm);
    for (int j = 0; j < 8; j++) m = fmaxf(m, tmp[j]);
    for (; i < n; i++) m = fmaxf(m, x[i]);
    return m;
}

AVX2 static double exp_shifted_avx2(float *x, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, vs);
    double sum = 0;
    for (int j = 0; j < 8; j++) sum += tmp[j];
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

AVX2 static void softmax_avx2(float *x, int64_t n) {
    const double sum = exp_shifted_avx2(x, n, max_avx2(x, n));
    const __m256 inv = _mm256_set1_ps((float)(1.0 / sum));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    for (; i < n; i++) x[i] *= (float)(1.0 / sum);
}

AVX2 static double vk_sum_exp_avx2(const float *x, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vs = _mm256_add_ps(vs, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
    float tmp[8];
    _mm256_storeu_ps(tmp, vs);
    double sum = 0;
    for (int j = 0; j < 8; j++) sum += tmp[j];
    for (; i < n; i++) sum += exp((double)(x[i] - m));
    return sum;
}

AVX2 static void swiglu_avx2(float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// GELU's tanh form through 0.5 (1 + tanh(u)) = sigmoid(2u): x / (1 + exp(-2u)),
// u = sqrt(2/pi) (x + 0.044715 x^3). No cancellation near 0 and none for large |x|.
AVX2 static void gelu_tanh_avx2(float *x, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(-2.0f * 0.7978845608028654f);
    const __m256 c3 = _mm256_set1_ps(0.044715f);
    for (; i + 8 <= n; i += 8) {
        const __m256 z = _mm256_loadu_ps(x + i);
        const __m256 u = _mm256_fmadd_ps(_mm256_mul_ps(c3, z), _mm256_mul_ps(z, z), z);
        _mm256_storeu_ps(x + i, _mm256_div_ps(z, _mm256_add_ps(one, exp256(_mm256_mul_ps(c, u)))));
    }
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-2.0f * 0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}
#endif

double vk_exp_shifted(float *x, int64_t n, float *max_out) {
    *max_out = -INFINITY;
    if (n <= 0) return 0;
#ifdef VK_X86
    if (vk_simd_level() > 0) {
        *max_out = max_avx2(x, n);
        return exp_shifted_avx2(x, n, *max_out);
    }
#endif
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = fmaxf(m, x[i]);
    *max_out = m;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

void vk_softmax(float *x, int64_t n) {
    if (n <= 0) return;
#ifdef VK_X86
    if (vk_simd_level() > 0) {
        softmax_avx2(x, n);
        return;
    }
#endif
    float m;
    const double sum = vk_exp_shifted(x, n, &m);
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void vk_swiglu(float *gate, const float *up, int64_t n) {
#ifdef VK_X86
    if (vk_simd_level() > 0) {
        swiglu_avx2(gate, up, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void vk_gelu_tanh(float *x, int64_t n) {
#ifdef VK_X86
    if (vk_simd_level() > 0) {
        gelu_tanh_avx2(x, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-2.0f * 0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

double vk_logsumexp(const float *x, int64_t n) {
    if (n <= 0) return -INFINITY;
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = fmaxf(m, x[i]);
    double sum = 0;
#ifdef VK_X86
    if (vk_simd_level() > 0) {
        sum = vk_sum_exp_avx2(x, n, m);
        return (double)m + log(sum);
    }
#endif
    for (int64_t i = 0; i < n; i++) sum += exp((double)(x[i] - m));
    return (double)m + log(sum);
}
