"""Export's self-checks: the ONNX model against Keras, and the stateful contract.

Both run on sample sentences cut into training windows (``batching.split_windows`` at the
model's ``max_length``, as training cuts them), at most ``SAMPLE_TOKENS`` positions in all, so
a corpus whose validation text is one 300k-word line checks in seconds, like any other: eager
Keras never sees more than ``max_length`` positions per row.

- parity (``check_parity``): the session users run (``lmonnx.runtime.ModelSession``) against
  the trained Keras model (the masked one): logits at real positions within ``LOGIT_ATOL``,
  each batch's masked loss (``lmonnx.evaluate.score_batch``'s NLL, what evaluation computes,
  vs Keras ``calculate_loss``) within ``LOSS_RTOL``;
- state (``check_state``): each row's NLL in a padded batch equals its NLL alone run in two
  halves carrying the state (``score_batch`` with a window; within ``LOSS_RTOL``), and its
  returned state in the padded batch equals its state alone (within ``STATE_ATOL``).

Losses are summed NLL in nats.  No TensorFlow import here: the Keras model comes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from lmonnx.batching import bucketed_batches, pad_batch, split_windows
from lmonnx.errors import ExportError
from lmonnx.examples import Example

LOGIT_ATOL = 1e-4
"""Largest |ONNX logit - Keras logit| allowed at a real (unpadded) position."""
LOSS_RTOL = 1e-5
"""Largest |ONNX loss - Keras loss| / |Keras loss| allowed for any sample batch; also the
largest relative change of a row's loss when it is scored in two halves carrying the state."""
STATE_ATOL = 1e-5
"""Largest |state of a row in a padded batch - its state alone|."""
SAMPLE_TOKENS = 8192
"""Positions checked (up to one window more): the windows of the first sample sentences."""
MAX_BATCH_TOKENS = 4096
MAX_BATCH_SIZE = 32


def relative_difference(value: float, reference: float) -> float:
    """``|value - reference| / |reference|``: 0 when both are 0, ``inf`` when only the
    reference is 0 or either is NaN (a NaN must fail every ``<=`` limit loudly)."""
    if math.isnan(value) or math.isnan(reference):
        return math.inf
    if reference == 0.0:
        return 0.0 if value == 0.0 else math.inf
    difference = abs(value - reference) / abs(reference)
    return difference if math.isfinite(difference) else math.inf


def sample_windows(examples: Iterable[Example], window: int,
                   max_tokens: int = SAMPLE_TOKENS) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
    """``(key, inputs, targets)`` items: each example cut into windows of at most ``window``
    positions (key ``(example key, window number)``), until ``max_tokens`` positions are
    taken (the window that reaches the bound is kept whole)."""
    items, tokens = [], 0
    for example in examples:
        for number, (x, y) in enumerate(split_windows(example.inputs, example.targets, window)):
            if tokens >= max_tokens:
                return items
            items.append(((example.key, number), x, y))
            tokens += len(x)
    return items


def _batches(items):
    return bucketed_batches(items, max_tokens=MAX_BATCH_TOKENS, max_batch_size=MAX_BATCH_SIZE)


@dataclass
class ParityReport:
    """onnxruntime against Keras on sample windows.  Losses are summed NLL in nats."""

    source: str
    sentences: int
    windows: int
    tokens: int
    batches: int
    max_logit_abs_diff: float
    loss_keras: float
    loss_onnx: float
    max_batch_loss_rel_diff: float

    @property
    def loss_rel_diff(self) -> float:
        return relative_difference(self.loss_onnx, self.loss_keras)

    @property
    def ok(self) -> bool:
        return (self.max_logit_abs_diff <= LOGIT_ATOL
                and self.max_batch_loss_rel_diff <= LOSS_RTOL)

    def describe(self) -> str:
        return (f"max |logit diff| {self.max_logit_abs_diff:.2e} (limit {LOGIT_ATOL:.0e}), "
                f"loss rel diff {self.max_batch_loss_rel_diff:.2e} worst batch / "
                f"{self.loss_rel_diff:.2e} total (limit {LOSS_RTOL:.0e}) on {self.tokens} "
                f"tokens of {self.sentences} sentences ({self.windows} windows, "
                f"{self.batches} batches) of {self.source}")


