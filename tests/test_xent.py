"""Tests of the masked cross-entropy kernel against a float64 NumPy reference and its peers.

What is checked, in order: the course's example by hand; the stacked grid (vocabulary size x
label dtype x mask kind x threads x SIMD path x reduction); top-1 hits; input dtypes (every
mask dtype, big-endian logits, labels and masks); memory layouts (read-only, memmap,
non-contiguous); numerics (+-1e4, -inf, NaN); every error path; the OpenMP build; hypothesis
properties; agreement with ONNX's SoftmaxCrossEntropyLoss (onnxruntime and the ONNX reference
evaluator) and with TensorFlow's op times the mask, the course's loss.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lmonnx import _xent, masked_cross_entropy, token_nll_and_hits
from lmonnx.xent import token_nll_hits_and_max

RTOL = 2e-5
"""Promised precision, relative to the float64 reference."""
ATOL_PER_TOKEN = 1e-5
"""A token whose NLL is near 0 (its label dominates the row) cannot be relatively exact: the
exponentials are summed in float32, so log(sum) carries an absolute error near 1e-7.  This
floor, per counted token, is far below any NLL that matters."""

REDUCTIONS = ("none", "sum", "mean", "sequence")
VOCAB_SIZES = (1, 2, 7, 1000, 50257)
MASK_KINDS = ("none", "bool", "uint8", "float", "all-zero", "lengths")


# --------------------------------------------------------------------------- reference ---

def reference_nll(logits, labels, mask=None) -> np.ndarray:
    """float64 [...]: mask * (logsumexp(logits) - logits[label]); masked rows are never read."""
    x = np.asarray(logits)
    y = np.asarray(labels)
    w = np.ones(y.shape) if mask is None else np.asarray(mask, dtype=np.float64)
    out = np.zeros(y.shape, dtype=np.float64)
    keep = w != 0
    rows = x[keep].astype(np.float64)
    if rows.shape[0]:
        with np.errstate(invalid="ignore", over="ignore"):
            m = rows.max(axis=-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=-1))
            picked = rows[np.arange(rows.shape[0]), y[keep].astype(np.int64)]
            out[keep] = w[keep] * (lse - picked)
    return out


def reference(logits, labels, mask=None, reduction="sum"):
    nll = reference_nll(logits, labels, mask)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        weight = nll.size if mask is None else np.asarray(mask, dtype=np.float64).sum()
        return nll.sum() / weight if weight else math.nan
    return nll.sum(axis=-1)


def counted(labels, mask) -> int:
    return int(np.size(labels) if mask is None else np.count_nonzero(mask))


def assert_matches(actual, expected, n_tokens=1):
    """Within RTOL of the reference, plus the per-token floor explained at ATOL_PER_TOKEN."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=RTOL,
                               atol=ATOL_PER_TOKEN * max(n_tokens, 1))


# ----------------------------------------------------------------------------- inputs ---

def _make_mask(kind: str, shape, rng):
    if kind == "none":
        return None
    if kind == "bool":
        mask = rng.random(shape) < 0.7
        mask.flat[0] = True  # at least one counted token
        return mask
    if kind == "uint8":
        mask = (rng.random(shape) < 0.7).astype(np.uint8)
        mask.flat[0] = 1
        return mask
    if kind == "float":  # a multiplier, not only 0/1, as loss * tf.cast(mask, tf.float32) is
        mask = rng.choice(np.array([0.0, 0.5, 1.0, 2.0], dtype=np.float32), size=shape)
        mask.flat[0] = 1.0
        return mask
    if kind == "all-zero":
        return np.zeros(shape, dtype=bool)
    if kind == "lengths":  # right padding, one length per sentence, one of them empty
        batch, time = shape
        lengths = np.array([time, 1, 0, time - 1][:batch])
        return np.arange(time)[None, :] < lengths[:, None]
    raise AssertionError(kind)


@functools.lru_cache(maxsize=None)
def case(vocab: int, label_dtype: str, mask_kind: str):
    """Logits [batch, time, V], labels and mask; masked labels are out of range on purpose."""
    rng = np.random.default_rng(vocab * 7 + len(mask_kind))
    shape = (2, 3) if vocab > 10000 else (4, 6)
    logits = (rng.standard_normal(shape + (vocab,), dtype=np.float32) * 4).astype(np.float32)
    labels = rng.integers(0, vocab, size=shape).astype(label_dtype)
    mask = _make_mask(mask_kind, shape, rng)
    if mask is not None:
        garbage = np.where(rng.random(shape) < 0.5, -1, vocab + 3).astype(label_dtype)
        labels = np.where(mask != 0, labels, garbage).astype(label_dtype)
    for array in (logits, labels, mask):
        if array is not None:
            array.flags.writeable = False  # cached: no test may change it
    return logits, labels, mask


def _available_simd_paths() -> list[str]:
    original = _xent.simd_path()
    paths = []
    for name in ("avx512f", "avx2", "scalar"):
        try:
            _xent.force_simd_path(name)
        except ValueError:
            continue
        paths.append(name)
    _xent.force_simd_path(original)
    return paths


