"""The TensorFlow steps of training and validation, and the contracts between them, the
trainer and the recipes' models (``typing.Protocol``: nothing inherits them, a class
satisfies one by having its members; ``tests/test_train.py`` checks both recipes' steps and
models against them):

    TrainStep    what the trainer calls: ``start_epoch()`` before an epoch's first batch,
                 ``step(batch, loss_scale) -> (summed NLL, tokens)`` on each batch in order;
                 ``BatchStep`` (random batches, padded or packed: the course recipe) and
                 ``StreamStep`` (one stream, the state carried: the tied recipe)
    RecipeModel  what the steps, the ``Validator``, the checkpoint and the trainer call on a
                 model: ``LanguageModel`` (course) and ``TiedLanguageModel`` (tied);
                 ``PackedModel`` adds what ``BatchStep`` needs (``run_lstm_packed``),
                 ``StreamModel`` what ``StreamStep`` needs (``run_stream``)
    Validator    the validation NLL of whole sentences, windowed so that memory stays bounded
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

from lmonnx.batching import PackedBatch, bucketed_batches
from lmonnx.metrics import default_max_tokens
from lmonnx.windows import CarriedWindows

__all__ = ["TrainStep", "RecipeModel", "PackedModel", "StreamModel", "BatchStep",
           "StreamStep", "Validator", "evaluate_nll"]


# ---- the contracts ---------------------------------------------------------------------------

@runtime_checkable
class TrainStep(Protocol):
    """One recipe's optimizer step as the trainer drives it, an epoch at a time."""

    def start_epoch(self) -> None:
        """Called before the first batch of every epoch (a new stream starts from zero
        states; random batches carry nothing over)."""

    def __call__(self, batch: Any, loss_scale: np.float32) -> tuple[Any, Any]:
        """One optimizer step on ``batch`` (the epoch's next one) with its summed loss divided
        by ``loss_scale``; (summed NLL in nats, tokens), as scalar tensors."""


@runtime_checkable
class RecipeModel(Protocol):
    """What training calls on a recipe's model.  The settings (``ModelSettings``), the
    Keras members (``trainable_variables``, ``variables``, ``name``, ``build``,
    ``count_params``, ``save``) and the model's own: ``run_lstm`` / ``calculate_loss``
    (validation's batches; the course's step), ``run_lstm_carrying`` / ``zero_states``
    (validation's windows of a long sentence), ``seeded_layers`` (the checkpoint's keys)."""

    vocab_size: int
    num_lstm_units: int
    num_lstm_layers: int
    embedding_dim: int
    epoch: int | None
    name: str
    trainable_variables: list
    variables: list

    def build(self, input_shape=(None, None)) -> None: ...

    def count_params(self) -> int: ...

    def save(self, filepath, *args, **kwargs) -> None: ...

    def run_lstm(self, input_sequences, training: bool = False) -> tuple:
        """(outputs [batch, time, units], int32 mask ``sign(inputs)``) of right-padded
        sentences from the zero state."""

    def run_lstm_carrying(self, input_sequences, states=None) -> tuple:
        """(outputs, mask, states after the last position) of unpadded rows from ``states``
        (None: zeros), no dropout."""

    def zero_states(self, batch_size) -> list:
        """A sentence start's states, in the form ``run_lstm_carrying`` takes."""

    def calculate_loss(self, lstm_outputs, binary_sequences, output_sequences):
        """Summed masked NLL in nats."""

    def seeded_layers(self) -> list:
        """(unique name, layer) of every layer drawing dropout masks."""


@runtime_checkable
class PackedModel(RecipeModel, Protocol):
    """A model ``BatchStep`` trains (``LanguageModel``)."""

    def run_lstm_packed(self, input_sequences, carry, training: bool = False) -> tuple:
        """``run_lstm`` of rows holding windows end to end, the state reset where ``carry``
        is 0."""


@runtime_checkable
class StreamModel(RecipeModel, Protocol):
    """A model ``StreamStep`` trains (``TiedLanguageModel``)."""

    def run_stream(self, input_ids, states, training: bool = False, mask=None) -> tuple:
        """(outputs, new states) of the stack from ``states`` (``[h, c]`` per layer)."""


# ---- the steps -------------------------------------------------------------------------------

class BatchStep:
    """``step(batch, loss_scale) -> (summed NLL, tokens)``: one optimizer step on a ``Batch``
    or a ``PackedBatch`` (the same windows' summed loss and gradient either way).  Random
    batches: nothing carries over from one to the next, so ``start_epoch`` does nothing."""

    def __init__(self, model: PackedModel, optimizer):
        import tensorflow as tf

        spec = tf.TensorSpec((None, None), tf.int32)
        scale = tf.TensorSpec((), tf.float32)

        def descend(run_lstm, lstm_inputs, targets, loss_scale):
            """One optimizer step on ``run_lstm(*lstm_inputs)``'s summed loss; (its NLL, tokens)."""
            with tf.GradientTape() as tape:
                lstm_outputs, binary_sequences = run_lstm(*lstm_inputs, training=True)
                loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
                tokens = tf.math.reduce_sum(tf.cast(binary_sequences, tf.float32))
                # The course minimised the sum; dividing it by the batch's tokens gives every
                # token the same weight with the step size (and clipping threshold) of a mean.
                loss = loss_sum / loss_scale
            variables = model.trainable_variables
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables))
            return loss_sum, tokens

        @tf.function(input_signature=(spec, spec, scale))
        def train_step(inputs, targets, loss_scale):
            return descend(model.run_lstm, (inputs,), targets, loss_scale)

        @tf.function(input_signature=(spec, spec, tf.TensorSpec((None, None), tf.float32),
                                      scale))
        def packed_train_step(inputs, targets, carry, loss_scale):
            # Packed rows: the same summed loss of the same windows, so the same gradient as
            # their padded batch, in fewer rows (lmonnx.batching.pack_rows).
            return descend(model.run_lstm_packed, (inputs, carry), targets, loss_scale)

        self._step, self._packed_step = train_step, packed_train_step

    def start_epoch(self) -> None:
        """Nothing to reset: no state carries over between random batches."""

    def __call__(self, batch, loss_scale):
        if isinstance(batch, PackedBatch):
            return self._packed_step(batch.inputs, batch.targets, batch.carry, loss_scale)
        return self._step(batch.inputs, batch.targets, loss_scale)


