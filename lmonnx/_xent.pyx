# cython: language_level=3, boundscheck=False
"""Cython boundary of the masked cross-entropy kernel.

The layers, from the bottom up:
  1. csrc/logsumexp.c   - one row's log-sum-exp with SIMD chosen at run time (C, no Python);
  2. csrc/masked_xent.c - many rows: label checks, masked rows skipped, OpenMP over the rest;
  3. this module        - checks shapes and dtypes while holding the GIL, converts the small
                          arrays (labels, mask), then calls layer 2 with the GIL released;
  4. lmonnx/xent.py     - the public facade: reductions and the documented signature.

Logits are never copied when they are native-endian float32 and C-contiguous (read-only and
memory-mapped arrays included); non-contiguous or big-endian float32 logits are copied once
into a native C-contiguous array, float64 logits are refused rather than silently doubled in
memory.  Labels of any integer dtype but uint64 (any byte order) become native int64, masks of
any bool / integer / real float dtype (any byte order) become native float32 weights: each is
converted once, here, and the C kernel only ever sees native float32 logits and weights
and native int64 labels.
"""

import numpy as np

from libc.stdint cimport int64_t, uint8_t
from lmonnx.errors import ArgumentTypeError, InvalidArgumentError
from lmonnx.validation import check_int


cdef extern from "lmonnx_xent.h" nogil:
    int LMX_OK
    int LMX_BAD_LABEL
    int LMX_NO_MEMORY
    int lmx_masked_xent(const float *logits, int64_t n_rows, int64_t V,
                        const int64_t *labels, const float *weights,
                        double *nll_out, uint8_t *hit_out, float *max_out,
                        int num_threads, int64_t *bad_row)
    const char *lmx_simd_path()
    int lmx_force_simd_path(const char *name)
    int lmx_has_openmp()


def simd_path():
    """Name of the SIMD path in use: ``"avx512f"``, ``"avx2"`` or ``"scalar"``."""
    return lmx_simd_path().decode()


def force_simd_path(str name):
    """Use another SIMD path (tests and benchmarks); ``ValueError`` if this CPU lacks it."""
    if lmx_force_simd_path(name.encode()) != 0:
        raise InvalidArgumentError(f"SIMD path {name!r} is not available on this CPU")


def has_openmp():
    """True when the extension was built with OpenMP (else the kernel runs serially)."""
    return bool(lmx_has_openmp())


def _as_logits(logits):
    if not isinstance(logits, np.ndarray):
        logits = np.asarray(logits)
        if logits.dtype == np.float64:  # a nested list: it is being copied anyway
            logits = logits.astype(np.float32)
    # float32 in either byte order (dtype.kind/itemsize, since np.dtype(">f4") != np.float32).
    if logits.dtype.kind != "f" or logits.dtype.itemsize != 4:
        raise ArgumentTypeError(
            f"logits must be float32, got {logits.dtype}; convert with logits.astype(np.float32)")
    if logits.ndim < 1:
        raise InvalidArgumentError("logits must have at least one axis (the vocabulary axis [..., V])")
    if logits.shape[-1] < 1:
        raise InvalidArgumentError("logits have an empty vocabulary axis (V = 0)")
    if not logits.dtype.isnative:
        # The C kernel reads native floats.  Byte-swapping is the one copy a big-endian array
        # costs (same size, unlike a float64 -> float32 cast, which is refused above).
        return np.ascontiguousarray(logits, dtype=np.float32)
    return np.ascontiguousarray(logits)


def _as_labels(labels, expected_shape):
    labels = np.asarray(labels)
    # uint64 ids past 2**63 would wrap to negative int64 and be reported as a wrong label.
    if labels.dtype.kind not in "iu" or (labels.dtype.kind == "u" and labels.dtype.itemsize == 8):
        raise ArgumentTypeError(f"labels must be int32 or int64 token ids, got {labels.dtype}")
    if labels.shape != expected_shape:
        raise InvalidArgumentError(
            f"labels shape {labels.shape} does not match logits.shape[:-1] = {expected_shape}")
    # Native int64 whatever the width and byte order (no copy when it already is).
    return np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)