SIMD_PATHS = _available_simd_paths()


@pytest.fixture(params=SIMD_PATHS, ids=[f"simd={p}" for p in SIMD_PATHS])
def simd_path(request):
    """Run the test on one SIMD path of this CPU, then restore the dispatcher's choice."""
    original = _xent.simd_path()
    _xent.force_simd_path(request.param)
    try:
        yield request.param
    finally:
        _xent.force_simd_path(original)


# ------------------------------------------------------------------ the course's example ---

def test_course_example_by_hand():
    """Batch 1, length 5, mask [1, 1, 1, 1, 0], V = 4: every number is a closed form."""
    ln2 = math.log(2.0)
    logits = np.array([[
        [0.0, 0.0, 0.0, 0.0],   # uniform: NLL = log 4 whatever the label
        [ln2, 0.0, 0.0, 0.0],   # label 0 holds 2 of 5 units: NLL = log(5 / 2)
        [ln2, 0.0, 0.0, 0.0],   # label 1 holds 1 of 5 units: NLL = log 5
        [0.0, 0.0, 0.0, -np.inf],  # label 2 holds 1 of 3 units: NLL = log 3
        [np.nan] * 4,           # padding: never read
    ]], dtype=np.float32)
    labels = np.array([[3, 0, 1, 2, 0]], dtype=np.int32)
    mask = np.array([[1, 1, 1, 1, 0]], dtype=np.float32)
    per_token = [math.log(4), math.log(5 / 2), math.log(5), math.log(3), 0.0]

    np.testing.assert_allclose(masked_cross_entropy(logits, labels, mask, reduction="none"),
                               [per_token], rtol=1e-6)
    assert masked_cross_entropy(logits, labels, mask) == pytest.approx(sum(per_token), rel=1e-6)
    assert masked_cross_entropy(logits, labels, mask, reduction="mean") == pytest.approx(
        sum(per_token) / 4, rel=1e-6)
    np.testing.assert_allclose(masked_cross_entropy(logits, labels, mask, reduction="sequence"),
                               [sum(per_token)], rtol=1e-6)
    nll, top1 = token_nll_and_hits(logits, labels, mask)
    assert nll.dtype == np.float64 and top1.dtype == np.bool_
    # Row 1's argmax is 0 = its label; row 0 is a tie won by index 0, not label 3.
    assert top1.tolist() == [[False, True, False, False, False]]


# ------------------------------------------------------------------------ stacked grid ---

@pytest.mark.parametrize("reduction", REDUCTIONS, ids=lambda r: f"reduction={r}")
@pytest.mark.parametrize("num_threads", [1, 2], ids=lambda n: f"threads={n}")
@pytest.mark.parametrize("mask_kind", MASK_KINDS, ids=lambda k: f"mask={k}")
@pytest.mark.parametrize("label_dtype", ["int32", "int64"], ids=lambda d: f"labels={d}")
@pytest.mark.parametrize("vocab", VOCAB_SIZES, ids=lambda v: f"V={v}")
def test_matches_float64_reference(vocab, label_dtype, mask_kind, num_threads, reduction,
                                   simd_path):
    logits, labels, mask = case(vocab, label_dtype, mask_kind)
    got = masked_cross_entropy(logits, labels, mask, reduction=reduction,
                               num_threads=num_threads)
    want = reference(logits, labels, mask, reduction)
    if reduction == "none":
        assert got.dtype == np.float32 and got.shape == labels.shape
        if mask is not None:
            assert np.all(got[mask == 0] == 0)
    elif reduction == "sequence":
        assert got.dtype == np.float64 and got.shape == labels.shape[:-1]
    else:
        assert isinstance(got, float)
    # Sums carry the per-token floor once per counted token; per-token values and means once.
    n = counted(labels, mask) if reduction in ("sum", "sequence") else 1
    assert_matches(got, want, n)


@pytest.mark.parametrize("num_threads", [1, 2], ids=lambda n: f"threads={n}")
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "lengths"],
                         ids=lambda k: f"mask={k}")
@pytest.mark.parametrize("vocab", VOCAB_SIZES, ids=lambda v: f"V={v}")
def test_top1_hits_are_argmax_equals_label_where_counted(vocab, mask_kind, num_threads,
                                                         simd_path):
    logits, labels, mask = case(vocab, "int64", mask_kind)
    logits = logits.copy()
    # Make about half the labels the argmax, so both outcomes occur.
    hit_rows = np.random.default_rng(1).random(labels.shape) < 0.5
    safe = np.clip(labels, 0, vocab - 1)
    idx = np.nonzero(hit_rows)
    logits[idx + (safe[idx],)] = logits.max() + 1.0
    nll, top1 = token_nll_and_hits(logits, labels, mask, num_threads=num_threads)
    counts = np.ones(labels.shape, bool) if mask is None else mask != 0
    expected = (logits.argmax(axis=-1) == labels) & counts
    np.testing.assert_array_equal(top1, expected)
    assert_matches(nll, reference_nll(logits, labels, mask))


