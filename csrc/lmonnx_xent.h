/* lmonnx C core: masked sparse softmax cross-entropy over float32 logits.
 *
 * Pure C99, no Python headers.  Two layers:
 *   logsumexp.c   one row: max, log-sum-exp and the max-shift, SIMD with runtime dispatch
 *                 (AVX-512F, AVX2+FMA, portable scalar), chosen once by a CPU check;
 *   masked_xent.c many rows: label checks, skipping masked rows, OpenMP over the rows that count.
 *
 * Units: every NLL here is in nats (natural log).
 */
#ifndef LMONNX_XENT_H
#define LMONNX_XENT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes of lmx_masked_xent. */
#define LMX_OK 0
#define LMX_BAD_LABEL 1   /* *bad_row holds the first unmasked row whose label is outside [0, V) */
#define LMX_NO_MEMORY 2

/* log(sum_j exp(x[j])) of one row of n >= 1 floats, computed as max + log(sum exp(x - max))
 * with the exponentials summed in float32 SIMD lanes over short blocks and the blocks in
 * float64.  Writes the row maximum to *row_max.  -inf entries are legal; a NaN anywhere gives
 * NaN.  `prefetch` (may be NULL) is a row of `prefetch_n` floats to pull into cache while this
 * one is being summed, so that memory reads of the next row overlap the arithmetic. */
double lmx_logsumexp_row(const float *x, int64_t n, float *row_max,
                         const float *prefetch, int64_t prefetch_n);

/* Name of the SIMD path the dispatcher picked: "avx512f", "avx2" or "scalar". */
const char *lmx_simd_path(void);

/* Force a SIMD path ("avx512f", "avx2", "scalar"), for tests and benchmarks.  Returns 0 when the
 * path is available on this CPU and now in use, -1 otherwise (nothing changes). */
int lmx_force_simd_path(const char *name);

/* Masked cross-entropy of n_rows rows of V logits (row-major, contiguous).
 *
 *   nll_out[i] = weights[i] * (logsumexp(logits[i, :]) - logits[i, labels[i]])   (nats)
 *   hit_out[i] = 1 when labels[i] is the first argmax of logits[i, :], weights[i] != 0 and
 *                nll_out[i] is not NaN
 *   max_out[i] = max_j logits[i, j] (what the log-sum-exp shifts by; unspecified for a row
 *                holding a NaN, whose NLL is NaN)
 *
 * A row with weights[i] == 0 is skipped: its logits are not read, its label not checked, and
 * nll_out[i] = 0, hit_out[i] = 0, max_out[i] = -inf.  weights == NULL means every row counts.
 * hit_out and max_out may be NULL.
 * num_threads <= 0 means the OpenMP default.  Labels of rows that count are checked before any
 * logits are read; on a bad one, returns LMX_BAD_LABEL with *bad_row set and outputs untouched. */
int lmx_masked_xent(const float *logits, int64_t n_rows, int64_t V,
                    const int64_t *labels, const float *weights,
                    double *nll_out, uint8_t *hit_out, float *max_out,
                    int num_threads, int64_t *bad_row);

/* 1 when the extension was built with OpenMP, else 0. */
int lmx_has_openmp(void);

#ifdef __cplusplus
}
#endif

#endif /* LMONNX_XENT_H */
