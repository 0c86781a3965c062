/* One row of logits -> log-sum-exp, with SIMD paths chosen at run time.
 *
 * Why two passes per row: the max must be known before any exponential is taken (stability),
 * and a row of V <= 50257 floats (<= 200 KB) stays in L2 between the passes, so memory still
 * sees each logit once.  While a row is being summed, the next row is prefetched, so reading
 * memory overlaps the exp arithmetic instead of alternating with it.
 *
 * Why a hand-written exp: libm's expf does not vectorise without -ffast-math, and fast-math is
 * off the table (-inf logits are legal, NaN must propagate).  The Cephes expf polynomial has a
 * relative error near 1e-7, far below the 2e-5 the kernel promises, and it is written so that
 * a NaN input stays NaN (the clamp keeps its NaN operand, see exp_* below).
 */
#include "lmonnx_xent.h"

#include <math.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LMX_X86_DISPATCH 1
#include <immintrin.h>
#endif

/* Exponentials are summed in float32 lanes over blocks of this many floats, then the block
 * totals in float64: a lane adds at most LMX_BLOCK / 8 terms, which bounds its relative
 * rounding error near 1e-6 even for V = 50257, where one float32 accumulator would drift to
 * about 1e-4. */
#define LMX_BLOCK 1024

/* Cephes expf: exp(t) = 2^n * exp(r), n = round(t / ln 2), r = t - n ln 2 split in two parts. */
#define LMX_LOG2E 1.44269504088896341f
#define LMX_LN2_HI 0.693359375f
#define LMX_LN2_LO -2.12194440e-4f
#define LMX_P0 1.9875691500e-4f
#define LMX_P1 1.3981999507e-3f
#define LMX_P2 8.3334519073e-3f
#define LMX_P3 4.1665795894e-2f
#define LMX_P4 1.6666665459e-1f
#define LMX_P5 5.0000001201e-1f
/* Arguments here are x - max <= 0.  Below -87.3, exp underflows float32's normal range; the
 * clamp keeps 2^n a normal float and contributes < 1e-37 per term, nothing next to the max's 1. */
#define LMX_EXP_LO -87.3f

typedef double (*lmx_lse_fn)(const float *, int64_t, float *, const float *, int64_t);

/* ------------------------------------------------------------------ portable scalar path -- */

static double lse_scalar(const float *x, int64_t n, float *row_max,
                         const float *prefetch, int64_t prefetch_n)
{
    (void)prefetch;
    (void)prefetch_n;
    float m = -INFINITY;
    int has_nan = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (x[i] > m)
            m = x[i];
        else if (x[i] != x[i])
            has_nan = 1;
    }
    *row_max = m;
    if (has_nan)
        return NAN;
    double total = 0.0;
    for (int64_t b = 0; b < n; b += LMX_BLOCK) {
        int64_t e = b + LMX_BLOCK < n ? b + LMX_BLOCK : n;
        float block = 0.0f;
        for (int64_t i = b; i < e; ++i)
            block += expf(x[i] - m);
        total += (double)block;
    }
    return (double)m + log(total);
}

#ifdef LMX_X86_DISPATCH

/* ------------------------------------------------------------------------ AVX-512F path -- */

