"""``lmonnx train``: fit a vocabulary, train the LanguageModel, keep the best epoch in RUN_DIR.

    corpus --read once (lmonnx.corpus)--> lines --Vocabulary.fit--> vocab.json
           --ExampleBuilder (lmonnx.examples), split_windows(max_length)--> training windows
    each epoch: rng seeded by (seed, epoch) --packed_batches: one shuffle cut into batches of
           batch_size windows (the plain loop's batches, in its order), each packed end to end
           in fewer rows with the state restarting at every window (pack_rows)
           [--no-pack: pooled_batches, padded to the longest, sorted by length within random
           pools of sort_pool batches when sort_pool > 1]
           --Adam on (summed masked NLL / its pool's mean tokens per batch: for packed or
           random batches, each batch's own token count), global-norm clipping--> weights
           --validation: full sentences, token-weighted exp(sum NLL / tokens)--> history.json
           --no improvement: learning rate / lr_decay; patience epochs without one: stop

Convergence and speed (README, "Batches").  Sorting batches by length saves the LSTM's padded
steps but gives every step a biased sample, and on real text that costs convergence.  So the
batches are those of the plain loop -- one shuffle per epoch cut into
batches of ``batch_size`` windows, the masked NLL per token of each batch minimised -- and the
speed comes from not computing padding: each batch's windows are laid end to end in as few
rows as first-fit decreasing finds, each row as long as the batch's longest window, and the
LSTM state is zeroed at the first position of every window (``LanguageModel.run_lstm_packed``),
so every window is computed exactly as alone and the summed loss and gradient are the padded
batch's (tested to float32 round-off, step by step); the output layer runs at real positions
only (``LanguageModel.calculate_loss``).  Measured with ``benchmarks/train_table.py`` (README,
"Benchmarks"): the same test perplexity as the plain loop within seed noise, 1.7x its speed on
the synthetic corpus, where three positions in four of a random batch are padding.
``--no-pack`` pads instead; with it ``sort_pool`` N > 1 sorts each pool of N batches' worth of
shuffled windows by length before cutting it, and divides each batch's summed NLL by its
pool's mean tokens per batch, so every token of a pool weighs the same.  Measured: pools of 4
converge markedly slower on PTB (4-33% higher test perplexity after 3 epochs over three seeds).

Schedule and stopping.  After each epoch the selection loss (validation NLL per token; the
training loss without a validation set) either improves on the best so far -- the epoch is
saved as ``model.keras`` -- or not, and then the learning rate is divided by ``lr_decay`` for
the next epoch (pytorch's word_language_model anneals by 4 the same way; 1 keeps it constant).
With ``patience`` N > 0 training stops after N epochs in a row without improvement.  Both are
recorded in ``history.json`` (each epoch's ``learning_rate`` and ``epochs_without_improvement``,
the run's next ``learning_rate`` and ``stopped_early``) and drawn in the training curve.

The run directory (file names, config and history schema, checkpoints, the manifest of what a
run owns) is described in :mod:`lmonnx.rundir`; this module keeps the training loop.

Every setting, the corpora and the output directory are checked, the corpora read and the
model built before the first file is written, so a bad flag leaves nothing behind.

Reproducibility: one seed sets Python, NumPy, TensorFlow and Keras randomness and TensorFlow
op determinism is on, so the same seed on the same data gives the same vocabulary and the same
first-epoch loss.  The batches of epoch N depend only on (seed, N), and a checkpoint holds the
model, optimizer and dropout-seed state, so a resumed run -- an interrupted one, or a finished
one extended with more ``epochs`` -- sees the batches and reaches the weights an uninterrupted
run would have.

Training stops with a ``ValueError`` when the training or validation loss is not finite or
so large that its perplexity overflows a float64 (mean NLL >= 709 nats per token): the run
has diverged, and nothing non-finite is written (``history.json`` stays strict JSON).

A corpus given as ``-`` is read from standard input, once, into memory; ``config.json``
records it as ``"<stdin>"`` with the SHA-256 of its sentences, and resuming such a run needs
``-`` and the same text piped in again (checked against that hash).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lmonnx.errors import InvalidArgumentError
from lmonnx.atomic import atomic_path
from lmonnx.batching import (Batch, PackedBatch, bucketed_batches, packed_batches,
                             pooled_batches, split_windows)
from lmonnx.corpus import require_sentences
from lmonnx.examples import ExampleBuilder
from lmonnx.metrics import default_max_tokens, perplexity_of
from lmonnx.rundir import (CURVE_FILE, MODEL_FILE, RUN_FORMAT, STDIN, STDIN_CORPUS, VOCAB_FILE,
                           RunDir, RunDirError, checkpoint_epoch, checkpoint_name,
                           finite_or_none, load_run_config, sentences_sha256)
from lmonnx.vocab import PRESETS, SPECIAL_TOKENS, TokenizerOptions, Vocabulary

DEFAULT_EPOCHS = 5
DEFAULT_SORT_POOL = 1
DEFAULT_LR_DECAY = 4.0
SEED_MAX = 2**32 - 1
"""The largest seed NumPy's legacy generator (which ``keras.utils.set_random_seed`` seeds) takes."""
MAX_MEAN_NLL = 709.0
"""Nats per token above which ``exp`` overflows a float64: a model this far beyond a uniform
guess over any vocabulary (ln V nats) has diverged, and its perplexity cannot be stored."""

