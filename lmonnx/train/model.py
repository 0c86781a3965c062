"""The course's ``LanguageModel``, in Keras 3, with its slips fixed (see ARCHITECTURE.md).

    input_sequences  int32 [batch, time]   <s> w1 .. wn, then 0 padding at the end
          |  get_input_embeddings: Embedding(vocab_size, int(vocab_size ** 0.25)), mask_zero
          v
    embeddings       float32 [batch, time, embedding_dim]
          |  run_lstm: RNN(StackedRNNCells([LSTMCell(num_lstm_units)] * num_lstm_layers))
          v
    lstm_outputs     float32 [batch, time, num_lstm_units]
          |  Dense(vocab_size)
          v
    logits           float32 [batch, time, vocab_size]     (what ``model(ids)`` returns)

``calculate_loss`` is the course's: sparse softmax cross-entropy against the targets
(``w1 .. wn </s>``), times the float32 padding mask ``sign(input_sequences)``, summed, in nats.

What changed from the course: ``dropout`` is a drop *rate*, active only when called with
``training=True`` (the course passed a keep probability of 0.5 as the rate); the stacked cell,
not the cell list, drives the RNN; no ``input_length``; the embedding has ``vocab_size`` rows
because ids 0..3 are the specials (0 = padding) and words start at 4.

Training keeps ``RNN(StackedRNNCells)``: on a CPU (no cuDNN) Keras runs a masked fused
``keras.layers.LSTM`` through the same per-step ``LSTMCell`` loop, one loop per layer, and it
measured slower per training step (1.09x the time of the stacked cells for 2x128 over a
104-word vocabulary, 1.05x for 2x200 over 10000 words; 2-core x86-64, Keras 3.15).

``run_lstm_packed`` runs the same cells over packed training rows (several windows end to end,
the state reset at each): what the trainer trains on by default, the same loss and gradient as
the padded batch in fewer rows.

Export rebuilds the same network from fused ``keras.layers.LSTM`` layers without the mask
(``inference_model``): with right padding a causal LSTM's outputs at real positions do not
depend on the padding, and tf2onnx turns only unmasked LSTM layers into ONNX ``LSTM`` ops.
"""

from __future__ import annotations

import lmonnx.train._tensorflow  # noqa: F401  (TensorFlow's start-up, quiet, before Keras)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from lmonnx.validation import check_int, check_real  # noqa: E402

__all__ = ["LanguageModel", "ModelSettings", "default_embedding_dim", "masked_nll"]


def default_embedding_dim(vocab_size: int) -> int:
    """The course's embedding size: ``int(vocab_size ** 0.25)``."""
    return int(vocab_size ** 0.25)


class ModelSettings:
    """What both recipes' models share: their settings, checked, and Keras (de)serialization
    of them (``get_config`` / ``from_config``).  Mixed in before ``keras.Model``."""

    def set_settings(self, vocab_size: int, max_length: int, num_lstm_units: int,
                     num_lstm_layers: int, embedding_dim: int, dropout: float,
                     epoch: int | None) -> None:
        for name, value, low in (("vocab_size", vocab_size, 5), ("max_length", max_length, 1),
                                 ("num_lstm_units", num_lstm_units, 1),
                                 ("num_lstm_layers", num_lstm_layers, 1),
                                 ("embedding_dim", embedding_dim, 1)):
            check_int(name, value, low=low)
        check_real("dropout", dropout, low=0.0, high=1.0, high_open=True, why="a drop rate")
        self.vocab_size, self.max_length = vocab_size, max_length
        self.num_lstm_units, self.num_lstm_layers = num_lstm_units, num_lstm_layers
        self.embedding_dim, self.dropout, self.epoch = embedding_dim, float(dropout), epoch

    def get_config(self):
        config = super().get_config()
        config.update(vocab_size=self.vocab_size, max_length=self.max_length,
                      num_lstm_units=self.num_lstm_units, num_lstm_layers=self.num_lstm_layers,
                      embedding_dim=self.embedding_dim, dropout=self.dropout, epoch=self.epoch)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def inference_inputs(self) -> tuple:
        """The export form's inputs: ``input_ids`` int32 [batch, time], ``state_h`` and
        ``state_c`` float32 [batch, layers, units] (builds the model first if needed)."""
        if not self.built:
            self.build()
        layers, units = self.num_lstm_layers, self.num_lstm_units
        return (keras.Input((None,), dtype="int32", name="input_ids"),
                keras.Input((layers, units), name="state_h"),
                keras.Input((layers, units), name="state_c"))


