"""The default recipe's model: a stacked LSTM whose output layer is its embedding matrix.

    input_ids        int32 [batch, time]
          |  Embedding(vocab_size, units)                       E: float32 [vocab, units]
          |  locked dropout (one mask per row and window)
          v
    x                float32 [batch, time, units]
          |  (keras.layers.LSTM(units) -> locked dropout) x num_lstm_layers
          v
    h                float32 [batch, time, units]
          |  h @ E^T + output_bias                              the same E: tied
          v
    logits           float32 [batch, time, vocab_size]

Why each piece (the recipe: README, "``lmonnx train CORPUS``"; what it gains: README,
Benchmarks, "Model quality against KenLM"):

* Weight tying (Press & Wolf 2017; Inan et al. 2017): the output layer's [vocab, units]
  matrix is the embedding.  It halves the parameters of a 10k-word 2x200 model and is the
  largest single gain at this scale; it forces ``embedding_dim == num_lstm_units``.
* Locked (variational) dropout (Gal & Ghahramani 2016): one mask per row, drawn per window and
  reused at every time step, on the embeddings, between the layers and before the output
  (``keras.layers.Dropout`` with ``noise_shape (batch, 1, width)``).
* Fused ``keras.layers.LSTM`` layers, not the course's ``RNN(StackedRNNCells)``: the same cell
  maths (gates i f c o, the Keras layout), and the layers take and return their states, which
  is what training on a carried stream needs (``run_stream``) and what export converts
  (``inference_model`` reuses these very layers).

Training (``lmonnx.train.steps.StreamStep``) runs the text as one stream, carrying the
state from window to window; evaluation and the exported graph start every sentence from the
zero state, as ``LanguageModel`` does.  The loss is the course's: masked sparse softmax
cross-entropy, summed, in nats (:func:`lmonnx.train.model.masked_nll`).
"""

from __future__ import annotations

import lmonnx.train._tensorflow  # noqa: F401  (TensorFlow's start-up, quiet, before Keras)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lmonnx.errors import InvalidArgumentError  # noqa: E402
from lmonnx.factored import SOFTMAX_CHOICES, TAIL_SHRINK, check_cutoffs, tail_dims  # noqa: E402
from lmonnx.train.model import ModelSettings, masked_nll  # noqa: E402
from lmonnx.validation import check_choice  # noqa: E402

__all__ = ["TiedLanguageModel"]

EMBEDDING_INIT = 0.1
"""Embeddings start uniform in [-0.1, 0.1] (Zaremba et al.; pytorch's word_language_model):
the tied output's logits then start near zero, a near-uniform first prediction."""