__all__ = ["TrainConfig", "TrainResult", "train", "load_run_config", "evaluate_nll",
           "sentence_items", "DEFAULT_EPOCHS", "SEED_MAX", "MAX_MEAN_NLL"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (the CLI flags of ``lmonnx train``).

    ``vocab_size`` counts the four special tokens; the vocabulary may come out smaller when
    the corpus has fewer word types.  ``embedding_dim`` None means ``int(vocab_size ** 0.25)``.
    ``dropout`` is a drop rate.  ``batch_size`` is sentences (windows) per batch at most.
    ``clipnorm`` clips the global gradient norm (0 turns clipping off).  ``epochs`` None means
    :data:`DEFAULT_EPOCHS` for a new run and the stored value when resuming; a number larger
    than a resumed run's extends it.  ``seed`` is an integer from 0 to 2**32 - 1.
    ``pack``: lay each random batch's windows end to end in fewer rows (the default; see
    "Convergence" above); False pads each batch to its longest.  ``sort_pool`` (padded
    batches only): batches are sorted by length within random pools of this many batches (1,
    the default: random order, no sorting).  ``lr_decay``: divide the learning rate by this after an
    epoch without improvement (1: constant).  ``patience``: stop after this many epochs in a
    row without improvement (0: never).
    """

    tokenizer: str = "keras"
    vocab_size: int = 10000
    max_length: int = 35
    num_lstm_units: int = 200
    num_lstm_layers: int = 2
    dropout: float = 0.0
    embedding_dim: int | None = None
    epochs: int | None = None
    batch_size: int = 32
    learning_rate: float = 1e-2
    clipnorm: float = 5.0
    seed: int = 0
    sort_pool: int = DEFAULT_SORT_POOL
    pack: bool = True
    lr_decay: float = DEFAULT_LR_DECAY
    patience: int = 0

    def validate(self) -> None:
        """``ValueError`` naming the flag for the first setting out of range."""
        if self.tokenizer not in PRESETS:
            raise InvalidArgumentError(f"--tokenizer must be one of {', '.join(PRESETS)}; "
                             f"got {self.tokenizer!r}")
        ints = (("--vocab-size", self.vocab_size, 5, "4 special tokens and at least one word"),
                ("--max-length", self.max_length, 1, None),
                ("--units", self.num_lstm_units, 1, None),
                ("--layers", self.num_lstm_layers, 1, None),
                ("--epochs", DEFAULT_EPOCHS if self.epochs is None else self.epochs, 1, None),
                ("--batch-size", self.batch_size, 1, None),
                ("--sort-pool", self.sort_pool, 1, "1 = random order"),
                ("--patience", self.patience, 0, "0 = never stop early"))
        for flag, value, low, why in ints:
            if not _is_int(value) or value < low:
                extra = f" ({why})" if why else ""
                raise InvalidArgumentError(f"{flag} must be an integer >= {low}{extra}; got {value!r}")
        if not isinstance(self.pack, (bool, np.bool_)):
            raise InvalidArgumentError(f"pack must be True or False; got {self.pack!r}")
        if self.pack and self.sort_pool > 1:
            raise InvalidArgumentError(f"--sort-pool {self.sort_pool} sorts padded batches: add --no-pack "
                             "(packing already leaves almost no padding)")
        if self.embedding_dim is not None and (not _is_int(self.embedding_dim)
                                               or self.embedding_dim < 1):
            raise InvalidArgumentError(f"--embedding-dim must be an integer >= 1; got {self.embedding_dim!r}")
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise InvalidArgumentError(f"--dropout is a drop rate in [0, 1); got {self.dropout!r}")
        if not (_is_real(self.learning_rate) and self.learning_rate > 0
                and math.isfinite(self.learning_rate)):
            raise InvalidArgumentError(f"--learning-rate must be a positive number; got {self.learning_rate!r}")
        if not (_is_real(self.clipnorm) and self.clipnorm >= 0 and math.isfinite(self.clipnorm)):
            raise InvalidArgumentError(f"--clipnorm must be >= 0 (0 = no clipping); got {self.clipnorm!r}")
        if not (_is_real(self.lr_decay) and self.lr_decay >= 1 and math.isfinite(self.lr_decay)):
            raise InvalidArgumentError(f"--lr-decay must be a number >= 1 (1 = constant learning rate); "
                             f"got {self.lr_decay!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise InvalidArgumentError(f"--seed must be an integer from 0 to {SEED_MAX} (2**32 - 1); "
                             f"got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The settings stored in a run's config.json.  A run from before the learning-rate
        schedule (no ``lr_decay`` stored) keeps a constant rate and never stops early; one from
        before packing (no ``pack``) keeps padded batches, so resuming it stays exact."""
        names = {f.name for f in dataclasses.fields(cls)}
        stored = {k: v for k, v in d.items() if k in names}
        stored.setdefault("lr_decay", 1.0)
        stored.setdefault("pack", False)  # runs from before packing padded their batches
        return cls(**stored)


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