@pytest.mark.parametrize("num_threads", [1, 2], ids=lambda n: f"threads={n}")
@pytest.mark.parametrize("mask_kind", ["none", "bool", "lengths"], ids=lambda k: f"mask={k}")
@pytest.mark.parametrize("vocab", VOCAB_SIZES, ids=lambda v: f"V={v}")
def test_row_maxima_come_from_the_same_pass(vocab, mask_kind, num_threads, simd_path):
    """token_nll_hits_and_max: the NLL and hits of token_nll_and_hits, and each counted row's
    maximum logit (-inf where masked; a row of -inf has -inf; a NaN row's is unspecified)."""
    logits, labels, mask = case(vocab, "int64", mask_kind)
    logits = logits.copy()
    logits[(0,) * (logits.ndim - 1) + (vocab // 2,)] = np.nan
    logits[(0,) * (logits.ndim - 2) + (1, 0)] = -np.inf
    nll, top1, row_max = token_nll_hits_and_max(logits, labels, mask, num_threads=num_threads)
    want_nll, want_top1 = token_nll_and_hits(logits, labels, mask, num_threads=num_threads)
    np.testing.assert_array_equal(nll, want_nll)
    np.testing.assert_array_equal(top1, want_top1)
    counts = np.ones(labels.shape, bool) if mask is None else mask != 0
    assert row_max.dtype == np.float32 and row_max.shape == labels.shape
    numbers = counts & ~np.isnan(logits).any(axis=-1)
    np.testing.assert_array_equal(row_max[numbers], logits.max(axis=-1)[numbers])
    assert np.all(row_max[~counts] == -np.inf)


def test_top1_ties_go_to_the_first_argmax(simd_path):
    logits = np.zeros((1, 3, 5), dtype=np.float32)
    logits[0, 0, [1, 3]] = 2.0  # tie between 1 and 3
    logits[0, 1, [1, 3]] = 2.0
    labels = np.array([[1, 3, 4]])
    _, top1 = token_nll_and_hits(logits, labels)
    assert top1.tolist() == [[True, False, False]]
    assert top1.tolist() == [(logits.argmax(-1) == labels)[0].tolist()]


def test_gil_is_released_and_concurrent_calls_agree():
    logits, labels, mask = case(1000, "int64", "bool")
    want = masked_cross_entropy(logits, labels, mask, num_threads=1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: masked_cross_entropy(logits, labels, mask, num_threads=2), range(16)))
    assert results == [pytest.approx(want, rel=1e-12)] * 16


def test_threads_do_not_change_the_result():
    logits, labels, mask = case(1000, "int64", "float")
    values = [masked_cross_entropy(logits, labels, mask, reduction="none", num_threads=n)
              for n in (1, 2, 3, 64)]
    for v in values[1:]:
        np.testing.assert_array_equal(v, values[0])


# -------------------------------------------------------------------------- input dtypes ---

MASK_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
               "float16", "float32", "float64", ">f4", ">i4")


def _mask_of_dtype(dtype: str):
    """case(1000)'s logits and labels with its 0/1 mask as ``dtype``: a multiplier of 0, 1, 2
    (bool holds 0/1 only), and for floats also 0.5 and 0.1, which float64 holds differently
    from float32, so a "mean" dividing by anything but the float32 weights the kernel used
    shows.  Labels under the zeros are out of range, so a zero lost in conversion fails."""
    logits, labels, base = case(1000, "int64", "uint8")
    rng = np.random.default_rng(11)
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "b":
        return logits, labels, base.astype(np_dtype)
    scales = [1.0, 2.0, 0.5, 0.1] if np_dtype.kind == "f" else [1.0, 2.0]
    scale = rng.choice(scales, size=base.shape)
    mask = (base * scale).astype(np_dtype)
    assert np.count_nonzero(mask) == np.count_nonzero(base) and mask.dtype == np_dtype
    return logits, labels, mask


@pytest.mark.parametrize("reduction", REDUCTIONS + ("hits",), ids=lambda r: f"reduction={r}")
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=lambda d: f"mask={d}")
def test_any_mask_dtype_is_the_course_cast_to_float32(mask_dtype, reduction):
    """``loss * tf.cast(mask, tf.float32)`` for every mask dtype and byte order: the float64
    reference, and bit for bit the result of the same mask already cast to float32 (the mean
    divides by the same weights, whatever dtype they came in)."""
    logits, labels, mask = _mask_of_dtype(mask_dtype)
    as_float32 = mask.astype(np.float32)
    if reduction == "hits":
        nll, top1 = token_nll_and_hits(logits, labels, mask)
        assert_matches(nll, reference_nll(logits, labels, mask))
        np.testing.assert_array_equal(top1, (logits.argmax(-1) == labels) & (mask != 0))
        want_nll, want_top1 = token_nll_and_hits(logits, labels, as_float32)
        np.testing.assert_array_equal(nll, want_nll)
        np.testing.assert_array_equal(top1, want_top1)
        return
    got = masked_cross_entropy(logits, labels, mask, reduction=reduction)
    n = counted(labels, mask) if reduction in ("sum", "sequence") else 1
    assert_matches(got, reference(logits, labels, mask, reduction), n)
    np.testing.assert_array_equal(
        got, masked_cross_entropy(logits, labels, as_float32, reduction=reduction))
    if reduction == "mean":  # sum / sum(weights), not sum / (number of counted tokens)
        total = float(as_float32.sum(dtype=np.float64))
        assert got == pytest.approx(masked_cross_entropy(logits, labels, mask) / total,
                                    rel=1e-12)


