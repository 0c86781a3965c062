/* Many rows -> masked NLL and top-1 hits, in parallel over the rows that count.
 *
 * Rows whose weight is 0 (padding) are dropped up front into a list of active rows, so
 * padding costs neither memory traffic nor an uneven split of work between threads: the
 * OpenMP static schedule then hands each thread an equal share of real rows.
 */
#include "lmonnx_xent.h"

#include <math.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* While one row is summed, the row this many bytes of logits ahead (at least the next one) is
 * prefetched.  One row ahead is enough for long rows, but a short row (V = 1000 is 4 KB) is
 * summed faster than memory delivers the next one: prefetching ~16 KB ahead took V = 1000 from
 * 1.8x to 1.05x of the memory floor here (4096x10000-equivalent logits, 2 threads). */
#define LMX_PREFETCH_BYTES 16384

int lmx_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* 1 when `label` is the first index holding the row maximum, as argmax would report it. */
static int is_first_argmax(const float *row, int64_t label, float row_max)
{
    if (!(row[label] == row_max))
        return 0;
    int64_t j = 0;
    while (!(row[j] == row_max)) /* ends at `label` at the latest */
        ++j;
    return j == label;
}

int lmx_masked_xent(const float *logits, int64_t n_rows, int64_t V, const int64_t *labels,
                    const float *weights, double *nll_out, uint8_t *hit_out, float *max_out,
                    int num_threads, int64_t *bad_row)
{
    /* Check every counted label before reading any logits: no partial results on error. */
    int64_t n_active = 0;
    for (int64_t i = 0; i < n_rows; ++i) {
        if (weights && weights[i] == 0.0f)
            continue;
        if (labels[i] < 0 || labels[i] >= V) {
            *bad_row = i;
            return LMX_BAD_LABEL;
        }
        ++n_active;
    }

    int64_t *active = NULL;
    if (n_active > 0) {
        active = (int64_t *)malloc((size_t)n_active * sizeof(int64_t));
        if (!active)
            return LMX_NO_MEMORY;
    }
    int64_t k = 0;
    for (int64_t i = 0; i < n_rows; ++i) {
        if (weights && weights[i] == 0.0f) {
            nll_out[i] = 0.0;
            if (hit_out)
                hit_out[i] = 0;
            if (max_out)
                max_out[i] = -INFINITY;
        } else {
            active[k++] = i;
        }
    }

    (void)lmx_simd_path(); /* pick the SIMD path once, before threads start */
    int64_t ahead = LMX_PREFETCH_BYTES / (V * (int64_t)sizeof(float));
    if (ahead < 1)
        ahead = 1;
#ifdef _OPENMP
    if (num_threads <= 0)
        num_threads = omp_get_max_threads();
    if ((int64_t)num_threads > n_active)
        num_threads = n_active > 0 ? (int)n_active : 1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
#else
    (void)num_threads;
#endif
    for (int64_t a = 0; a < n_active; ++a) {
        int64_t i = active[a];
        const float *row = logits + i * V;
        const float *next = a + ahead < n_active ? logits + active[a + ahead] * V : NULL;
        float row_max;
        double lse = lmx_logsumexp_row(row, V, &row_max, next, V);
        double nll = lse - (double)row[labels[i]];
        nll_out[i] = weights ? (double)weights[i] * nll : nll;
        /* A row whose log-sum-exp is NaN (a NaN logit, or +inf minus +inf) has no meaningful
         * argmax: it never counts as a hit. */
        if (hit_out)
            hit_out[i] = (uint8_t)(lse == lse && is_first_argmax(row, labels[i], row_max));
        if (max_out)
            max_out[i] = row_max;
    }
    free(active);
    return LMX_OK;
}