@dataclass
class TrainResult:
    """What ``train`` leaves behind: the run directory and its epoch records."""

    run_dir: Path
    history: list[dict]
    best_epoch: int
    vocab_size: int

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]


# ---- data ----------------------------------------------------------------------------------

@dataclass
class _Source:
    """A corpus read once: how config.json records it, its lines, their SHA-256."""

    recorded: str
    lines: list
    sha256: str


def _read_source(path: Path, errors: str) -> _Source:
    """All sentences of ``path`` (``-``: stdin) in memory; ``CorpusError`` if there are none."""
    lines = list(require_sentences(path, errors))
    recorded = STDIN_CORPUS if str(path) == STDIN else str(path.resolve())
    return _Source(recorded, lines, sentences_sha256(line.text for line in lines))


def _training_items(vocab: Vocabulary, lines: Iterable, max_length: int) -> list:
    """((key, window), inputs, targets): each sentence's example (the one example builder)
    cut into windows of at most ``max_length`` positions, no token dropped."""
    return [((ex.key, w), x, y) for ex in ExampleBuilder(vocab).build_all(lines)
            for w, (x, y) in enumerate(split_windows(ex.inputs, ex.targets, max_length))]


def sentence_items(vocab: Vocabulary, lines: Iterable) -> list:
    """(key, inputs, targets) of whole sentences (``lmonnx.corpus.Line`` objects), built by
    the one example builder, as evaluation scores them."""
    return [(ex.key, ex.inputs, ex.targets) for ex in ExampleBuilder(vocab).build_all(lines)]


def _epoch_batches(items: list, config: TrainConfig, epoch: int) -> list[Batch | PackedBatch]:
    """Epoch ``epoch`` (1-based): random batches, packed (``config.pack``) or padded (sorted by
    length within random pools of ``config.sort_pool`` batches when that is > 1), in random
    order; a function of (seed, epoch) only."""
    rng = np.random.default_rng([config.seed, epoch])
    if config.pack:
        return packed_batches(items, batch_size=config.batch_size, rng=rng)
    return pooled_batches(items, max_tokens=config.batch_size * config.max_length,
                          max_batch_size=config.batch_size, pool_batches=config.sort_pool,
                          rng=rng)


def _loss_scales(batches: list[Batch | PackedBatch]) -> list[np.float32]:
    """What each batch's summed loss is divided by: its pool's mean tokens per batch.

    A pool holds what the plain loop's batches hold, a random sample; within it the token
    counts of the length-sorted batches differ several-fold, and dividing each by their common
    mean weighs every token of the pool alike (the course's sum), where each batch's own count
    would weigh a token in a batch of short sentences several times one in a batch of long
    ones.  With pools of one batch this is the plain per-token mean of each batch."""
    totals: dict = {}
    for b in batches:
        tokens, count = totals.get(b.pool, (0, 0))
        totals[b.pool] = (tokens + b.tokens, count + 1)
    return [np.float32(totals[b.pool][0] / totals[b.pool][1]) for b in batches]


