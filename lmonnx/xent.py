"""Padding-masked sparse softmax cross-entropy, the loss of the course's language model.

``masked_cross_entropy`` computes, in one pass over float32 logits and without copying them,

    loss[..., t] = mask[..., t] * (logsumexp(logits[..., t, :]) - logits[..., t, labels[..., t]])

the same numbers as ``tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits) *
tf.cast(mask, tf.float32)`` followed by a reduction.  All values are natural-log NLL (nats);
divide by ``log(2)`` for bits.
"""

from __future__ import annotations

import math

import numpy as np


from lmonnx.errors import InvalidArgumentError
from lmonnx import _xent

REDUCTIONS = ("none", "sum", "mean", "sequence")


def token_nll_and_hits(logits, labels, mask=None, *, num_threads=None):
    """Per-position NLL and top-1 hits from a single pass over the logits.

    Parameters
    ----------
    logits : float32 array [..., V], either byte order (big-endian is copied once to native)
    labels : integer array [...] (int32, int64, ...; not uint64), either byte order,
        ``labels.shape == logits.shape[:-1]``
    mask : None, or array [...] of any bool / integer / real float dtype, either byte order, a
        multiplier (0 = padding, skipped), converted once to float32 like
        ``tf.cast(mask, tf.float32)``
    num_threads : int or None (OpenMP default, i.e. ``OMP_NUM_THREADS`` or all cores)

    Returns
    -------
    nll : float64 array [...], nats, ``mask * nll`` (0 at masked positions)
    top1 : bool array [...], True where the label is the first argmax of its row (what
        ``logits.argmax(-1) == labels`` gives), always False at masked positions and in rows
        whose NLL is NaN (a NaN logit has no meaningful argmax).
    """
    return _xent.masked_token_nll(logits, labels, mask, True, num_threads)


def token_nll_hits_and_max(logits, labels, mask=None, *, num_threads=None):
    """:func:`token_nll_and_hits` plus each row's maximum logit, from the same single pass.

    Returns
    -------
    nll, top1 : as :func:`token_nll_and_hits`
    row_max : float32 array [...], ``logits.max(-1)`` (what the log-sum-exp shifts by);
        ``-inf`` at masked positions (their logits are not read); unspecified in a row
        holding a NaN (its NLL is NaN: check that, not this).
    """
    return _xent.masked_token_stats(logits, labels, mask, True, True, num_threads)


def masked_cross_entropy(logits, labels, mask=None, *, reduction="sum", num_threads=None):
    """Masked sparse softmax cross-entropy in nats.

    Parameters
    ----------
    logits : float32 array [..., V], native-endian C-contiguous rows are used in place
        (read-only and memory-mapped arrays work; other layouts and big-endian float32 are
        copied once).  float64 logits raise ``TypeError`` rather than being silently cast into
        a second array (a nested list is converted: it is copied anyway).
    labels : integer array [...] (int32, int64, any width but uint64), either byte order,
        ``labels.shape == logits.shape[:-1]``; converted once to native int64.  A label
        outside ``[0, V)`` at an unmasked position raises ``ValueError`` naming the position.
    mask : None, or array [...] of any bool / integer / real float dtype (``np.sign`` of int32
        ids, float64, ...), either byte order, converted once to native float32 and
        multiplied in like the course's ``loss * tf.cast(mask, tf.float32)``.  Positions where
        the float32 weight is 0 are skipped: their logits are not read and their labels not
        checked.  Complex and object masks raise ``TypeError`` naming the dtype.
    reduction : ``"none"``  float32 [...] per position (0 where masked);
                ``"sum"``   Python float, accumulated in float64;
                ``"mean"``  sum / sum(float32 weights), the weights summed in float64 (NaN
                when the mask is all zero);
                ``"sequence"`` float64 [...-1]: the sum over the last label axis, one value
                per sentence of a [batch, time] batch.
    num_threads : int or None.  OpenMP threads; None uses the OpenMP default.

    Numerics: max-shifted log-sum-exp with float64 totals, within 2e-5 relative of a float64
    reference for V up to 50257 and logits up to +-1e4.  ``-inf`` logits are legal (a label
    at ``-inf`` gives ``inf``); a NaN in a counted row gives NaN.
    """
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise InvalidArgumentError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    # Converted once, here: the kernel uses these weights in place, and "mean" divides by
    # their sum, so any mask dtype or byte order gives the mean of its float32 equivalent.
    weights = _xent.mask_weights(mask)
    nll, _ = _xent.masked_token_nll(logits, labels, weights, False, num_threads)
    if reduction == "none":
        return nll.astype(np.float32)
    if reduction == "sum":
        return float(nll.sum(dtype=np.float64))
    if reduction == "mean":
        total_weight = float(weights.sum(dtype=np.float64)) if weights is not None else nll.size
        return float(nll.sum(dtype=np.float64)) / total_weight if total_weight else math.nan
    if nll.ndim == 0:
        raise InvalidArgumentError('reduction="sequence" needs labels with at least one axis [..., time]')
    return nll.sum(axis=-1, dtype=np.float64)