class TiedOutput(keras.layers.Layer):
    """``h @ E^T + bias``: logits float32 [..., vocab] from h float32 [..., units], with ``E``
    the embedding layer's matrix (not a copy) and a bias of its own."""

    def __init__(self, embedding: keras.layers.Embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding
        self.supports_masking = True  # the padding mask passes on to the logits

    def build(self, input_shape=None):
        self.bias = self.add_weight(shape=(self.embedding.input_dim,), initializer="zeros",
                                    name="bias")
        self.built = True

    def call(self, h):
        return tf.matmul(h, self.embedding.embeddings, transpose_b=True) + self.bias


class AdaptiveTiedOutput(keras.layers.Layer):
    """The factored output layer (:mod:`lmonnx.factored`): a head over the ``c_0`` most
    frequent ids, tied to the embedding's first ``c_0`` rows, plus one token per tail cluster
    (untied rows of its own); tail cluster k projects h to ``units / 4**(k+1)`` and scores its
    words with a matrix and bias of its own, or (``tie_tails``) scores them with their own
    embedding rows as the head does, and a bias of its own.

    ``call(h)`` gives log-probabilities float32 [..., vocab] over every word (exact and
    normalized: what export checks and ``model(ids)`` returns); :meth:`nll` gives each
    target's NLL computing only the clusters some target needs (training's loss).
    """

    def __init__(self, embedding: keras.layers.Embedding, cutoffs, tail_div: int = TAIL_SHRINK,
                 tie_tails: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding
        self.cutoffs = [int(c) for c in cutoffs]
        self.tail_div = int(tail_div)
        self.tie_tails = bool(tie_tails)
        self.supports_masking = True

    @property
    def head_size(self) -> int:
        return self.cutoffs[0]

    @property
    def clusters(self) -> int:
        return len(self.cutoffs) - 1

    def build(self, input_shape=None):
        units = self.embedding.output_dim
        c0 = self.head_size
        self.head_bias = self.add_weight(shape=(c0,), initializer="zeros", name="head_bias")
        init = keras.initializers.RandomUniform(-EMBEDDING_INIT, EMBEDDING_INIT)
        self.cluster_kernel = self.add_weight(shape=(self.clusters, units), initializer=init,
                                              name="cluster_kernel")
        self.cluster_bias = self.add_weight(shape=(self.clusters,), initializer="zeros",
                                            name="cluster_bias")
        self.projections, self.tail_kernels, self.tail_biases = [], [], []
        for k, dim in enumerate(tail_dims(units, self.clusters, self.tail_div)):
            size = self.cutoffs[k + 1] - self.cutoffs[k]
            if not self.tie_tails:  # tied: the words' vectors are their embedding rows
                self.projections.append(self.add_weight(
                    shape=(units, dim), initializer="glorot_uniform",
                    name=f"tail_{k}_projection"))
                self.tail_kernels.append(self.add_weight(
                    shape=(dim, size), initializer="glorot_uniform", name=f"tail_{k}_kernel"))
            self.tail_biases.append(self.add_weight(shape=(size,), initializer="zeros",
                                                    name=f"tail_{k}_bias"))
        self.built = True

    def head_logits(self, h):
        """float32 [..., c_0 + clusters]: the head words' logits (tied), then the clusters'."""
        kernel = tf.concat([self.embedding.embeddings[:self.head_size], self.cluster_kernel], 0)
        bias = tf.concat([self.head_bias, self.cluster_bias], 0)
        return tf.matmul(h, kernel, transpose_b=True) + bias

    def tail_logits(self, k: int, h):
        """float32 [..., size_k] logits of cluster ``k``'s words."""
        if self.tie_tails:
            rows = self.embedding.embeddings[self.cutoffs[k]:self.cutoffs[k + 1]]
            return tf.matmul(h, rows, transpose_b=True) + self.tail_biases[k]
        return tf.matmul(tf.matmul(h, self.projections[k]), self.tail_kernels[k]) \
            + self.tail_biases[k]

    def call(self, h, head_only: bool = False):
        if head_only:  # the export graph's head (a layer call, which Keras's functional API needs)
            return self.head_logits(h)
        head = tf.nn.log_softmax(self.head_logits(h), axis=-1)
        c0 = self.head_size
        parts = [head[..., :c0]]
        for k in range(self.clusters):
            parts.append(head[..., c0 + k:c0 + k + 1]
                         + tf.nn.log_softmax(self.tail_logits(k, h), axis=-1))
        return tf.concat(parts, axis=-1)

    def nll(self, h, targets):
        """float32 [n] NLL in nats of int targets [n] given h float32 [n, units]: the head's
        cross-entropy (label: the word, or its cluster's token) plus, for the rows whose
        target lies in cluster k, cluster k's over its gathered rows only."""
        targets = tf.cast(targets, tf.int32)
        c0 = self.head_size
        cluster = tf.searchsorted(tf.constant(self.cutoffs[:-1], tf.int32), targets,
                                  side="right") - 1
        labels = tf.where(cluster < 0, targets, c0 + cluster)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                             logits=self.head_logits(h))
        for k in range(self.clusters):
            rows = tf.where(tf.equal(cluster, k))  # [m, 1]
            tail = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.gather_nd(targets, rows) - self.cutoffs[k],
                logits=self.tail_logits(k, tf.gather_nd(h, rows)))
            nll = tf.tensor_scatter_nd_add(nll, rows, tail)
        return nll

    def tail_weights(self) -> list[tuple]:
        """(projection [units, dim], kernel [dim, size], bias [size]) arrays per cluster; tied
        tails as (identity [units, units], their embedding rows transposed, bias)."""
        if self.tie_tails:
            table = self.embedding.embeddings.numpy()
            eye = np.eye(table.shape[1], dtype=np.float32)
            return [(eye, table[lo:hi].T, b.numpy())
                    for lo, hi, b in zip(self.cutoffs, self.cutoffs[1:], self.tail_biases)]
        return [(p.numpy(), w.numpy(), b.numpy())
                for p, w, b in zip(self.projections, self.tail_kernels, self.tail_biases)]


def adaptive_nll(output: AdaptiveTiedOutput, lstm_outputs, binary_sequences, output_sequences):
    """:func:`masked_nll` for the factored output: the summed NLL in nats of the real
    positions, each cluster computed only for the targets in it."""
    real = tf.math.not_equal(binary_sequences, 0)
    nll = output.nll(tf.boolean_mask(lstm_outputs, real), tf.boolean_mask(output_sequences, real))
    return tf.math.reduce_sum(nll)