# ---- TensorFlow steps ----------------------------------------------------------------------

def _make_steps(model, optimizer):
    import tensorflow as tf

    spec = tf.TensorSpec((None, None), tf.int32)

    def descend(run_lstm, lstm_inputs, targets, loss_scale):
        """One optimizer step on ``run_lstm(*lstm_inputs)``'s summed loss; (its NLL, tokens)."""
        with tf.GradientTape() as tape:
            lstm_outputs, binary_sequences = run_lstm(*lstm_inputs, training=True)
            loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
            tokens = tf.math.reduce_sum(tf.cast(binary_sequences, tf.float32))
            # The course minimised the sum; dividing it by the mean tokens per batch of the
            # batch's pool (see _loss_scales) keeps every token's weight equal, whatever its
            # batch holds, with the step size (and clipping threshold) of a per-token mean.
            loss = loss_sum / loss_scale
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss_sum, tokens

    scale = tf.TensorSpec((), tf.float32)

    @tf.function(input_signature=(spec, spec, scale))
    def train_step(inputs, targets, loss_scale):
        return descend(model.run_lstm, (inputs,), targets, loss_scale)

    @tf.function(input_signature=(spec, spec, tf.TensorSpec((None, None), tf.float32), scale))
    def packed_train_step(inputs, targets, carry, loss_scale):
        # Packed rows: the same summed loss of the same windows, so the same gradient as
        # their padded batch, in fewer rows (lmonnx.batching.pack_rows).
        return descend(model.run_lstm_packed, (inputs, carry), targets, loss_scale)

    def step(batch, loss_scale):
        """(summed NLL, tokens) of one training step on a Batch or a PackedBatch."""
        if isinstance(batch, PackedBatch):
            return packed_train_step(batch.inputs, batch.targets, batch.carry, loss_scale)
        return train_step(batch.inputs, batch.targets, loss_scale)

    @tf.function(input_signature=(spec, spec))
    def eval_step(inputs, targets):
        lstm_outputs, binary_sequences = model.run_lstm(inputs, training=False)
        loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
        return loss_sum, tf.math.reduce_sum(tf.cast(binary_sequences, tf.float32))

    return step, eval_step


def evaluate_nll(model, pairs: Iterable, *, max_tokens: int | None = None,
                 max_batch_size: int = 128, eval_step=None) -> tuple[float, int]:
    """Total NLL (nats, float64) and scored tokens of ``(key, inputs, targets)`` pairs.

    Perplexity is ``exp(nll / tokens)``.  Sentences are scored whole, in length buckets.
    """
    if eval_step is None:
        _, eval_step = _make_steps(model, None)
    if max_tokens is None:
        max_tokens = default_max_tokens(model.vocab_size)  # the same budget as evaluation
    nll, tokens = 0.0, 0
    for batch in bucketed_batches(pairs, max_tokens=max_tokens, max_batch_size=max_batch_size):
        loss_sum, n = eval_step(batch.inputs, batch.targets)
        nll += float(loss_sum)
        tokens += int(n)
    return nll, tokens