def _batch_parity(model, session, batch) -> tuple[float, float, float]:
    """(max |logit diff| at real positions, Keras loss, ONNX loss) of one batch."""
    from lmonnx.evaluate import score_batch

    lstm_outputs, binary = model.run_lstm(batch.inputs, training=False)
    keras_logits = model.get_logits(lstm_outputs).numpy()
    keras_loss = float(model.calculate_loss(lstm_outputs, binary, batch.targets))
    onnx_logits = session.logits(batch.inputs)
    if onnx_logits.shape != keras_logits.shape:
        raise ExportError(f"onnxruntime logits have shape {onnx_logits.shape}, Keras "
                          f"{keras_logits.shape}")
    real = batch.mask > 0
    diff = np.abs(onnx_logits[real] - keras_logits[real])
    worst = float(diff.max()) if diff.size and not np.isnan(diff).any() else (
        math.inf if diff.size else 0.0)
    return worst, keras_loss, math.fsum(r.nll for r in score_batch(session, batch))


def check_parity(model, session, examples: Iterable[Example], source: str, *,
                 window: int | None = None) -> ParityReport:
    """Compare the onnxruntime model in ``session`` (a :class:`lmonnx.runtime.ModelSession`)
    with the Keras ``model`` on bucketed batches of ``examples`` cut into windows of
    ``window`` positions (default: the model's ``max_length``)."""
    items = sample_windows(examples, window or model.max_length)
    max_diff, loss_k, loss_o, worst_rel, tokens, n_batches = 0.0, 0.0, 0.0, 0.0, 0, 0
    for batch in _batches(items):
        diff, keras_loss, onnx_loss = _batch_parity(model, session, batch)
        max_diff = max(max_diff, diff)
        worst_rel = max(worst_rel, relative_difference(onnx_loss, keras_loss))
        loss_k += keras_loss
        loss_o += onnx_loss
        tokens += batch.tokens
        n_batches += 1
    sentences = len({key for key, _ in (item[0] for item in items)})
    return ParityReport(source, sentences, len(items), tokens, n_batches, max_diff, loss_k,
                        loss_o, worst_rel)


@dataclass
class StateReport:
    """The stateful graph checked on sample windows: halves vs one pass, rows vs alone."""

    batches: int
    max_halves_loss_rel_diff: float
    max_row_state_abs_diff: float

    @property
    def ok(self) -> bool:
        checks = ((self.max_halves_loss_rel_diff, LOSS_RTOL),
                  (self.max_row_state_abs_diff, STATE_ATOL))
        return all(value <= limit for value, limit in checks)  # NaN fails too

    def describe(self) -> str:
        return (f"a row alone in two halves carrying the state vs in its padded batch: loss "
                f"rel diff {self.max_halves_loss_rel_diff:.2e} (limit {LOSS_RTOL:.0e}); its "
                f"state alone vs in the batch: {self.max_row_state_abs_diff:.2e} (limit "
                f"{STATE_ATOL:.0e}); {self.batches} batches")


def _row_state_checks(session, batch, whole, h, c) -> tuple[float, float]:
    """(worst halves loss rel diff, worst state abs diff) over the rows of ``batch``, given
    its one-pass results ``whole`` and returned state ``h``, ``c`` [layers, batch, units]."""
    from lmonnx.evaluate import score_batch

    worst_halves, worst_state = 0.0, 0.0
    for r in range(len(batch)):
        n = int(batch.lengths[r])
        alone = pad_batch([(batch.inputs[r, :n], batch.targets[r, :n])])
        _, (h_r, c_r) = session.run(alone.inputs)
        worst_state = max(worst_state, float(np.abs(h_r[:, 0] - h[:, r]).max()),
                          float(np.abs(c_r[:, 0] - c[:, r]).max()))
        if n > 1:  # two windows of ceil(n / 2), the state carried between them
            (halves,) = score_batch(session, alone, window=(n + 1) // 2)
            worst_halves = max(worst_halves, relative_difference(halves.nll, whole[r].nll))
    return worst_halves, worst_state


def check_state(session, examples: Iterable[Example], *, window: int) -> StateReport:
    """The stateful contract on bucketed batches of ``examples`` cut into windows of
    ``window`` positions, through ``session`` (a :class:`lmonnx.runtime.ModelSession`)."""
    from lmonnx.evaluate import score_batch

    worst_halves, worst_state, n = 0.0, 0.0, 0
    for batch in _batches(sample_windows(examples, window)):
        _, (h, c) = session.run(batch.inputs)
        halves, state = _row_state_checks(session, batch, score_batch(session, batch), h, c)
        worst_halves, worst_state = max(worst_halves, halves), max(worst_state, state)
        n += 1
    return StateReport(n, worst_halves, worst_state)