@keras.saving.register_keras_serializable(package="lmonnx")
class LanguageModel(ModelSettings, keras.Model):
    """Stacked-LSTM word language model mapping int32 ids [batch, time] to float32 logits
    [batch, time, vocab_size].  What training calls on it is declared by
    :class:`lmonnx.train.steps.PackedModel` (``BatchStep`` trains it).

    Parameters
    ----------
    vocab_size : number of token ids, the four specials included (>= 5).
    max_length : longest training window in tokens (the model itself runs on any length).
    num_lstm_units, num_lstm_layers : size and depth of the LSTM stack.
    embedding_dim : None for the course's ``int(vocab_size ** 0.25)``.
    dropout : drop rate in [0, 1) on each LSTM cell's inputs, only while training.
    epoch : the training epoch the weights are from (the trainer sets it before saving;
        ``lmonnx.rundir.RunDir.model_epoch`` reads it from ``model.keras``).
    """

    def __init__(self, vocab_size: int, max_length: int, num_lstm_units: int,
                 num_lstm_layers: int, *, embedding_dim: int | None = None,
                 dropout: float = 0.0, epoch: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim is None:
            embedding_dim = default_embedding_dim(vocab_size)
        self.set_settings(vocab_size, max_length, num_lstm_units, num_lstm_layers,
                          embedding_dim, dropout, epoch)

        self.embedding = keras.layers.Embedding(
            vocab_size, embedding_dim, embeddings_initializer="uniform", mask_zero=True,
            name="embedding")
        self.rnn = keras.layers.RNN(self.stacked_lstm_cells(), return_sequences=True,
                                    name="lstm_stack")
        self.dense = keras.layers.Dense(vocab_size, name="logits")

    # ---- the course's methods ------------------------------------------------------------

    def make_lstm_cell(self, dropout: float, index: int = 0) -> keras.layers.LSTMCell:
        """One LSTM cell; ``dropout`` is a drop rate applied to its inputs in training."""
        return keras.layers.LSTMCell(self.num_lstm_units, dropout=dropout, name=f"lstm_{index}")

    def stacked_lstm_cells(self):
        """``num_lstm_layers`` cells stacked into one cell (the course returned the list).

        A single layer is its bare cell: Keras 3.15's ``StackedRNNCells`` of one cell mixes up
        its state structure when a mask flows into the RNN.
        """
        cells = [self.make_lstm_cell(self.dropout, i) for i in range(self.num_lstm_layers)]
        if len(cells) == 1:
            return cells[0]
        return keras.layers.StackedRNNCells(cells, name="stacked_cells")

    def get_input_embeddings(self, input_sequences):
        """float32 [batch, time, embedding_dim], carrying the padding mask (``mask_zero``)."""
        return self.embedding(input_sequences)

    def run_lstm(self, input_sequences, training: bool = False):
        """LSTM outputs [batch, time, units] and the int32 padding mask ``sign(inputs)``."""
        input_sequences = tf.convert_to_tensor(input_sequences, dtype=tf.int32)
        input_embeddings = self.get_input_embeddings(input_sequences)
        binary_sequences = tf.math.sign(input_sequences)
        lstm_outputs = self.rnn(input_embeddings, training=training)
        return lstm_outputs, binary_sequences

    def run_lstm_packed(self, input_sequences, carry, training: bool = False):
        """``run_lstm`` over packed rows (``lmonnx.batching.pack_rows``): several sequences
        end to end in each row, the state restarting from zero wherever ``carry`` (float32
        [batch, time]) is 0.  Returns the same pair as ``run_lstm``; at the real positions of
        each sequence the outputs are those of ``run_lstm`` on that sequence alone.

        The same cells (the same weights) run in a second ``RNN`` that is not part of the model,
        so what is saved and exported is unchanged.  No padding mask is needed: padding comes
        only after a row's last sequence, where outputs are not scored.  Input dropout masks are
        drawn once per row, as ``run_lstm`` draws one per sentence.
        """
        input_sequences = tf.convert_to_tensor(input_sequences, dtype=tf.int32)
        carry = tf.convert_to_tensor(carry, dtype=tf.float32)
        # A new tensor: the embedding's padding mask does not ride along into the RNN.
        steps = tf.concat([self.get_input_embeddings(input_sequences), carry[..., None]], -1)
        cell = _RestartingCells(self.rnn.cell)
        cell.draw_dropout_masks(tf.shape(input_sequences)[0], self.embedding_dim, training)
        try:
            lstm_outputs = keras.layers.RNN(cell, return_sequences=True)(steps, training=training)
        finally:
            cell.forget_dropout_masks()
        return lstm_outputs, tf.math.sign(input_sequences)

    def run_lstm_carrying(self, input_sequences, states=None):
        """``run_lstm`` (no dropout) from the LSTM ``states`` a previous call returned (None:
        zeros), for unpadded rows: (outputs [batch, time, units], mask, states after the last
        position).  Consecutive windows of a sentence, each started from the state the one
        before ended in, give the outputs of one pass over the whole sentence."""
        input_sequences = tf.convert_to_tensor(input_sequences, dtype=tf.int32)
        rnn = keras.layers.RNN(self.rnn.cell, return_sequences=True, return_state=True)
        lstm_outputs, *states = rnn(self.get_input_embeddings(input_sequences),
                                    initial_state=states, training=False)
        return lstm_outputs, tf.math.sign(input_sequences), states

    def zero_states(self, batch_size: int) -> list:
        """The LSTM states of a sentence's start, in the structure ``run_lstm_carrying`` takes."""
        zeros = tf.zeros((batch_size, self.num_lstm_units))
        if self.num_lstm_layers == 1:
            return [zeros, zeros]
        return [[zeros, zeros] for _ in range(self.num_lstm_layers)]

    def get_logits(self, lstm_outputs):
        """float32 [batch, time, vocab_size]."""
        return self.dense(lstm_outputs)

    def calculate_loss(self, lstm_outputs, binary_sequences, output_sequences):
        """Summed masked NLL in nats over the batch (a scalar float32 tensor).

        ``output_sequences`` int32 [batch, time] are the targets; ``binary_sequences`` the
        padding mask of the inputs (``sign(input_sequences)``), 1 where a target counts.

        The course's sum, computed at the real positions only: :func:`masked_nll`.
        """
        return masked_nll(self.get_logits, lstm_outputs, binary_sequences, output_sequences)

    def get_word_predictions(self, word_preds, binary_sequences):
        """Each sequence's prediction at its last real (unpadded) position: int [batch]."""
        final_indexes = tf.math.reduce_sum(binary_sequences, axis=1) - 1
        return tf.gather(word_preds, tf.cast(final_indexes, tf.int32), axis=1, batch_dims=1)

    def predict_words(self, input_sequences) -> dict:
        """The course's predictions: softmax ``probabilities`` [batch, time, vocab], argmax
        ``word_preds`` int32 [batch, time] and ``next_word`` int32 [batch], the word predicted
        after each sequence's last real token."""
        lstm_outputs, binary_sequences = self.run_lstm(input_sequences, training=False)
        probabilities = tf.nn.softmax(self.get_logits(lstm_outputs), axis=-1)
        word_preds = tf.cast(tf.math.argmax(probabilities, axis=-1), tf.int32)
        next_word = self.get_word_predictions(word_preds, binary_sequences)
        return {"probabilities": probabilities, "word_preds": word_preds,
                "next_word": next_word}

    # ---- Keras plumbing ------------------------------------------------------------------

    def call(self, input_sequences, training=False):
        lstm_outputs, _ = self.run_lstm(input_sequences, training=training)
        return self.get_logits(lstm_outputs)

    def build(self, input_shape=(None, None)):
        self.embedding.build(input_shape)
        self.rnn.build((None, None, self.embedding_dim))
        self.dense.build((None, None, self.num_lstm_units))
        self.built = True

    @property
    def cells(self) -> list:
        """The LSTM cells, bottom first."""
        return _cells_of(self.rnn.cell)

    def output_weights(self) -> tuple:
        """(kernel float32 [units, vocab], bias [vocab]) of the output layer, as arrays."""
        kernel, bias = self.dense.get_weights()
        return kernel, bias

    def seeded_layers(self) -> list:
        """(unique name, layer) of every layer drawing dropout masks (the checkpoint's keys)."""
        return [(cell.name, cell) for cell in self.cells
                if getattr(cell, "seed_generator", None) is not None]

    def inference_model(self) -> keras.Model:
        """The same network, weights copied, as Embedding (no mask) -> ``keras.layers.LSTM``
        x ``num_lstm_layers`` -> Dense: the form tf2onnx turns into fused ONNX ``LSTM`` ops.

        Inputs ``[input_ids int32 [batch, time], state_h, state_c float32 [batch, layers,
        units]]`` (each layer's initial state; zeros start a sentence); outputs ``[logits
        [batch, time, vocab], state_h, state_c [batch, layers, units]]`` after the last
        position.  With zero states its logits equal this model's at every real position of
        right-padded input.
        """
        layers, units = self.num_lstm_layers, self.num_lstm_units
        ids, state_h, state_c = self.inference_inputs()
        embedding = keras.layers.Embedding(self.vocab_size, self.embedding_dim,
                                           name="embedding")
        x = embedding(ids)
        lstms, hs, cs = [], [], []
        for i in range(layers):
            layer = keras.layers.LSTM(units, return_sequences=True, return_state=True,
                                      name=f"lstm_{i}")
            x, h, c = layer(x, initial_state=[state_h[:, i], state_c[:, i]])
            lstms.append(layer)
            hs.append(h)
            cs.append(c)
        dense = keras.layers.Dense(self.vocab_size, name="logits")
        logits = dense(x)
        model = keras.Model([ids, state_h, state_c],
                            [logits, keras.ops.stack(hs, axis=1), keras.ops.stack(cs, axis=1)],
                            name="lmonnx_inference")
        embedding.set_weights(self.embedding.get_weights())
        # LSTMCell and LSTM share the kernel / recurrent_kernel / bias layout (gates i f c o).
        for layer, cell in zip(lstms, self.cells):
            layer.cell.set_weights(cell.get_weights())
        dense.set_weights(self.dense.get_weights())
        return model


def masked_nll(get_logits, lstm_outputs, binary_sequences, output_sequences):
    """The course's loss: summed sparse softmax cross-entropy in nats (a float32 scalar) of
    ``get_logits(lstm_outputs)`` against ``output_sequences`` (int [batch, time]), times the
    padding mask ``binary_sequences`` (int [batch, time], 1 where a target counts).

    A padded position adds 0 whatever its logits, so the logits are computed at the real
    positions only (``tf.boolean_mask``): the same sum without the padding's share of the
    output layer, most of a step's work for a large vocabulary.
    """
    real = tf.math.not_equal(binary_sequences, 0)
    logits = get_logits(tf.boolean_mask(lstm_outputs, real))  # [real positions, vocab]
    batch_sequence_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.boolean_mask(tf.cast(output_sequences, tf.int32), real), logits=logits)
    unpadded_loss = batch_sequence_loss * tf.boolean_mask(
        tf.cast(binary_sequences, tf.float32), real)  # the course's mask: all ones here
    return tf.math.reduce_sum(unpadded_loss)