def test_sign_of_int32_ids_is_a_mask():
    """The course's ``np.sign(inputs)`` on int32 ids (0 = padding) is an int32 mask."""
    logits, _, _ = case(1000, "int64", "none")
    ids = np.array([[5, 9, 0, 0, 0, 0], [3, 3, 3, 8, 1, 0], [0] * 6, [7] * 6], dtype=np.int32)
    mask = np.sign(ids)
    assert mask.dtype == np.int32
    labels = np.where(ids != 0, ids, -1)  # padded labels are out of range: never checked
    for reduction in REDUCTIONS:
        np.testing.assert_array_equal(
            masked_cross_entropy(logits, labels, mask, reduction=reduction),
            masked_cross_entropy(logits, labels, ids != 0, reduction=reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS + ("hits",), ids=lambda r: f"reduction={r}")
@pytest.mark.parametrize("label_dtype", ["int32", ">i4", ">i8"], ids=lambda d: f"labels={d}")
@pytest.mark.parametrize("logits_dtype", ["float32", ">f4"], ids=lambda d: f"logits={d}")
def test_big_endian_logits_and_labels(logits_dtype, label_dtype, reduction):
    """Big-endian arrays (e.g. read from a file written elsewhere) give the native results."""
    native_logits, native_labels, mask = case(1000, "int64", "float")
    logits = native_logits.astype(logits_dtype)
    labels = native_labels.astype(label_dtype)
    assert logits.dtype == np.dtype(logits_dtype) and labels.dtype == np.dtype(label_dtype)
    if reduction == "hits":
        got = token_nll_and_hits(logits, labels, mask)
        want = token_nll_and_hits(native_logits, native_labels, mask)
        assert_matches(got[0], reference_nll(native_logits, native_labels, mask))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        return
    got = masked_cross_entropy(logits, labels, mask, reduction=reduction)
    n = counted(labels, mask) if reduction in ("sum", "sequence") else 1
    assert_matches(got, reference(native_logits, native_labels, mask, reduction), n)
    np.testing.assert_array_equal(
        got, masked_cross_entropy(native_logits, native_labels, mask, reduction=reduction))


def test_big_endian_non_contiguous_logits_and_mask():
    """Byte swap and gather are one copy; a big-endian mask beside them changes nothing."""
    logits, labels, mask = case(1000, "int64", "float")
    swapped = np.asfortranarray(logits.astype(">f4"))[..., ::3]
    assert not swapped.dtype.isnative and not swapped.flags.c_contiguous
    got = masked_cross_entropy(swapped, labels % 334, mask.astype(">f8"), reduction="none")
    want = masked_cross_entropy(np.ascontiguousarray(logits[..., ::3]), labels % 334, mask,
                                reduction="none")
    np.testing.assert_array_equal(got, want)


def test_mask_weights_converts_once_and_keeps_float32_in_place():
    native = np.ones((2, 3), dtype=np.float32)
    assert _xent.mask_weights(native) is native, "a native float32 mask is not copied"
    assert _xent.mask_weights(None) is None
    for dtype in MASK_DTYPES:
        weights = _xent.mask_weights(np.ones((2, 3), dtype=dtype))
        assert weights.dtype == np.float32 and weights.dtype.isnative and weights.shape == (2, 3)
        assert weights.flags.c_contiguous
    assert _xent.mask_weights(np.float64(2.0)).shape == (), "a 0-d mask stays 0-d"
    # The cast is float32's: a float64 weight that rounds to 0 skips its position.
    assert _xent.mask_weights(np.array([1e-50, 1.0]))[0] == 0.0


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "object"])
@pytest.mark.parametrize("api", ["masked_cross_entropy", "token_nll_and_hits"])
def test_complex_and_object_masks_are_refused_naming_the_dtype(api, dtype):
    logits, labels, _ = case(7, "int64", "none")
    mask = np.ones(labels.shape, dtype=dtype)
    call = masked_cross_entropy if api == "masked_cross_entropy" else token_nll_and_hits
    with pytest.raises(TypeError, match=rf"mask must have a bool, integer or real floating "
                                        rf"dtype .*got {dtype}$"):
        call(logits, labels, mask)
    if dtype == "object":  # a list holding non-numbers becomes an object array too
        with pytest.raises(TypeError, match=r"got object"):
            call(logits, labels, [[None] * labels.shape[1]] * labels.shape[0])