@keras.saving.register_keras_serializable(package="lmonnx")
class TiedLanguageModel(ModelSettings, keras.Model):
    """Stacked-LSTM word LM with tied input and output embeddings, int32 ids [batch, time]
    -> float32 logits [batch, time, vocab_size].  The same methods as
    :class:`lmonnx.train.model.LanguageModel` that training, validation and export call;
    training's are declared by :class:`lmonnx.train.steps.StreamModel` (``StreamStep`` trains
    it).

    Parameters
    ----------
    vocab_size : token ids, the four specials included (>= 5).
    max_length : training window (backpropagation through time) in positions.
    num_lstm_units, num_lstm_layers : width and depth; the embedding is ``num_lstm_units`` wide.
    dropout : locked-dropout rate in [0, 1) on embeddings, between layers and before the
        output, only while training.
    epoch : the epoch the weights are from (set by the trainer before saving).
    softmax : ``"full"`` (logits over every word, ``h @ E^T + bias``) or ``"adaptive"`` (the
        factored output of :mod:`lmonnx.factored`: ``model(ids)`` then returns
        log-probabilities, which are also logits of the same distribution).
    cutoffs : the adaptive head/cluster boundaries (None: ``factored.default_cutoffs``).
    tail_div : the adaptive tails' width divisor (cluster k: ``units // tail_div**(k+1)``;
        None: ``factored.TAIL_SHRINK``).
    tie_tails : score the adaptive tails' words with their embedding rows (tied, as the head
        is) instead of projections and matrices of their own.
    """

    def __init__(self, vocab_size: int, max_length: int, num_lstm_units: int,
                 num_lstm_layers: int, *, dropout: float = 0.0, epoch: int | None = None,
                 embedding_dim: int | None = None, softmax: str = "full", cutoffs=None,
                 tail_div: int | None = None, tie_tails: bool = False, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim not in (None, num_lstm_units):
            raise InvalidArgumentError(f"a tied model's embedding is num_lstm_units "
                                       f"({num_lstm_units}) wide, not {embedding_dim}")
        self.set_settings(vocab_size, max_length, num_lstm_units, num_lstm_layers,
                          num_lstm_units, dropout, epoch)
        self.softmax = check_choice("softmax", softmax, SOFTMAX_CHOICES)
        self.cutoffs = check_cutoffs(cutoffs, vocab_size) if softmax == "adaptive" else None
        self.tail_div = (int(tail_div or TAIL_SHRINK) if softmax == "adaptive" else None)
        self.tie_tails = bool(tie_tails) and softmax == "adaptive"
        self.embedding = keras.layers.Embedding(
            vocab_size, num_lstm_units, name="embedding",
            embeddings_initializer=keras.initializers.RandomUniform(-EMBEDDING_INIT,
                                                                    EMBEDDING_INIT))
        self.lstms = [keras.layers.LSTM(num_lstm_units, return_sequences=True,
                                        return_state=True, name=f"lstm_{i}")
                      for i in range(num_lstm_layers)]
        # Dropout i sits before LSTM i (i = 0: on the embeddings); the last before the output.
        self.drops = [keras.layers.Dropout(dropout, noise_shape=(None, 1, num_lstm_units),
                                           name=f"locked_dropout_{i}")
                      for i in range(num_lstm_layers + 1)]
        if self.softmax == "adaptive":
            self.output_layer = AdaptiveTiedOutput(self.embedding, self.cutoffs, self.tail_div,
                                                   self.tie_tails,
                                                   name="adaptive_output")
        else:
            self.output_layer = TiedOutput(self.embedding, name="tied_output")

    # ---- the methods training, validation and export call --------------------------------

    def run_stream(self, input_ids, states, training: bool = False, mask=None):
        """(outputs float32 [batch, time, units] after the output dropout, new states): the
        stack from ``states`` (a list of ``[h, c]`` per layer, each [batch, units])."""
        x = self.drops[0](self.embedding(input_ids), training=training)
        new_states = []
        for lstm, drop, (h, c) in zip(self.lstms, self.drops[1:], states):
            x, h, c = lstm(x, initial_state=[h, c], mask=mask, training=training)
            x = drop(x, training=training)
            new_states.append([h, c])
        return x, new_states

    def run_lstm(self, input_sequences, training: bool = False):
        """Outputs [batch, time, units] of right-padded sentences from the zero state, and
        the int32 padding mask ``sign(inputs)``."""
        input_sequences = tf.convert_to_tensor(input_sequences, dtype=tf.int32)
        binary = tf.math.sign(input_sequences)
        outputs, _ = self.run_stream(input_sequences,
                                     self.zero_states(tf.shape(input_sequences)[0]),
                                     training=training, mask=tf.not_equal(binary, 0))
        return outputs, binary

    def run_lstm_carrying(self, input_sequences, states=None):
        """``run_lstm`` (no dropout) from ``states`` (None: zeros) for unpadded rows:
        (outputs, mask, states after the last position)."""
        input_sequences = tf.convert_to_tensor(input_sequences, dtype=tf.int32)
        if states is None:
            states = self.zero_states(tf.shape(input_sequences)[0])
        outputs, states = self.run_stream(input_sequences, states, training=False)
        return outputs, tf.math.sign(input_sequences), states

    def zero_states(self, batch_size) -> list:
        """A sentence start's states: ``[[h, c]] * num_lstm_layers``, zeros [batch, units]."""
        zeros = tf.zeros(tf.stack([batch_size, self.num_lstm_units]))
        return [[zeros, zeros] for _ in range(self.num_lstm_layers)]

    def get_logits(self, lstm_outputs):
        """float32 [..., vocab_size] = outputs @ E^T + output_bias (full softmax), or the
        log-probabilities of every word (adaptive)."""
        return self.output_layer(lstm_outputs)

    def calculate_loss(self, lstm_outputs, binary_sequences, output_sequences):
        """Summed masked NLL in nats (the course's loss; :func:`masked_nll`; adaptive: the
        same sum, each tail cluster computed only for its targets)."""
        if self.softmax == "adaptive":
            return adaptive_nll(self.output_layer, lstm_outputs, binary_sequences,
                                output_sequences)
        return masked_nll(self.get_logits, lstm_outputs, binary_sequences, output_sequences)

    def get_config(self):
        config = super().get_config()
        config.update(softmax=self.softmax, cutoffs=self.cutoffs, tail_div=self.tail_div,
                      tie_tails=self.tie_tails)
        return config

    # ---- Keras plumbing ------------------------------------------------------------------

    def call(self, input_sequences, training=False):
        lstm_outputs, _ = self.run_lstm(input_sequences, training=training)
        return self.get_logits(lstm_outputs)

    def build(self, input_shape=(None, None)):
        units = self.num_lstm_units
        self.embedding.build(input_shape)
        for lstm in self.lstms:
            lstm.build((None, None, units))
        self.output_layer.build((None, None, units))
        self.built = True

    @property
    def cells(self) -> list:
        """The LSTM cells, bottom first."""
        return [lstm.cell for lstm in self.lstms]

    def output_weights(self) -> tuple:
        """(kernel float32 [units, vocab] = E^T, bias [vocab]) of the output layer, as arrays."""
        return self.embedding.embeddings.numpy().T, self.output_layer.bias.numpy()

    def seeded_layers(self) -> list:
        """(unique name, layer) of every layer drawing dropout masks (the checkpoint's keys;
        both LSTM layers' cells are called ``lstm_cell``)."""
        layers = [*((lstm.name, lstm.cell) for lstm in self.lstms),
                  *((drop.name, drop) for drop in self.drops)]
        # Keras gives a Dropout of rate 0 no seed generator: it never draws.
        return [(name, layer) for name, layer in layers
                if getattr(layer, "seed_generator", None) is not None]

    def inference_model(self) -> keras.Model:
        """The export form, in the same contract as ``LanguageModel.inference_model``: inputs
        ``[input_ids, state_h, state_c [batch, layers, units]]``, outputs ``[logits, state_h,
        state_c]``; these very layers (no copies), no dropout, no mask."""
        ids, state_h, state_c = self.inference_inputs()
        x = self.embedding(ids)
        hs, cs = [], []
        for i, lstm in enumerate(self.lstms):
            x, h, c = lstm(x, initial_state=[state_h[:, i], state_c[:, i]])
            hs.append(h)
            cs.append(c)
        states = [keras.ops.stack(hs, axis=1), keras.ops.stack(cs, axis=1)]
        if self.softmax == "adaptive":
            # format 3: the head and the hidden states; the tails run outside the graph,
            # for the positions that need them (lmonnx.factored)
            return keras.Model([ids, state_h, state_c],
                               [self.output_layer(x, head_only=True), x, *states],
                               name="lmonnx_inference")
        logits = self.output_layer(x)
        return keras.Model([ids, state_h, state_c], [logits, *states], name="lmonnx_inference")
