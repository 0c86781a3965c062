/* One row of logits -> log-sum-exp, with SIMD paths chosen at run time.
 *
 * Why two passes per row: the max must be known before any exponential is taken (stability),
 * and a row of V <= 50257 floats (<= 200 KB) stays in L2 between the passes, so memory still
 * sees each logit once.  While a row is being summed, a row further on is prefetched (the caller
 * picks which, see masked_xent.c), so reading memory overlaps the exp arithmetic instead of
 * alternating with it.
 *
 * Why a hand-written exp: libm's expf does not vectorise without -ffast-math, and fast-math is
 * off the table (-inf logits are legal, NaN must propagate).  The SIMD exps below use a table
 * of 2^(j/16) or 2^(j/8) and a degree-3 polynomial (relative error near 1e-7, far below the
 * 2e-5 the kernel promises; a degree-5 Cephes polynomial was as exact and 15-25% slower), and
 * they are written so that a NaN input stays NaN (the clamp keeps its NaN operand).
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

/* Arguments here are x - max <= 0.  Below -87.3, exp underflows float32's normal range; the
 * clamp keeps 2^k a normal float and contributes < 1e-37 per term, nothing next to the max's 1.
 * It also bounds k to [-126, 0], which the exponent-bit tricks of the exps below rely on. */
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

/* The table method of the AVX2 path below, with 16 entries (one vpermps over a zmm register):
 * exp(t) = 2^k * 2^(j/16) * exp(r), n = round(16 t / ln 2) = 16k + j, |r| <= ln 2 / 32, where
 * the degree-3 Taylor polynomial is within 1e-8 relative.  Less arithmetic than a degree-5
 * polynomial, which keeps this path below the memory time even for short rows. */
#define LMX_16_LOG2E 23.0831206542f     /* 16 / ln 2 */
#define LMX_LN2_16_HI 0.0433349609375f  /* ln 2 / 16, high part: exact times any n below 2^14 */
#define LMX_LN2_16_LO -1.32621525e-5f   /* ln 2 / 16, low part */

__attribute__((target("avx512f"))) static inline __m512 exp_nonpos_avx512(__m512 t)
{
    /* vmaxps returns its second operand when either is NaN, so a NaN t survives the clamp. */
    t = _mm512_max_ps(_mm512_set1_ps(LMX_EXP_LO), t);
    /* Bits of f: 16 (127 + k) + j in the low mantissa, as in exp_nonpos_avx2. */
    const __m512 shifter = _mm512_set1_ps(12582912.0f + 2032.0f);
    __m512 f = _mm512_fmadd_ps(t, _mm512_set1_ps(LMX_16_LOG2E), shifter);
    __m512 n = _mm512_sub_ps(f, shifter);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LMX_LN2_16_HI), t);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LMX_LN2_16_LO), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 6.0f), r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_castps_si512(f);
    const __m512 table = _mm512_setr_ps(
        1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
        1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f,
        1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f,
        1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f);
    p = _mm512_mul_ps(p, _mm512_permutexvar_ps(bits, table)); /* index: low 4 bits = j */
    /* (16 (127 + k) + j) with j cleared, shifted by 19: the float 2^k, k in [-126, 0]. */
    __m512i scale = _mm512_slli_epi32(_mm512_andnot_si512(_mm512_set1_epi32(15), bits), 19);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
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

/* With half the lanes of AVX-512, exp is this path's bottleneck (the logits arrive faster than
 * a degree-5 polynomial consumes them), hence the table method, with 8 entries here:
 * exp(t) = 2^k * 2^(j/8) * exp(r), with n = round(8 t / ln 2) = 8k + j, 2^(j/8) from an
 * 8-entry table held in one register (vpermps), and |r| <= ln 2 / 16, where the degree-3 Taylor
 * polynomial is within 1.5e-7 relative. */
#define LMX_8_LOG2E 11.5415603271f    /* 8 / ln 2 */
#define LMX_LN2_8_HI 0.086669921875f  /* ln 2 / 8, high part: exact times any n below 2^14 */
#define LMX_LN2_8_LO -2.65243050e-5f  /* ln 2 / 8, low part */

__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpos_avx2(__m256 t)
{
    t = _mm256_max_ps(_mm256_set1_ps(LMX_EXP_LO), t); /* keeps a NaN t, as above */
    /* n in one FMA: adding 1.5 * 2^23 rounds 8 t / ln 2 to an integer in the low mantissa
     * bits; the extra 127 * 8 biases it so that those bits are 8 (127 + k) + j, j in [0, 8). */
    const __m256 shifter = _mm256_set1_ps(12582912.0f + 1016.0f);
    __m256 f = _mm256_fmadd_ps(t, _mm256_set1_ps(LMX_8_LOG2E), shifter);
    __m256 n = _mm256_sub_ps(f, shifter);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LMX_LN2_8_HI), t);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LMX_LN2_8_LO), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 6.0f), r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_castps_si256(f);
    /* vpermps reads the low three bits of each index: exactly j. */
    const __m256 table = _mm256_setr_ps(1.0f, 1.09050773266525765921f, 1.18920711500272106672f,
                                        1.29683955465100966593f, 1.41421356237309504880f,
                                        1.54221082540794082361f, 1.68179283050742908606f,
                                        1.83400808640934246349f);
    p = _mm256_mul_ps(p, _mm256_permutevar8x32_ps(table, bits));
    /* (8 (127 + k) + j) with j cleared, shifted by 20, is (127 + k) << 23: the float 2^k, k in
     * [-126, 0] after the clamp.  For a NaN t these bits are garbage, but p is already NaN. */
    __m256i scale = _mm256_slli_epi32(_mm256_andnot_si256(_mm256_set1_epi32(7), bits), 20);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
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