# -------------------------------------------------------------------- layouts and memory ---

def test_read_only_arrays_are_used_in_place():
    logits, labels, mask = case(7, "int32", "bool")
    assert not logits.flags.writeable and not labels.flags.writeable
    assert_matches(masked_cross_entropy(logits, labels, mask),
                   reference(logits, labels, mask), counted(labels, mask))


@pytest.mark.parametrize("mask_kind", ["none", "lengths"], ids=lambda k: f"mask={k}")
def test_memmap_logits(tmp_path, mask_kind):
    logits, labels, mask = case(1000, "int64", mask_kind)
    path = tmp_path / "logits.f32"
    logits.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=logits.shape)
    assert_matches(masked_cross_entropy(mapped, labels, mask),
                   reference(logits, labels, mask), counted(labels, mask))
    nll, _ = token_nll_and_hits(mapped, labels, mask)
    assert_matches(nll, reference_nll(logits, labels, mask))
    del mapped


@pytest.mark.parametrize("layout", ["strided-vocab", "fortran", "transposed-batch",
                                    "strided-labels"])
def test_non_contiguous_input_is_copied(layout):
    rng = np.random.default_rng(3)
    wide = rng.standard_normal((4, 5, 40), dtype=np.float32)
    labels = rng.integers(0, 20, size=(4, 5))
    mask = rng.random((4, 5)) < 0.8
    if layout == "strided-vocab":
        logits = wide[..., ::2]
    elif layout == "fortran":
        logits = np.asfortranarray(wide[..., :20])
    elif layout == "transposed-batch":
        logits = np.ascontiguousarray(wide[..., :20].transpose(1, 0, 2)).transpose(1, 0, 2)
    else:
        logits = wide[..., :20]
        labels = np.stack([labels, labels], axis=-1)[..., 0]
        mask = np.stack([mask, mask], axis=-1)[..., 0]
    assert not logits.flags.c_contiguous or not labels.flags.c_contiguous
    got = masked_cross_entropy(logits, labels, mask, reduction="none")
    assert_matches(got, reference_nll(np.ascontiguousarray(logits), labels, mask))


def test_empty_batch():
    logits = np.zeros((0, 5, 9), dtype=np.float32)
    labels = np.zeros((0, 5), dtype=np.int64)
    assert masked_cross_entropy(logits, labels) == 0.0
    assert masked_cross_entropy(logits, labels, reduction="none").shape == (0, 5)
    assert masked_cross_entropy(logits, labels, reduction="sequence").shape == (0,)


def test_one_dimensional_logits_are_a_single_position():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    want = float(np.log(np.exp([1.0, 2.0, 3.0]).sum()) - 2.0)
    assert masked_cross_entropy(logits, np.int64(1)) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- numerics ---

@pytest.mark.parametrize("vocab", [7, 1000, 50257], ids=lambda v: f"V={v}")
def test_extreme_logits(vocab, simd_path):
    rng = np.random.default_rng(vocab)
    logits = rng.uniform(-1e4, 1e4, size=(3, vocab)).astype(np.float32)
    logits[1] = rng.uniform(9990.0, 1e4, size=vocab)  # many near-equal huge terms
    logits[2] = rng.uniform(-1e4, -9990.0, size=vocab)
    labels = rng.integers(0, vocab, size=3)
    got = masked_cross_entropy(logits, labels, reduction="none")
    assert np.all(np.isfinite(got))
    assert_matches(got, reference_nll(logits, labels))
    assert_matches(masked_cross_entropy(logits, labels), reference(logits, labels), 3)


@pytest.mark.parametrize("vocab", [2, 7, 1000, 1037], ids=lambda v: f"V={v}")
def test_minus_inf_logits(vocab, simd_path):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab), dtype=np.float32)
    logits[:, ::2] = -np.inf  # legal: e.g. tokens banned by a constraint
    labels = np.array([1, 0, vocab - 1 if (vocab - 1) % 2 else 1])
    got = masked_cross_entropy(logits, labels, reduction="none")
    assert np.isinf(got[1]) and got[1] > 0, "a label at -inf has infinite NLL"
    finite = [0, 2]
    assert np.all(np.isfinite(got[finite]))
    assert_matches(got[finite], reference_nll(logits, labels)[finite])
    assert masked_cross_entropy(logits, labels) == math.inf
    mask = np.array([True, False, True])
    assert_matches(masked_cross_entropy(logits, labels, mask),
                   reference(logits, labels, mask), 2)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("vocab", [1, 7, 33, 1000, 1037, 2100], ids=lambda v: f"V={v}")