__attribute__((target("avx512f"))) static inline __m512 exp_nonpos_avx512(__m512 t)
{
    /* vmaxps returns its second operand when either is NaN, so a NaN t survives the clamp. */
    t = _mm512_max_ps(_mm512_set1_ps(LMX_EXP_LO), t);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(LMX_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LMX_LN2_HI), t);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LMX_LN2_LO), r);
    __m512 p = _mm512_set1_ps(LMX_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(LMX_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(LMX_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(LMX_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(LMX_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(LMX_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) static double lse_avx512(const float *x, int64_t n,
                                                             float *row_max,
                                                             const float *prefetch,
                                                             int64_t prefetch_n)
{
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
        m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + i + 32));
        m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + i + 48));
    }
    for (; i + 16 <= n; i += 16)
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(ninf, k, x + i));
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    *row_max = m;

    /* A NaN lost by vmaxps above reappears here: exp(NaN - m) is NaN and poisons the sum. */
    const __m512 vm = _mm512_set1_ps(m);
    const char *pf = (const char *)prefetch;
    const char *pf_end = prefetch ? (const char *)(prefetch + prefetch_n) : NULL;
    double total = 0.0;
    for (int64_t b = 0; b < n; b += LMX_BLOCK) {
        int64_t e = b + LMX_BLOCK < n ? b + LMX_BLOCK : n;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t j = b;
        for (; j + 32 <= e; j += 32) {
            if (pf < pf_end) { /* two cache lines of the next row per two vectors of this one */
                _mm_prefetch(pf, _MM_HINT_T1);
                _mm_prefetch(pf + 64, _MM_HINT_T1);
                pf += 128;
            }
            a0 = _mm512_add_ps(a0, exp_nonpos_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm)));
            a1 = _mm512_add_ps(a1,
                               exp_nonpos_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), vm)));
        }
        for (; j + 16 <= e; j += 16)
            a0 = _mm512_add_ps(a0, exp_nonpos_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm)));
        if (j < e) {
            __mmask16 k = (__mmask16)((1u << (e - j)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(k, x + j);
            a1 = _mm512_mask_add_ps(a1, k, a1, exp_nonpos_avx512(_mm512_sub_ps(v, vm)));
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    for (; pf < pf_end; pf += 64)
        _mm_prefetch(pf, _MM_HINT_T1);
    return (double)m + log(total);
}

/* ---------------------------------------------------------------------- AVX2 + FMA path -- */

__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpos_avx2(__m256 t)
{
    t = _mm256_max_ps(_mm256_set1_ps(LMX_EXP_LO), t); /* keeps a NaN t, as above */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(LMX_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LMX_LN2_HI), t);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LMX_LN2_LO), r);
    __m256 p = _mm256_set1_ps(LMX_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(LMX_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(LMX_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(LMX_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(LMX_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(LMX_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n built in the exponent bits; n is in [-126, 0] after the clamp.  For a NaN t the bits
     * are garbage but p is already NaN, and NaN times anything stays NaN. */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static double lse_avx2(const float *x, int64_t n,
                                                            float *row_max,
                                                            const float *prefetch,
                                                            int64_t prefetch_n)
{
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
        m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + i + 16));
        m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + i + 24));
    }
    for (; i + 8 <= n; i += 8)
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    __m256 mv = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    float m = -INFINITY;
    for (int k = 0; k < 8; ++k)
        m = lanes[k] > m ? lanes[k] : m;
    int scalar_nan = 0;
    for (; i < n; ++i) {
        if (x[i] > m)
            m = x[i];
        else if (x[i] != x[i])
            scalar_nan = 1;
    }
    *row_max = m;
    if (scalar_nan)
        return NAN;

    const __m256 vm = _mm256_set1_ps(m);
    const char *pf = (const char *)prefetch;
    const char *pf_end = prefetch ? (const char *)(prefetch + prefetch_n) : NULL;
    double total = 0.0;
    for (int64_t b = 0; b < n; b += LMX_BLOCK) {
        int64_t e = b + LMX_BLOCK < n ? b + LMX_BLOCK : n;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t j = b;
        for (; j + 16 <= e; j += 16) {
            if (pf < pf_end) {
                _mm_prefetch(pf, _MM_HINT_T1);
                pf += 64;
            }
            a0 = _mm256_add_ps(a0, exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
            a1 = _mm256_add_ps(a1,
                               exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm)));
        }
        for (; j + 8 <= e; j += 8)
            a0 = _mm256_add_ps(a0, exp_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
        _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a1));
        float block = 0.0f;
        for (int k = 0; k < 8; ++k)
            block += lanes[k];
        for (; j < e; ++j)
            block += expf(x[j] - m);
        total += (double)block;
    }
    for (; pf < pf_end; pf += 64)
        _mm_prefetch(pf, _MM_HINT_T1);
    return (double)m + log(total);
}

#endif /* LMX_X86_DISPATCH */

/* ---------------------------------------------------------------------------- dispatch -- */

static lmx_lse_fn chosen_fn = 0;
static const char *chosen_name = "scalar";

static void choose_path(void)
{
#ifdef LMX_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        chosen_name = "avx512f";
        chosen_fn = lse_avx512;
        return;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        chosen_name = "avx2";
        chosen_fn = lse_avx2;
        return;
    }
#endif
    chosen_name = "scalar";
    chosen_fn = lse_scalar;
}

double lmx_logsumexp_row(const float *x, int64_t n, float *row_max, const float *prefetch,
                         int64_t prefetch_n)
{
    if (!chosen_fn)
        choose_path(); /* idempotent: a race between threads writes the same values */
    return chosen_fn(x, n, row_max, prefetch, prefetch_n);
}

const char *lmx_simd_path(void)
{
    if (!chosen_fn)
        choose_path();
    return chosen_name;
}

int lmx_force_simd_path(const char *name)
{
    if (strcmp(name, "scalar") == 0) {
        chosen_fn = lse_scalar;
        chosen_name = "scalar";
        return 0;
    }
#ifdef LMX_X86_DISPATCH
    __builtin_cpu_init();
    if (strcmp(name, "avx512f") == 0 && __builtin_cpu_supports("avx512f")) {
        chosen_fn = lse_avx512;
        chosen_name = "avx512f";
        return 0;
    }
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
        chosen_fn = lse_avx2;
        chosen_name = "avx2";
        return 0;
    }
#endif
    return -1;
}
