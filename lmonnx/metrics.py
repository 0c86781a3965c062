"""Units and budgets shared by training and evaluation, with no dependencies.

Natural-log NLL (nats) is what the model and the kernel produce; perplexity and bits are
derived from sums at the edge, never averaged twice.  Training imports this module instead of
the scoring stack, so it runs without onnxruntime.
"""

from __future__ import annotations

import math

LN2 = math.log(2.0)
"""nats per bit: bits = nats / LN2."""

LOGITS_BUDGET_BYTES = 64 << 20
"""Default cap on one batch's float32 logits: keeps memory flat and the logits that
onnxruntime writes close to cache when the kernel reads them."""


def perplexity_of(nll: float, tokens: int) -> float:
    """``exp(nll / tokens)`` for a total ``nll`` in nats; ``inf`` instead of an
    ``OverflowError`` for a diverged model (mean NLL above ~709 nats), NaN for a NaN ``nll``
    (a model whose logits hold NaN)."""
    mean = nll / tokens
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 709.0 else math.inf


def finite_or_none(x) -> float | None:
    """``x`` as a float, or None when it is not finite: what strict JSON (which has no NaN or
    Infinity) stores for it."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def bits(nats: float) -> float:
    """``nats`` expressed in bits."""
    return nats / LN2


def default_max_tokens(vocab_size: int) -> int:
    """Padded positions per batch so that its float32 logits [B, T, V] fit
    :data:`LOGITS_BUDGET_BYTES` (at least 256)."""
    return max(256, LOGITS_BUDGET_BYTES // (4 * vocab_size))