def _cells_of(cell) -> list:
    """The LSTM cells behind the RNN's cell (a StackedRNNCells, or one bare cell), bottom first."""
    return list(cell.cells) if isinstance(cell, keras.layers.StackedRNNCells) else [cell]


class _RestartingCells(keras.layers.Layer):
    """Training-only view of the model's cells for packed rows: each step's input carries one
    extra feature, ``carry``, multiplied into every state before the cells run (0 restarts a
    sequence from the zero state).  No weights of its own."""

    def __init__(self, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell
        self.state_size = cell.state_size
        self.output_size = cell.output_size

    def build(self, input_shape):
        self.built = True  # the wrapped cells are the model's, built already

    def get_initial_state(self, batch_size=None):
        return self.cell.get_initial_state(batch_size=batch_size)

    def draw_dropout_masks(self, batch_size, input_dim: int, training: bool) -> None:
        """Fix each cell's input dropout mask for this call (Keras's RNN does this only for
        cells it recognises), one mask per row, as ``RNN`` draws one per sequence."""
        if not training:
            return
        for cell in _cells_of(self.cell):
            if getattr(cell, "dropout", 0) > 0:
                cell.get_dropout_mask(tf.ones(tf.stack([batch_size, input_dim])))
            input_dim = cell.units

    def forget_dropout_masks(self) -> None:
        for cell in _cells_of(self.cell):
            if hasattr(cell, "reset_dropout_mask"):
                cell.reset_dropout_mask()

    def call(self, inputs, states, training=False):
        x, carry = inputs[:, :-1], inputs[:, -1:]
        states = tf.nest.map_structure(lambda s: s * carry, states)
        return self.cell(x, states, training=training)