def test_nan_in_unmasked_row_gives_nan(vocab, where, simd_path):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab), dtype=np.float32)
    column = {"first": 0, "middle": vocab // 2, "last": vocab - 1}[where]
    logits[1, column] = np.nan
    label = (column + 1) % vocab
    logits[1, label] = 100.0 if label != column else np.nan  # the largest number in the row
    labels = np.array([0, label, vocab // 3])
    got = masked_cross_entropy(logits, labels, reduction="none")
    assert np.isnan(got[1])
    assert_matches(got[[0, 2]], reference_nll(logits, labels)[[0, 2]])
    assert math.isnan(masked_cross_entropy(logits, labels))
    nll, top1 = token_nll_and_hits(logits, labels)
    assert np.isnan(nll[1])
    assert not top1[1], "a row holding a NaN is never a top-1 hit"


@pytest.mark.parametrize("vocab", [7, 1000], ids=lambda v: f"V={v}")
def test_nan_in_masked_row_is_ignored(vocab, simd_path):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((2, 4, vocab), dtype=np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=np.uint8)
    logits[mask == 0] = np.nan
    labels = rng.integers(0, vocab, size=(2, 4))
    got = masked_cross_entropy(logits, labels, mask)
    assert math.isfinite(got)
    assert_matches(got, reference(logits, labels, mask), 4)
    assert np.all(masked_cross_entropy(logits, labels, mask, reduction="none")[mask == 0] == 0)


@pytest.mark.parametrize("bad", [-1, 7, 10**12], ids=lambda b: f"label={b}")
def test_masked_rows_labels_are_not_checked(bad):
    logits = np.zeros((2, 3, 7), dtype=np.float32)
    labels = np.array([[1, 2, bad], [bad, bad, 0]], dtype=np.int64)
    mask = labels != bad
    assert masked_cross_entropy(logits, labels, mask) == pytest.approx(3 * math.log(7))


# -------------------------------------------------------------------------- error paths ---

def _valid():
    return np.zeros((2, 3, 10), dtype=np.float32), np.ones((2, 3), dtype=np.int64)


@pytest.mark.parametrize("bad", [10, -1, 2**40], ids=lambda b: f"label={b}")
def test_bad_label_names_first_bad_position(bad):
    logits, labels = _valid()
    labels[1, 2] = bad
    labels[1, 1] = bad  # the first one in row-major order is reported
    with pytest.raises(ValueError, match=rf"label {bad} at position \(1, 1\) is outside the "
                                         rf"vocabulary \[0, 10\)"):
        masked_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match=r"position \(1, 1\)"):
        token_nll_and_hits(logits, labels)


def test_bad_label_in_counted_row_is_found_despite_mask():
    logits, labels = _valid()
    labels[0, 0] = 99
    labels[0, 2] = 12
    mask = np.array([[0, 1, 1], [1, 1, 1]], dtype=bool)
    with pytest.raises(ValueError, match=r"label 12 at position \(0, 2\)"):
        masked_cross_entropy(logits, labels, mask)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(labels=np.ones((3, 2), dtype=np.int64)), ValueError,
     r"labels shape \(3, 2\) does not match logits.shape\[:-1\] = \(2, 3\)"),
    (dict(labels=np.ones((2, 3, 10), dtype=np.int64)), ValueError, r"labels shape"),
    (dict(mask=np.ones((2, 2), dtype=bool)), ValueError,
     r"mask shape \(2, 2\) does not match labels shape \(2, 3\)"),
    (dict(labels=np.ones((2, 3), dtype=np.float32)), TypeError,
     r"labels must be int32 or int64 token ids, got float32"),
    (dict(labels=np.ones((2, 3), dtype=np.uint64)), TypeError, r"labels must be int32 or int64"),
    (dict(logits=np.zeros((2, 3, 10), dtype=np.float64)), TypeError,
     r"logits must be float32, got float64; convert with logits.astype\(np.float32\)"),
    (dict(logits=np.zeros((2, 3, 10), dtype=np.float16)), TypeError, r"logits must be float32"),
    (dict(labels=np.ones((2, 3), dtype=">u8")), TypeError, r"labels must be .* got >u8"),
    (dict(logits=np.zeros((2, 3, 10), dtype=">f8")), TypeError,
     r"logits must be float32, got >f8"),
    (dict(mask=np.ones((2, 3), dtype=np.complex64)), TypeError,
     r"mask must have a bool, integer or real floating dtype .*got complex64"),
    (dict(mask=np.array(["1"] * 6).reshape(2, 3)), TypeError, r"mask must .* got <U1"),
    (dict(mask=np.ones((2, 2), dtype=np.int32)), ValueError,
     r"mask shape \(2, 2\) does not match labels shape \(2, 3\)"),
    (dict(reduction="avg"), ValueError,
     r"reduction must be one of none, sum, mean, sequence; got 'avg'"),
    (dict(reduction=None), ValueError, r"reduction must be one of"),
    (dict(num_threads=0), ValueError, r"num_threads must be an integer >= 1; got 0"),
    (dict(num_threads=-2), ValueError, r"num_threads must be an integer >= 1; got -2"),
    (dict(num_threads=True), TypeError, r"num_threads must be an integer >= 1; got True"),
    (dict(num_threads=1.5), TypeError, r"num_threads must be an integer >= 1; got 1.5"),
    (dict(logits=np.zeros((2, 3, 0), dtype=np.float32)), ValueError, r"empty vocabulary"),
], ids=["labels-shape", "labels-too-many-axes", "mask-shape", "float-labels", "uint64-labels",
        "float64-logits", "float16-logits", "big-endian-uint64-labels",
        "big-endian-float64-logits", "complex-mask", "string-mask", "int32-mask-shape",
        "unknown-reduction",
        "reduction-None", "threads-0", "threads-negative", "threads-bool", "threads-float",
        "empty-vocab"])