class StreamStep:
    """``step(window, loss_scale) -> (summed NLL, tokens)``: one optimizer step on a window of
    the training stream (``lmonnx.batching.StreamWindow``), from the LSTM states the previous
    window ended in (truncated backpropagation: no gradient flows back across windows).
    ``start_epoch`` starts a new stream from zero states."""

    def __init__(self, model: StreamModel, optimizer):
        import tensorflow as tf

        self.model, self.states = model, None
        spec = tf.TensorSpec((None, None), tf.int32)
        states_spec = tf.TensorSpec((model.num_lstm_layers, 2, None, model.num_lstm_units),
                                    tf.float32)

        @tf.function(input_signature=(spec, spec, states_spec, tf.TensorSpec((), tf.float32)))
        def step(inputs, targets, states, loss_scale):
            with tf.GradientTape() as tape:
                outputs, new_states = model.run_stream(
                    inputs, [[s[0], s[1]] for s in tf.unstack(states)], training=True)
                binary = tf.math.sign(inputs)
                loss_sum = model.calculate_loss(outputs, binary, targets)
                loss = loss_sum / loss_scale  # a per-token mean, as the course's steps
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            tokens = tf.math.reduce_sum(tf.cast(binary, tf.float32))
            return loss_sum, tokens, tf.stack([tf.stack(s) for s in new_states])

        self._step = step

    def start_epoch(self) -> None:
        """A new stream: the next window starts from zero states."""
        self.states = None

    def __call__(self, window, loss_scale):
        if self.states is None or self.states.shape[2] != window.inputs.shape[0]:
            self.states = np.zeros((self.model.num_lstm_layers, 2, window.inputs.shape[0],
                                    self.model.num_lstm_units), np.float32)
        loss_sum, tokens, self.states = self._step(window.inputs, window.targets, self.states,
                                                   loss_scale)
        return loss_sum, tokens


# ---- validation ------------------------------------------------------------------------------

class Validator:
    """The evaluation steps of one model, traced once and kept for every epoch."""

    def __init__(self, model: RecipeModel):
        import tensorflow as tf

        spec = tf.TensorSpec((None, None), tf.int32)
        self.model = model

        @tf.function(input_signature=(spec, spec))
        def batch_step(inputs, targets):
            lstm_outputs, binary_sequences = model.run_lstm(inputs, training=False)
            loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
            return loss_sum, tf.math.reduce_sum(tf.cast(binary_sequences, tf.float32))

        @tf.function(reduce_retracing=True)
        def window_step(inputs, targets, states):
            lstm_outputs, binary_sequences, states = model.run_lstm_carrying(inputs, states)
            loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
            return loss_sum, states

        self.batch_step, self.window_step = batch_step, window_step

    def nll(self, pairs: Iterable, max_tokens: int, max_batch_size: int) -> tuple[float, int]:
        """(total NLL in nats, tokens): sentences within ``max_tokens`` in length buckets, a
        longer one alone in consecutive windows of ``max_tokens`` positions carrying the
        LSTM state (one pass's NLL to float rounding, memory bounded by the budget)."""
        short, nll, tokens = [], 0.0, 0
        for key, x, y in pairs:
            if len(x) <= max_tokens:
                short.append((key, x, y))
                continue
            windows = CarriedWindows(len(x), max_tokens, self.model.zero_states(1))
            for _, loss_sum in windows.run_all(
                    lambda part, states: self.window_step(x[None, part], y[None, part], states)):
                nll += float(loss_sum)
            tokens += len(x)
        for batch in bucketed_batches(short, max_tokens=max_tokens,
                                      max_batch_size=max_batch_size):
            loss_sum, n = self.batch_step(batch.inputs, batch.targets)
            nll += float(loss_sum)
            tokens += int(n)
        return nll, tokens


def evaluate_nll(model: RecipeModel, pairs: Iterable, *, max_tokens: int | None = None,
                 max_batch_size: int = 128, validator: Validator | None = None
                 ) -> tuple[float, int]:
    """Total NLL (nats, float64) and scored tokens of ``(key, inputs, targets)`` pairs of
    whole sentences; perplexity is ``exp(nll / tokens)``.

    ``max_tokens`` (default: evaluation's logits budget for the model's vocabulary) bounds
    the positions one batch holds: a longer sentence is scored in windows that carry the LSTM
    state.  ``validator`` reuses the traced steps of an earlier call on the same model.
    """
    if max_tokens is None:
        max_tokens = default_max_tokens(model.vocab_size)  # the same budget as evaluation
    validator = validator if validator is not None else Validator(model)
    pairs = ((k, np.asarray(x, np.int32), np.asarray(y, np.int32)) for k, x, y in pairs)
    return validator.nll(pairs, max_tokens, max_batch_size)
