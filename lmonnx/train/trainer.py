"""``lmonnx train``: fit a vocabulary, train the LanguageModel, keep the best epoch in RUN_DIR.

    corpus --read_sentences--> lines --Vocabulary.fit--> vocab.json
           --encode, make_pair, split_windows(max_length)--> training windows
    each epoch: shuffle (rng seeded by (seed, epoch)) --bucketed_batches--> padded batches
           --Adam on (summed masked NLL / tokens), global-norm clipping--> weights
           --validation: full sentences, token-weighted exp(sum NLL / tokens)--> history.json

RUN_DIR layout::

    config.json          model shape, tokenizer, training settings, corpus paths
    vocab.json           the vocabulary with its tokenizer options
    model.keras          the best epoch by validation perplexity (by training loss without --valid)
    history.json         one record per finished epoch, best epoch, checkpoint pointer, status
    checkpoint-N.npz     model + optimizer state after epoch N (for --resume)
    training_curve.png   train and validation perplexity per epoch

Reproducibility: one seed sets Python, NumPy, TensorFlow and Keras randomness and TensorFlow
op determinism is on, so the same seed on the same data gives the same vocabulary and the same
first-epoch loss.  The shuffling of epoch N depends only on (seed, N), so a resumed run sees
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lmonnx.atomic import atomic_path, write_atomic
from lmonnx.batching import Batch, bucketed_batches, make_pair, split_windows
from lmonnx.corpus import require_sentences
from lmonnx.evaluate import default_max_tokens, perplexity_of
from lmonnx.vocab import PRESETS, SPECIAL_TOKENS, TokenizerOptions, Vocabulary

RUN_FORMAT = "lmonnx-run/1"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"

__all__ = ["TrainConfig", "TrainResult", "train", "load_run_config", "evaluate_nll",
           "RUN_FORMAT", "CONFIG_FILE", "VOCAB_FILE", "MODEL_FILE", "HISTORY_FILE", "CURVE_FILE"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (the CLI flags of ``lmonnx train``).

    ``vocab_size`` counts the four special tokens; the vocabulary may come out smaller when
    the corpus has fewer word types.  ``embedding_dim`` None means ``int(vocab_size ** 0.25)``.
    ``dropout`` is a drop rate.  ``batch_size`` is sentences (windows) per batch at most.
    ``clipnorm`` clips the global gradient norm (0 turns clipping off).
    """

    tokenizer: str = "keras"
    vocab_size: int = 10000
    max_length: int = 35
    num_lstm_units: int = 200
    num_lstm_layers: int = 2
    dropout: float = 0.0
    embedding_dim: int | None = None
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-2
    clipnorm: float = 5.0
    seed: int = 0

    def validate(self) -> None:
        """``ValueError`` naming the flag for the first setting out of range."""
        if self.tokenizer not in PRESETS:
            raise ValueError(f"--tokenizer must be one of {', '.join(PRESETS)}; "
                             f"got {self.tokenizer!r}")
        ints = (("--vocab-size", self.vocab_size, 5, "4 special tokens and at least one word"),
                ("--max-length", self.max_length, 1, None),
                ("--units", self.num_lstm_units, 1, None),
                ("--layers", self.num_lstm_layers, 1, None),
                ("--epochs", self.epochs, 1, None),
                ("--batch-size", self.batch_size, 1, None))
        for flag, value, low, why in ints:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                extra = f" ({why})" if why else ""
                raise ValueError(f"{flag} must be an integer >= {low}{extra}; got {value!r}")
        if self.embedding_dim is not None and (
                isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int)
                or self.embedding_dim < 1):
            raise ValueError(f"--embedding-dim must be an integer >= 1; got {self.embedding_dim!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"--dropout is a drop rate in [0, 1); got {self.dropout!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
                and math.isfinite(self.learning_rate)):
            raise ValueError(f"--learning-rate must be a positive number; got {self.learning_rate!r}")
        if not (isinstance(self.clipnorm, (int, float)) and self.clipnorm >= 0
                and math.isfinite(self.clipnorm)):
            raise ValueError(f"--clipnorm must be >= 0 (0 = no clipping); got {self.clipnorm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer; got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


# ---- files ---------------------------------------------------------------------------------

def _write_json_atomic(path: Path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None


def load_run_config(run_dir) -> dict:
    """``config.json`` of a run directory; ``ValueError`` when ``run_dir`` is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not an lmonnx run directory (no such directory); "
                         "create one with `lmonnx train CORPUS --out DIR`")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not an lmonnx run directory (no {CONFIG_FILE}); "
                         "create one with `lmonnx train CORPUS --out DIR`")
    config = _read_json(path)
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not an lmonnx run config (format {RUN_FORMAT!r} expected)")
    return config


def _run_files(out_dir: Path) -> list[Path]:
    fixed = [out_dir / n for n in (CONFIG_FILE, VOCAB_FILE, MODEL_FILE, HISTORY_FILE, CURVE_FILE)]
    return [p for p in fixed if p.exists()] + sorted(out_dir.glob(CHECKPOINT_PREFIX + "*"))


def _clear_run(out_dir: Path) -> None:
    """Remove a previous run's files (only ours: a RUN_DIR may hold other things too)."""
    for p in _run_files(out_dir):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---- data ----------------------------------------------------------------------------------

def _training_items(vocab: Vocabulary, corpus: Path, errors: str, max_length: int) -> list:
    """(key, inputs, targets) windows of at most ``max_length`` positions, no token dropped."""
    items = []
    for lineno, line in require_sentences(corpus, errors):
        inputs, targets = make_pair(vocab.encode(line))
        for w, (x, y) in enumerate(split_windows(inputs, targets, max_length)):
            items.append(((lineno, w), x, y))
    return items


def _sentence_pairs(vocab: Vocabulary, path: Path, errors: str) -> list:
    """(line number, inputs, targets) of whole sentences, as evaluation scores them."""
    return [(lineno, *make_pair(vocab.encode(line)))
            for lineno, line in require_sentences(path, errors)]


def _epoch_batches(items: list, config: TrainConfig, epoch: int) -> list[Batch]:
    """Epoch ``epoch`` (1-based): a shuffle that depends only on (seed, epoch), bucketed."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(items))
    return list(bucketed_batches((items[i] for i in order),
                                 max_tokens=config.batch_size * config.max_length,
                                 max_batch_size=config.batch_size, rng=rng))


# ---- TensorFlow steps ----------------------------------------------------------------------

def _make_steps(model, optimizer):
    import tensorflow as tf

    spec = tf.TensorSpec((None, None), tf.int32)

    @tf.function(input_signature=(spec, spec))
    def train_step(inputs, targets):
        with tf.GradientTape() as tape:
            lstm_outputs, binary_sequences = model.run_lstm(inputs, training=True)
            loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
            tokens = tf.math.reduce_sum(tf.cast(binary_sequences, tf.float32))
            # The course minimised the sum; the per-token mean makes the step size (and the
            # clipping threshold) independent of how many tokens a bucketed batch holds.
            loss = loss_sum / tokens
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss_sum, tokens

    @tf.function(input_signature=(spec, spec))
    def eval_step(inputs, targets):
        lstm_outputs, binary_sequences = model.run_lstm(inputs, training=False)
        loss_sum = model.calculate_loss(lstm_outputs, binary_sequences, targets)
        return loss_sum, tf.math.reduce_sum(tf.cast(binary_sequences, tf.float32))

    return train_step, eval_step


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

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


# ---- the run -------------------------------------------------------------------------------

def _check_out_dir(out_dir: Path, resume: bool, force: bool) -> bool:
    """Returns True when an earlier run is to be resumed; changes nothing on disk."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    existing = _run_files(out_dir) if out_dir.is_dir() else []
    if resume and force:
        raise ValueError("--resume and --force contradict each other: pick one")
    if resume:
        if not (out_dir / CONFIG_FILE).is_file() or not (out_dir / HISTORY_FILE).is_file():
            raise ValueError(f"nothing to resume in {out_dir}: no {CONFIG_FILE} and "
                             f"{HISTORY_FILE} there; drop --resume to start a new run")
        return True
    if existing:
        if not force:
            raise ValueError(f"{out_dir} already holds a training run; pass --resume to continue "
                             "it or --force to start over")
    return False


def _plot_curve(path: Path, history: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_perplexity"] for h in history], "o-", label="train (dropout on)")
    valid = [h.get("valid_perplexity") for h in history]
    if any(v is not None for v in valid):
        ax.plot(epochs, valid, "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (exp mean NLL per token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _save_model_atomic(model, path: Path) -> None:
    with atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the suffix
        model.save(tmp)


def _is_better(record: dict, best: dict | None) -> bool:
    if best is None:
        return True
    key = "valid_perplexity" if record.get("valid_perplexity") is not None else "train_loss"
    return record[key] < best[key]


def train(config: TrainConfig, corpus, valid=None, out_dir="run", errors: str = "strict",
          resume: bool = False, force: bool = False) -> TrainResult:
    """Train ``LanguageModel`` on ``corpus`` (one sentence per line) into ``out_dir``.

    With ``resume`` an interrupted run continues after its last finished epoch, with the
    settings stored in its ``config.json``.  User errors (bad settings, unreadable corpora, an
    occupied ``out_dir``) raise ``ValueError`` with a one-line message before any training.
    """
    corpus = Path(corpus)
    valid = Path(valid) if valid is not None else None
    out_dir = Path(out_dir)
    config.validate()
    require_sentences(corpus, errors)  # a missing corpus fails here, before anything is written
    if valid is not None:
        require_sentences(valid, errors)
    if _check_out_dir(out_dir, resume, force):
        return _resume(config, corpus, valid, out_dir, errors)

    # Read everything before building a model, so bad input fails in a second.
    vocab = Vocabulary.fit((line for _, line in require_sentences(corpus, errors)),
                           config.vocab_size, TokenizerOptions.from_preset(config.tokenizer))
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise ValueError(f"{corpus}: no words after tokenization with the {config.tokenizer!r} "
                         "tokenizer (punctuation only?); nothing to train on")
    items = _training_items(vocab, corpus, errors, config.max_length)
    valid_pairs = _sentence_pairs(vocab, valid, errors) if valid is not None else None

    run_config = {
        "format": RUN_FORMAT,
        "vocab_size": len(vocab),
        "max_length": config.max_length,
        "num_lstm_units": config.num_lstm_units,
        "num_lstm_layers": config.num_lstm_layers,
        "embedding_dim": config.embedding_dim,  # filled in below once the model exists
        "dropout": float(config.dropout),
        "tokenizer": vocab.options.to_dict(),
        "train": config.to_dict(),
        "corpus": str(corpus.resolve()),
        "valid": str(valid.resolve()) if valid is not None else None,
        "errors": errors,
    }
    if out_dir.is_dir():
        _clear_run(out_dir)  # --force (checked above)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / VOCAB_FILE, vocab.to_json())
    history_doc = {"status": "running", "epochs": [], "best_epoch": None, "checkpoint": None}
    model = _build_model(config, len(vocab))
    run_config["embedding_dim"] = model.embedding_dim
    _write_json_atomic(out_dir / CONFIG_FILE, run_config)
    _write_json_atomic(out_dir / HISTORY_FILE, history_doc)
    optimizer = _make_optimizer(config)
    return _fit(model, optimizer, config, vocab, items, valid_pairs, out_dir, history_doc,
                start_epoch=1)


def _build_model(config: TrainConfig, vocab_size: int):
    _set_seed(int(config.seed))
    from lmonnx.train.model import LanguageModel

    model = LanguageModel(vocab_size, config.max_length, config.num_lstm_units,
                          config.num_lstm_layers, embedding_dim=config.embedding_dim,
                          dropout=config.dropout)
    model.build()
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
                raise ValueError(f"{path} holds {len(stored)} {prefix} variables, the model "
                                 f"needs {len(variables)}; the checkpoint does not fit this run")
            for key, var in zip(stored, variables):
                value = data[key]
                if tuple(value.shape) != tuple(var.shape):
                    raise ValueError(f"{path}: {key} has shape {value.shape}, {var.path} needs "
                                     f"{tuple(var.shape)}; the checkpoint does not fit this run")
                var.assign(value)
        return int(data["epoch"])


def _resume(config: TrainConfig, corpus: Path, valid: Path | None, out_dir: Path,
            errors: str) -> TrainResult:
    run_config = load_run_config(out_dir)
    history_doc = _read_json(out_dir / HISTORY_FILE)
    stored = TrainConfig.from_dict(run_config["train"])
    if corpus.resolve() != Path(run_config["corpus"]):
        raise ValueError(f"{out_dir} was trained on {run_config['corpus']}, not {corpus}; "
                         "resume with the same corpus or start a new run")
    stored_valid = run_config.get("valid")
    if valid is not None and str(valid.resolve()) != stored_valid:
        raise ValueError(f"{out_dir} was validated on {stored_valid}, not {valid}; resume with "
                         "the same --valid (or none) or start a new run")
    differing = [k for k, v in stored.to_dict().items() if config.to_dict()[k] != v]
    if differing:
        print(f"resuming {out_dir} with its stored settings (ignoring "
              + ", ".join(f"{k}={config.to_dict()[k]!r}" for k in differing) + ")")
    config = stored
    done = len(history_doc["epochs"])
    if history_doc.get("status") == "complete" or done >= config.epochs:
        print(f"{out_dir}: run already complete ({done} epochs); nothing to resume")
        return TrainResult(out_dir, history_doc["epochs"], history_doc["best_epoch"],
                           run_config["vocab_size"])
    vocab = Vocabulary.load(out_dir / VOCAB_FILE)
    items = _training_items(vocab, corpus, run_config.get("errors", errors), config.max_length)
    valid_path = Path(run_config["valid"]) if run_config.get("valid") else None
    valid_pairs = (_sentence_pairs(vocab, valid_path, run_config.get("errors", errors))
                   if valid_path is not None else None)
    model = _build_model(config, len(vocab))
    optimizer = _make_optimizer(config)
    if done:
        ckpt = out_dir / str(history_doc.get("checkpoint"))
        if not ckpt.is_file() or _load_checkpoint(ckpt, model, optimizer) != done:
            raise ValueError(f"{out_dir}: checkpoint of epoch {done} is missing or does not "
                             "match history.json; start over with --force")
        print(f"resuming {out_dir} after epoch {done} of {config.epochs}")
    return _fit(model, optimizer, config, vocab, items, valid_pairs, out_dir, history_doc,
                start_epoch=done + 1)


def _fit(model, optimizer, config: TrainConfig, vocab: Vocabulary, items: list,
         valid_pairs: list | None, out_dir: Path, history_doc: dict,
         start_epoch: int) -> TrainResult:
    train_step, eval_step = _make_steps(model, optimizer)
    n_tokens = sum(len(x) for _, x, _ in items)
    if start_epoch == 1:
        print(f"training on {len(items)} windows ({n_tokens} tokens), vocabulary {len(vocab)}, "
              f"{model.count_params()} parameters")
    try:
        _epochs(model, optimizer, config, items, valid_pairs, out_dir, history_doc, train_step,
                eval_step, start_epoch)
    except KeyboardInterrupt:
        done = len(history_doc["epochs"])
        print(f"interrupted after {done} finished epoch(s); continue with the same command "
              "and --resume", file=sys.stderr)
        raise
    result = TrainResult(out_dir, history_doc["epochs"], history_doc["best_epoch"], len(vocab))
    b = result.best
    summary = (f"valid ppl {b['valid_perplexity']:.2f}" if b["valid_perplexity"] is not None
               else f"train loss {b['train_loss']:.4f}")
    print(f"best epoch {b['epoch']} ({summary}) saved to {out_dir / MODEL_FILE}")
    return result


def _epochs(model, optimizer, config: TrainConfig, items: list, valid_pairs: list | None,
            out_dir: Path, history_doc: dict, train_step, eval_step, start_epoch: int) -> None:
    """Train epochs ``start_epoch .. config.epochs``, recording each in ``history_doc``."""
    from tqdm.auto import tqdm

    history = history_doc["epochs"]
    best = history[history_doc["best_epoch"] - 1] if history_doc.get("best_epoch") else None
    for epoch in range(start_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        batches = _epoch_batches(items, config, epoch)
        nll_sum, tokens = 0.0, 0
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                  disable=None, leave=False) as bar:
            for i, batch in enumerate(batches):
                loss_sum, n = train_step(batch.inputs, batch.targets)
                nll_sum += float(loss_sum)
                tokens += int(n)
                if not math.isfinite(nll_sum):
                    raise ValueError(
                        f"training diverged in epoch {epoch} (loss is {nll_sum}); "
                        "lower --learning-rate or --clipnorm")
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{nll_sum / tokens:.3f}")
        train_seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "train_loss": nll_sum / tokens,
                  "train_perplexity": perplexity_of(nll_sum, tokens), "train_tokens": tokens,
                  "train_seconds": round(train_seconds, 3),
                  "tokens_per_second": round(tokens / train_seconds, 1)}
        if valid_pairs is not None:
            v0 = time.perf_counter()
            nll, n = evaluate_nll(model, valid_pairs, eval_step=eval_step)
            record.update(valid_nll=nll, valid_tokens=n, valid_perplexity=perplexity_of(nll, n),
                          valid_seconds=round(time.perf_counter() - v0, 3))
        else:
            record["valid_perplexity"] = None
        improved = _is_better(record, best)
        if improved:
            best = record
            _save_model_atomic(model, out_dir / MODEL_FILE)
        history.append(record)
        # Checkpoint first, then point history.json at it, then drop the older one: a crash
        # at any moment leaves a consistent (checkpoint, history) pair.
        ckpt_name = f"{CHECKPOINT_PREFIX}{epoch}.npz"
        _save_checkpoint(out_dir / ckpt_name, model, optimizer, epoch)
        previous = history_doc.get("checkpoint")
        history_doc.update(best_epoch=best["epoch"], checkpoint=ckpt_name,
                           status="complete" if epoch == config.epochs else "running")
        _write_json_atomic(out_dir / HISTORY_FILE, history_doc)
        if previous and previous != ckpt_name:
            _unlink_quietly(out_dir / previous)
        _plot_curve(out_dir / CURVE_FILE, history)
        valid_text = (f"valid ppl {record['valid_perplexity']:.2f}"
                      if record["valid_perplexity"] is not None else "no validation set")
        print(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f} "
              f"(ppl {record['train_perplexity']:.2f}), {valid_text}, "
              f"{train_seconds:.1f} s ({record['tokens_per_second']:.0f} tokens/s)"
              + ("  *best" if improved else ""))