def test_error_paths(kwargs, error, message):
    logits, labels = _valid()
    args = dict(logits=logits, labels=labels, mask=None, reduction="sum", num_threads=None)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        masked_cross_entropy(args.pop("logits"), args.pop("labels"), args.pop("mask"), **args)


def test_scalar_logits_are_refused():
    with pytest.raises(ValueError, match=r"at least one axis"):
        masked_cross_entropy(np.float32(1.0), np.int64(0))


def test_sequence_reduction_needs_a_time_axis():
    with pytest.raises(ValueError, match=r'reduction="sequence" needs labels with at least'):
        masked_cross_entropy(np.zeros(4, dtype=np.float32), np.int64(0), reduction="sequence")


def test_unknown_simd_path_is_refused():
    with pytest.raises(ValueError, match=r"SIMD path 'neon' is not available"):
        _xent.force_simd_path("neon")
    assert _xent.simd_path() in ("avx512f", "avx2", "scalar")


# ------------------------------------------------------------------------ the OpenMP build ---

def _needed_libraries(path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object: the libraries it links,
    read from its ``.dynamic`` section (what ``ldd`` starts from, without needing ``ldd``)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        pytest.skip("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    sht_dynamic, dt_needed = 6, 1
    for _, sh_type, _, _, offset, size, link, _, _, _ in sections:
        if sh_type != sht_dynamic:
            continue
        strtab = sections[link][4]
        names = []
        for tag, value in struct.iter_unpack("<qQ", data[offset:offset + size]):
            if tag == dt_needed:
                start = strtab + value
                names.append(data[start:data.index(b"\0", start)].decode())
        return names
    return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ELF and /proc")
def test_has_openmp_agrees_with_the_linked_runtime():
    """has_openmp() is _OPENMP in masked_xent.c; the OpenMP runtime among the .so's links is
    there only when the parallel loop really uses it (the linker drops an unused libgomp).
    They disagree when the report drifts from the build, e.g. a hard-wired answer or an
    _OPENMP check in a file compiled without -fopenmp (checked: a serial build whose
    has_openmp() returns 1 fails here)."""
    needed = _needed_libraries(_xent.__file__)
    assert any(name.startswith("libc.") for name in needed), needed  # the reader works
    links_openmp = any(re.match(r"lib[gi]?omp", name) for name in needed)
    assert _xent.has_openmp() == links_openmp, f"has_openmp()={_xent.has_openmp()}, {needed}"


_COUNT_KERNEL_THREADS = textwrap.dedent("""
    import os, numpy as np
    from lmonnx import _xent, token_nll_and_hits
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4096, 1000), dtype=np.float32)
    labels = rng.integers(0, 1000, size=4096)
    before = len(os.listdir("/proc/self/task"))
    token_nll_and_hits(logits, labels, num_threads=4)
    print(int(_xent.has_openmp()), len(os.listdir("/proc/self/task")) - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/task")
def test_num_threads_starts_that_many_workers_exactly_when_openmp():
    """Not a timing: libgomp keeps its worker threads after a parallel region, so a fresh
    process that ran the kernel once with num_threads=4 has 3 more threads when (and only when)
    the build is parallel; a serial build, or a kernel that ignores num_threads, adds none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run([sys.executable, "-c", _COUNT_KERNEL_THREADS], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    openmp, added = map(int, done.stdout.split())
    assert openmp == _xent.has_openmp()
    assert added == (3 if openmp else 0), f"has_openmp()={bool(openmp)}, {added} threads added"


def test_threads_give_bit_identical_rows_on_a_large_input():
    """Each row is one thread's work, so any thread count gives the same bits, hits included,
    on enough rows that every thread gets many (4096 rows, V = 1000, a third masked)."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((64, 64, 1000), dtype=np.float32) * 4
    labels = rng.integers(0, 1000, size=(64, 64))
    mask = rng.random((64, 64)) < 0.67
    want_nll, want_top1 = token_nll_and_hits(logits, labels, mask, num_threads=1)
    for n in (2, 3, 7):
        nll, top1 = token_nll_and_hits(logits, labels, mask, num_threads=n)
        np.testing.assert_array_equal(nll, want_nll)
        np.testing.assert_array_equal(top1, want_top1)


# ------------------------------------------------------------------- hypothesis properties ---

@st.composite
def batches(draw, max_vocab=40):
    batch = draw(st.integers(1, 3))
    time = draw(st.integers(1, 5))
    vocab = draw(st.integers(1, max_vocab))
    finite = st.floats(-60.0, 60.0, width=32, allow_nan=False, allow_infinity=False)
    logits = draw(hnp.arrays(np.float32, (batch, time, vocab), elements=finite))
    labels = draw(hnp.arrays(np.int64, (batch, time), elements=st.integers(0, vocab - 1)))
    mask = draw(st.none() | hnp.arrays(np.bool_, (batch, time)))
    return logits, labels, mask


PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(data=batches())
def test_property_matches_reference(data, simd_path):
    logits, labels, mask = data
    n = counted(labels, mask)
    for reduction in REDUCTIONS:
        got = masked_cross_entropy(logits, labels, mask, reduction=reduction)
        per = 1 if reduction in ("none", "mean") else n
        assert_matches(got, reference(logits, labels, mask, reduction), per)


@PROPERTY
@given(data=batches(), shift=st.floats(-1000.0, 1000.0, width=32))
def test_property_nonnegative_and_shift_invariant(data, shift, simd_path):
    logits, labels, mask = data
    nll, top1 = token_nll_and_hits(logits, labels, mask)
    assert np.all(nll >= 0)
    shifted, _ = token_nll_and_hits((logits + np.float32(shift)).astype(np.float32), labels,
                                    mask)
    # Shifting every logit of a row by a constant leaves the softmax unchanged; float32
    # rounding of the shifted logits is the only difference (|logit| <= 1060 -> ulp 1.2e-4).
    np.testing.assert_allclose(shifted, nll, rtol=1e-4, atol=5e-4)
    counts = np.ones(labels.shape, bool) if mask is None else mask
    np.testing.assert_array_equal(top1, (logits.argmax(-1) == labels) & counts)


@PROPERTY
@given(data=batches())
def test_property_sum_is_sum_of_sequences_and_tokens(data):
    logits, labels, mask = data
    total = masked_cross_entropy(logits, labels, mask)
    assert masked_cross_entropy(logits, labels, mask, reduction="sequence").sum() == \
        pytest.approx(total, rel=1e-12, abs=1e-12)
    per_token = masked_cross_entropy(logits, labels, mask, reduction="none")
    assert per_token.astype(np.float64).sum() == pytest.approx(total, rel=1e-6, abs=1e-5)


# ---------------------------------------------------------------------------- peers ---

IGNORE_INDEX = -100


def _softmax_cross_entropy_model(reduction):
    from onnx import TensorProto, checker, helper

    node = helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"],
                            reduction=reduction, ignore_index=IGNORE_INDEX)
    graph = helper.make_graph(
        [node], "sce",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "V"]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT,
                                       ["N"] if reduction == "none" else [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    return model


def _run_onnx(runtime, model, feed):
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0]
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feed)[0]


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "onnx.reference"])
@pytest.mark.parametrize("vocab", [2, 1000, 50257], ids=lambda v: f"V={v}")
def test_agrees_with_onnx_softmax_cross_entropy_loss(vocab, runtime, reduction):
    rng = np.random.default_rng(vocab)
    rows = 6 if vocab > 10000 else 40
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * 3
    labels = rng.integers(0, vocab, size=rows)
    labels[rng.random(rows) < 0.3] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    theirs = _run_onnx(runtime, _softmax_cross_entropy_model(reduction),
                       {"logits": logits, "labels": labels})
    ours = masked_cross_entropy(logits, labels, mask, reduction=reduction)
    per = 1 if reduction == "none" else counted(labels, mask)
    assert_matches(ours, reference(logits, labels, mask, reduction), per)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL_PER_TOKEN * per)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "lengths"], ids=lambda k: f"mask={k}")
@pytest.mark.parametrize("vocab", [7, 1000, 50257], ids=lambda v: f"V={v}")
def test_equals_tensorflow_course_loss(vocab, mask_kind):
    tf = pytest.importorskip("tensorflow")
    logits, labels, mask = case(vocab, "int32", mask_kind)
    safe_labels = np.where(mask != 0, labels, 0)  # TensorFlow checks every label
    with tf.device("/CPU:0"):
        per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels,
                                                                   logits=logits)
        theirs = tf.math.reduce_sum(per_token * tf.cast(mask, tf.float32)).numpy()
    ours = masked_cross_entropy(logits, labels, mask)
    n = counted(labels, mask)
    assert_matches(ours, reference(logits, labels, mask), n)
    np.testing.assert_allclose(ours, float(theirs), rtol=RTOL, atol=ATOL_PER_TOKEN * n)
    np.testing.assert_allclose(
        masked_cross_entropy(logits, labels, mask, reduction="none"),
        (per_token * tf.cast(mask, tf.float32)).numpy(), rtol=RTOL, atol=ATOL_PER_TOKEN)