def _set_seed(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def _plot_curve(path: Path, history: list[dict], stopped_early: bool = False) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def floats(key):  # null (an overflowed perplexity) -> a gap in the curve
        return [math.nan if h.get(key) is None else h[key] for h in history]

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    lines = ax.plot(epochs, floats("train_perplexity"), "o-", label="train (dropout on)")
    if any(h.get("valid_tokens") for h in history):
        lines += ax.plot(epochs, floats("valid_perplexity"), "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (exp mean NLL per token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    rates = [h.get("learning_rate") for h in history]
    if all(r is not None for r in rates):  # runs from before the schedule have none
        lr_ax = ax.twinx()
        lines += lr_ax.step(epochs, rates, "--", where="mid", color="0.5", label="learning rate")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
    if stopped_early:
        lines.append(ax.axvline(epochs[-1], color="r", alpha=0.4,
                                label=f"stopped early (epoch {epochs[-1]})"))
    ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _save_model_atomic(model, path: Path) -> None:
    with atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the suffix
        model.save(tmp)


def _selection_loss(record: dict) -> float:
    """What picks the best epoch: mean validation NLL per token (the log of the validation
    perplexity, finite even where the perplexity overflows), else the training loss."""
    if record.get("valid_tokens"):
        return record["valid_nll"] / record["valid_tokens"]
    return record["train_loss"]


def _is_better(record: dict, best: dict | None) -> bool:
    return best is None or _selection_loss(record) < _selection_loss(best)


def _ppl(value) -> str:
    return "inf" if value is None else f"{value:.2f}"


# ---- the run -------------------------------------------------------------------------------

def train(config: TrainConfig, corpus, valid=None, out_dir="run", errors: str = "strict",
          resume: bool = False, force: bool = False,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``LanguageModel`` on ``corpus`` (one sentence per line; ``"-"``: standard input)
    into ``out_dir``.

    With ``resume`` a run continues after its last finished epoch, with the settings stored in
    its ``config.json``, up to ``config.epochs`` when given (which extends a finished run) or
    its stored number of epochs.  ``force`` starts over in a directory holding a run, deleting
    only the files that run owns (see :mod:`lmonnx.rundir`).  User errors (bad settings,
    unreadable corpora, an occupied ``out_dir``) raise ``ValueError`` with a one-line message
    before anything is written; a non-finite loss raises ``ValueError`` during training.

    ``on_epoch``, when given, is called with each finished epoch's record (as stored in
    ``history.json``) after the epoch's files are written; benchmarks use it to interleave.
    """
    corpus = Path(corpus)
    valid = Path(valid) if valid is not None else None
    run = RunDir(out_dir)
    config.validate()
    if resume and force:
        raise InvalidArgumentError("--resume and --force contradict each other: pick one")
    if str(corpus) == STDIN and valid is not None and str(valid) == STDIN:
        raise InvalidArgumentError("CORPUS and --valid cannot both be - (standard input)")
    require_sentences(corpus, errors)  # a missing corpus fails here, before anything is read
    if valid is not None:
        require_sentences(valid, errors)
    if resume:
        run.check_resume()
        return _resume(config, corpus, valid, run, errors, on_epoch)
    run.check_new(force)

    # Read everything and build the model before the first write, so bad input leaves nothing.
    config = dataclasses.replace(config, epochs=DEFAULT_EPOCHS if config.epochs is None
                                 else config.epochs)
    source = _read_source(corpus, errors)
    valid_source = _read_source(valid, errors) if valid is not None else None
    vocab = Vocabulary.fit((line.text for line in source.lines), config.vocab_size,
                           TokenizerOptions.from_preset(config.tokenizer))
    if len(vocab) <= len(SPECIAL_TOKENS):
        name = "standard input" if str(corpus) == STDIN else corpus
        raise InvalidArgumentError(f"{name}: no words after tokenization with the {config.tokenizer!r} "
                         "tokenizer (punctuation only?); nothing to train on")
    items = _training_items(vocab, source.lines, config.max_length)
    valid_items = sentence_items(vocab, valid_source.lines) if valid_source else None
    model = _build_model(config, len(vocab))
    optimizer = _make_optimizer(config)
    run_config = {
        "format": RUN_FORMAT,
        "vocab_size": len(vocab),
        "max_length": config.max_length,
        "num_lstm_units": config.num_lstm_units,
        "num_lstm_layers": config.num_lstm_layers,
        "embedding_dim": model.embedding_dim,
        "dropout": float(config.dropout),
        "tokenizer": vocab.options.to_dict(),
        "train": config.to_dict(),
        "corpus": source.recorded,
        "corpus_sha256": source.sha256,
        "valid": valid_source.recorded if valid_source else None,
        "valid_sha256": valid_source.sha256 if valid_source else None,
        "errors": errors,
    }
    history_doc = {"status": "running", "epochs": [], "best_epoch": None, "checkpoint": None,
                   "learning_rate": float(config.learning_rate), "stopped_early": False}

    run.start_new(force)  # the manifest first, then every file it lists
    vocab.save(run.claim(VOCAB_FILE))
    run.write_config(run_config)
    run.write_history(history_doc)
    return _fit(model, optimizer, config, vocab, items, valid_items, run, history_doc,
                start_epoch=1, on_epoch=on_epoch)


def _build_model(config: TrainConfig, vocab_size: int):
    import tensorflow as tf

    _set_seed(int(config.seed))
    from lmonnx.train.model import LanguageModel

    try:
        model = LanguageModel(vocab_size, config.max_length, config.num_lstm_units,
                              config.num_lstm_layers, embedding_dim=config.embedding_dim,
                              dropout=config.dropout)
        model.build()
    except (MemoryError, tf.errors.ResourceExhaustedError):
        raise InvalidArgumentError(f"the model does not fit in memory (--units {config.num_lstm_units}, "
                         f"--layers {config.num_lstm_layers}, vocabulary {vocab_size}); "
                         "choose smaller values") from None
    return model


def _make_optimizer(config: TrainConfig):
    import keras

    clip = {"global_clipnorm": float(config.clipnorm)} if config.clipnorm > 0 else {}
    return keras.optimizers.Adam(learning_rate=float(config.learning_rate), **clip)


def _save_checkpoint(path: Path, model, optimizer, epoch: int) -> None:
    """Every model variable (weights and dropout seed state) and every optimizer variable
    (step count, Adam moments), in their deterministic order, as one ``.npz``, atomically."""
    arrays = {f"model_{i:04d}": v.numpy() for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer_{i:04d}": v.numpy() for i, v in enumerate(optimizer.variables)})
    arrays["epoch"] = np.asarray(epoch)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _load_checkpoint(path: Path, model, optimizer) -> int:
    optimizer.build(model.trainable_variables)  # create the Adam slots to restore into
    with np.load(path) as data:
        for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            stored = sorted(k for k in data.files if k.startswith(prefix + "_"))
            if len(stored) != len(variables):
                raise InvalidArgumentError(f"{path} holds {len(stored)} {prefix} variables, the model "
                                 f"needs {len(variables)}; the checkpoint does not fit this run")
            for key, var in zip(stored, variables):
                value = data[key]
                if tuple(value.shape) != tuple(var.shape):
                    raise InvalidArgumentError(f"{path}: {key} has shape {value.shape}, {var.path} needs "
                                     f"{tuple(var.shape)}; the checkpoint does not fit this run")
                var.assign(value)
        return int(data["epoch"])


def _resume_source(given: Path | None, stored: str | None, stored_sha: str | None,
                   errors: str, run: RunDir, what: str) -> _Source | None:
    """The corpus (``what`` = "CORPUS") or validation text (``"--valid"``) a run is resumed
    with: the stored one, which ``given`` must match; its sentences must hash as stored."""
    verb = "trained" if what == "CORPUS" else "validated"
    if stored is None:
        if given is not None:
            raise InvalidArgumentError(f"{run.path} was {verb} without {what}; resume without it or "
                             "start a new run")
        return None
    if given is None:
        if stored == STDIN_CORPUS:
            raise InvalidArgumentError(f"{run.path} was {verb} on standard input; resume with {what} - "
                             "and the same text piped in")
        given = Path(stored)
    elif (STDIN_CORPUS if str(given) == STDIN else str(given.resolve())) != stored:
        shown = "standard input" if stored == STDIN_CORPUS else stored
        raise InvalidArgumentError(f"{run.path} was {verb} on {shown}, not {given}; resume with the "
                         f"same {what} or start a new run")
    source = _read_source(given, errors)
    if stored_sha and source.sha256 != stored_sha:
        name = "standard input" if str(given) == STDIN else str(given)
        raise InvalidArgumentError(f"{name} is not the text {run.path} was {verb} on (its sentences "
                         "hash differently); resume with the same text or start a new run")
    return source


def _resume(config: TrainConfig, corpus: Path, valid: Path | None, run: RunDir,
            errors: str, on_epoch=None) -> TrainResult:
    run_config = run.read_config()
    history_doc = run.read_history()
    if history_doc is None:
        raise RunDirError(f"nothing to resume in {run.path}: no history.json; drop --resume "
                          "to start a new run")
    stored = TrainConfig.from_dict(run_config["train"])
    target = stored.epochs if config.epochs is None else config.epochs
    # Name only settings given away from the defaults: a default is not something the user
    # asked for (the CLI's defaults are TrainConfig's).
    given, defaults = config.to_dict(), TrainConfig().to_dict()
    differing = [k for k, v in stored.to_dict().items()
                 if k != "epochs" and given[k] != v and given[k] != defaults[k]]
    if differing:
        print(f"resuming {run.path} with its stored settings (ignoring "
              + ", ".join(f"{k}={given[k]!r}" for k in differing) + ")")
    missing = [k for k in stored.to_dict() if k not in run_config["train"]]
    if missing:  # a run from before a setting existed: record what it keeps using
        print(f"{run.path} is from before " + ", ".join(missing) + ": it keeps "
              + ", ".join(f"{k}={getattr(stored, k)!r}" for k in missing)
              + (" (padded batches)" if "pack" in missing else ""))
    done = len(history_doc["epochs"])
    if target < done:
        raise InvalidArgumentError(f"--epochs {target}: {run.path} has already trained {done} epochs "
                         "and a run cannot be shortened; start a new run instead")
    if history_doc.get("stopped_early"):
        print(f"{run.path}: run stopped early after epoch {done} (no improvement in "
              f"{stored.patience} epochs, --patience {stored.patience}); nothing to resume")
        return TrainResult(run.path, history_doc["epochs"], history_doc["best_epoch"],
                           run_config["vocab_size"])
    if target == done:
        print(f"{run.path}: run already complete ({done} epochs); nothing to resume "
              "(pass a larger --epochs to extend it)")
        return TrainResult(run.path, history_doc["epochs"], history_doc["best_epoch"],
                           run_config["vocab_size"])
    errors = run_config.get("errors", errors)
    source = _resume_source(corpus, run_config.get("corpus"), run_config.get("corpus_sha256"),
                            errors, run, "CORPUS")
    valid_source = _resume_source(valid, run_config.get("valid"),
                                  run_config.get("valid_sha256"), errors, run, "--valid")
    vocab = Vocabulary.load(run.file(VOCAB_FILE))
    config = dataclasses.replace(stored, epochs=target)
    items = _training_items(vocab, source.lines, config.max_length)
    valid_items = sentence_items(vocab, valid_source.lines) if valid_source else None
    model = _build_model(config, len(vocab))
    optimizer = _make_optimizer(config)
    if done:
        name = history_doc.get("checkpoint")
        ckpt = run.file(name) if name == checkpoint_name(done) else None
        if ckpt is None or not ckpt.is_file() or _load_checkpoint(ckpt, model, optimizer) != done:
            raise InvalidArgumentError(f"{run.path}: checkpoint of epoch {done} is missing or does not "
                             "match history.json; start over with --force")
        # The rate the next epoch trains with (the checkpoint holds it too; a run from before
        # the schedule has none stored and keeps its constant rate).
        optimizer.learning_rate.assign(history_doc.get("learning_rate",
                                                       float(config.learning_rate)))
    run.adopt()  # a run from before manifests gets one now
    if target != stored.epochs or missing:
        run_config["train"].update({k: getattr(stored, k) for k in missing}, epochs=target)
        run.write_config(run_config)
        print(f"extending {run.path} from {stored.epochs} to {target} epochs")
    if history_doc.get("status") != "running":
        history_doc["status"] = "running"
        run.write_history(history_doc)
    if done:
        print(f"resuming {run.path} after epoch {done} of {config.epochs}")
    return _fit(model, optimizer, config, vocab, items, valid_items, run, history_doc,
                start_epoch=done + 1, on_epoch=on_epoch)


def _fit(model, optimizer, config: TrainConfig, vocab: Vocabulary, items: list,
         valid_items: list | None, run: RunDir, history_doc: dict,
         start_epoch: int, on_epoch=None) -> TrainResult:
    train_step, eval_step = _make_steps(model, optimizer)
    n_tokens = sum(len(x) for _, x, _ in items)
    if start_epoch == 1:
        print(f"training on {len(items)} windows ({n_tokens} tokens), vocabulary {len(vocab)}, "
              f"{model.count_params()} parameters")
    try:
        _epochs(model, optimizer, config, items, valid_items, run, history_doc, train_step,
                eval_step, start_epoch, on_epoch)
    except KeyboardInterrupt:
        done = len(history_doc["epochs"])
        print(f"interrupted after {done} finished epoch(s); continue with the same command "
              "and --resume", file=sys.stderr)
        raise
    result = TrainResult(run.path, history_doc["epochs"], history_doc["best_epoch"], len(vocab))
    b = result.best
    summary = (f"valid ppl {_ppl(b['valid_perplexity'])}" if b.get("valid_tokens")
               else f"train loss {b['train_loss']:.4f}")
    print(f"best epoch {b['epoch']} ({summary}) saved to {run.file(MODEL_FILE)}")
    return result


def _check_loss(epoch: int, what: str, nll: float, tokens: int, config: TrainConfig) -> None:
    """``ValueError`` (one line, with the flags to change) when the loss is not finite or its
    mean per token is too large for a perplexity: the run has diverged."""
    mean = nll / tokens if tokens else nll
    if math.isfinite(mean) and mean < MAX_MEAN_NLL:
        return
    clip = ("clip gradients with --clipnorm (e.g. 5)" if config.clipnorm == 0
            else f"lower --clipnorm (now {config.clipnorm:g})")
    size = "" if not math.isfinite(mean) else " (its perplexity overflows a float64)"
    raise InvalidArgumentError(f"training diverged in epoch {epoch}: the {what} loss is {mean:.4g} nats "
                     f"per token{size}; lower --learning-rate (now {config.learning_rate:g}) "
                     f"or {clip}")


def _epochs(model, optimizer, config: TrainConfig, items: list, valid_items: list | None,
            run: RunDir, history_doc: dict, train_step, eval_step, start_epoch: int,
            on_epoch=None) -> None:
    """Train epochs ``start_epoch .. config.epochs`` (fewer when patience runs out),
    recording each in ``history_doc``."""
    from tqdm.auto import tqdm

    history = history_doc["epochs"]
    best = history[history_doc["best_epoch"] - 1] if history_doc.get("best_epoch") else None
    lr = float(history_doc.get("learning_rate", config.learning_rate))
    for epoch in range(start_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        batches = _epoch_batches(items, config, epoch)
        loss_scales = _loss_scales(batches)
        nll_sum, tokens = 0.0, 0
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                  disable=None, leave=False) as bar:
            for i, batch in enumerate(batches):
                loss_sum, n = train_step(batch, loss_scales[i])
                loss_sum, n = float(loss_sum), int(n)
                if not math.isfinite(loss_sum):
                    _check_loss(epoch, "training", loss_sum, n, config)
                nll_sum += loss_sum
                tokens += n
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{nll_sum / tokens:.3f}")
        train_seconds = time.perf_counter() - t0
        _check_loss(epoch, "training", nll_sum, tokens, config)
        record = {"epoch": epoch, "train_loss": nll_sum / tokens,
                  "train_perplexity": finite_or_none(perplexity_of(nll_sum, tokens)),
                  "train_tokens": tokens, "train_seconds": round(train_seconds, 3),
                  "tokens_per_second": round(tokens / train_seconds, 1),
                  "learning_rate": lr}
        if valid_items is not None:
            v0 = time.perf_counter()
            nll, n = evaluate_nll(model, valid_items, eval_step=eval_step)
            _check_loss(epoch, "validation", nll, n, config)
            record.update(valid_nll=nll, valid_tokens=n,
                          valid_perplexity=finite_or_none(perplexity_of(nll, n)),
                          valid_seconds=round(time.perf_counter() - v0, 3))
        else:
            record["valid_perplexity"] = None
        improved = _is_better(record, best)
        if improved:
            best = record
            _save_model_atomic(model, run.claim(MODEL_FILE))
        record["epochs_without_improvement"] = stale = epoch - best["epoch"]
        history.append(record)
        # The plateau rule: an epoch that did not improve divides the next epoch's rate.
        if not improved and config.lr_decay != 1:
            lr = lr / float(config.lr_decay)
            optimizer.learning_rate.assign(lr)
        # Patience running out in the last epoch counts too: extending the run must not go on
        # where a longer run would have stopped.
        stop = bool(config.patience) and stale >= config.patience
        # Checkpoint first, then point history.json at it, then drop the older one: a crash
        # at any moment leaves a consistent (checkpoint, history) pair, and the manifest
        # names each checkpoint before it exists and until after it is gone.
        ckpt_name = checkpoint_name(epoch)
        _save_checkpoint(run.claim(ckpt_name), model, optimizer, epoch)
        previous = history_doc.get("checkpoint")
        history_doc.update(best_epoch=best["epoch"], checkpoint=ckpt_name, learning_rate=lr,
                           stopped_early=stop,
                           status="complete" if epoch == config.epochs or stop else "running")
        run.write_history(history_doc)
        if previous and previous != ckpt_name and checkpoint_epoch(previous) is not None:
            run.release(previous)
        _plot_curve(run.claim(CURVE_FILE), history, stop)
        valid_text = (f"valid ppl {_ppl(record['valid_perplexity'])}"
                      if valid_items is not None else "no validation set")
        after = ("  *best" if improved else
                 f"  (no improvement; learning rate now {lr:.3g})" if config.lr_decay != 1
                 else "  (no improvement)")
        print(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f} "
              f"(ppl {_ppl(record['train_perplexity'])}), {valid_text}, "
              f"{train_seconds:.1f} s ({record['tokens_per_second']:.0f} tokens/s)" + after)
        if on_epoch is not None:
            on_epoch(record)
        if stop:
            print(f"stopping early: no improvement in {stale} epochs (--patience "
                  f"{config.patience}); best epoch {best['epoch']}")
            break