def mask_weights(mask):
    """The kernel's weights: ``mask`` as a native-endian, C-contiguous float32 array.

    mask: None, or an array [...] of any bool / integer / real floating dtype, either byte order
    (``np.sign(int32_inputs)`` gives int32, a float64 mask is common).  Converted with
    ``astype(float32)``, exactly the course's ``tf.cast(mask, tf.float32)``: a float64 weight
    that float32 rounds to 0 then skips its position.  Returns None for None, else float32 [...]
    of the same shape; a native float32 C-contiguous mask is returned as it is (no copy), so a
    caller may convert once and hand the result to ``masked_token_nll``.  Complex, object,
    string and date masks raise ``TypeError`` naming their dtype: they are not multipliers.
    """
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biuf":
        raise ArgumentTypeError(
            f"mask must have a bool, integer or real floating dtype (it is cast to float32 "
            f"weights), got {mask.dtype}")
    # asarray(order="C"), not ascontiguousarray, which would turn a 0-d mask into shape (1,).
    return np.asarray(mask, dtype=np.float32, order="C")


def _as_weights(mask, expected_shape):
    weights = mask_weights(mask)
    if weights is None:
        return None
    if weights.shape != expected_shape:
        raise InvalidArgumentError(
            f"mask shape {weights.shape} does not match labels shape {expected_shape}")
    return weights.reshape(-1)


def masked_token_nll(logits, labels, mask=None, bint want_hits=False, num_threads=None):
    """Per-position NLL (nats, float64) and optionally top-1 hits, in one pass over the logits.

    logits: float32 [..., V], either byte order (big-endian is copied once to native);
    labels: integer token ids [...], any width but uint64, either byte order (made int64 once);
    mask: None or [...] of any bool / integer / real float dtype, either byte order (made native
    float32 once, see ``mask_weights``; an already native float32 mask is used in place).
    Returns ``(nll, hits)``: nll float64 [...] = mask * (logsumexp(logits) - logits[label]),
    0 where the mask is 0; hits bool [...] (label is the first argmax, counted positions only)
    or None when ``want_hits`` is false.
    """
    nll, hits, _ = masked_token_stats(logits, labels, mask, want_hits, False, num_threads)
    return nll, hits


def masked_token_stats(logits, labels, mask=None, bint want_hits=False, bint want_max=False,
                       num_threads=None):
    """``masked_token_nll``'s ``(nll, hits)`` and, when ``want_max``, each row's maximum
    logit, float32 [...] (-inf where the mask is 0; unspecified for a row holding a NaN,
    whose NLL is NaN), else None: all from the same single pass over the logits."""
    logits = _as_logits(logits)
    shape = logits.shape[:-1]
    cdef int64_t V = logits.shape[-1]
    cdef int64_t n_rows = 1
    for d in shape:
        n_rows *= d
    labels_flat = _as_labels(labels, shape)
    weights_flat = _as_weights(mask, shape)

    cdef int threads = 0
    if num_threads is not None:
        threads = <int>min(check_int("num_threads", num_threads), 1 << 16)

    nll = np.empty(n_rows, dtype=np.float64)
    hits = np.empty(n_rows, dtype=np.uint8) if want_hits else None
    maxima = np.empty(n_rows, dtype=np.float32) if want_max else None
    if n_rows == 0:
        return (nll.reshape(shape), hits.astype(bool).reshape(shape) if want_hits else None,
                maxima.reshape(shape) if want_max else None)

    cdef const float[:, ::1] x = logits.reshape(n_rows, V)
    cdef const int64_t[::1] y = labels_flat
    cdef const float[::1] w
    cdef const float *w_ptr = NULL
    if weights_flat is not None:
        w = weights_flat
        w_ptr = &w[0]
    cdef double[::1] out = nll
    cdef uint8_t[::1] hit_view
    cdef uint8_t *hit_ptr = NULL
    if want_hits:
        hit_view = hits
        hit_ptr = &hit_view[0]
    cdef float[::1] max_view
    cdef float *max_ptr = NULL
    if want_max:
        max_view = maxima
        max_ptr = &max_view[0]
    cdef int64_t bad_row = -1
    cdef int rc
    with nogil:
        rc = lmx_masked_xent(&x[0, 0], n_rows, V, &y[0], w_ptr, &out[0], hit_ptr, max_ptr,
                             threads, &bad_row)
    if rc == LMX_BAD_LABEL:
        position = tuple(int(i) for i in np.unravel_index(bad_row, shape)) if shape else ()
        raise InvalidArgumentError(
            f"label {int(labels_flat[bad_row])} at position {position} is outside the "
            f"vocabulary [0, {V}); masked positions are not checked")
    if rc == LMX_NO_MEMORY:
        raise MemoryError("lmonnx kernel could not allocate its row index")
    return (nll.reshape(shape), hits.view(np.bool_).reshape(shape) if want_hits else None,
            maxima.reshape(shape) if want_max else None)
