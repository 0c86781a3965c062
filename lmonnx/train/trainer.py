"""``lmonnx train``: fit a vocabulary, train a recipe's model, keep the best epoch in RUN_DIR.

    corpus --read once (lmonnx.corpus)--> lines --[--holdout: a random share held out as the
           validation set]--> Vocabulary.fit --> vocab.json --ExampleBuilder (lmonnx.examples)
    each epoch (TrainingRun): rng seeded by (seed, epoch)
      tied recipe (TiedLanguageModel, the default): the sentences shuffled into one stream,
           cut into batch_size columns and windows of max_length (stream_windows); each
           window one SGD step from the state the previous one ended in (StreamStep)
      course recipe (LanguageModel): packed_batches: one shuffle of the sentences' windows
           cut into batches of batch_size windows (the plain loop's batches, in its order),
           each packed end to end in fewer rows with the state restarting at every window
           [--no-pack: padded_batches, the same windows padded to the longest]; Adam
           (BatchStep) --> (summed masked NLL / the batch's tokens), global-norm clipping
           --> weights
           --validate: whole sentences from the zero state (a long one in windows that carry
           the LSTM state), token-weighted exp(sum NLL / tokens)
           --end_epoch: best so far -> model.keras; lr_patience epochs without improvement:
             learning rate / lr_decay;
           patience epochs without one, or no time left in max_minutes: stop; checkpoint,
           history.json, curve

Why the tied recipe is the default: on the same text it beats a KenLM 5-gram, which the
course's model does not (README, Benchmarks, "Model quality against KenLM"): tying, locked
dropout and SGD on a carried stream are what Zaremba et al. (2014), Press & Wolf (2017) and
pytorch's word_language_model do at this scale.  Its stream has no padding, so packing is the
course recipe's alone.

Convergence and speed of the course recipe (README, "Batches (course recipe)").  Sorting batches
by length saves the LSTM's padded steps but gives every step a biased sample, and on real text
that costs convergence (``benchmarks/train_table.py --sort-pool`` measures it).  So the batches
are those of the plain loop, and the speed comes from not computing padding: each batch's
windows are laid end to end in as few rows as first-fit decreasing finds, the LSTM state zeroed
at the first position of every window (``LanguageModel.run_lstm_packed``), so the summed loss
and gradient are the padded batch's (tested to float32 round-off, step by step); the output
layer runs at real positions only (``LanguageModel.calculate_loss``).

Schedule and stopping.  After each epoch the selection loss (validation NLL per token; the
training loss without a validation set) either improves on the best so far -- the epoch is
saved as ``model.keras`` -- or not, and then the learning rate is divided by ``lr_decay`` for
the next epoch (pytorch's word_language_model anneals by 4 the same way; 1 keeps it constant).
With ``patience`` N > 0 training stops after N epochs in a row without improvement.  With
``max_minutes`` no epoch starts that would end past the budget (``budget_state``), and
the last one that fits trains at the rate divided by ``lr_decay`` (a final anneal).

Every setting, the corpora and the output directory are checked, the corpora read and the
model built before the first file is written, so a bad flag leaves nothing behind; a resume
that fails its checks changes nothing either.

Reproducibility: one seed sets Python, NumPy, TensorFlow and Keras randomness and TensorFlow
op determinism is on.  The batches of epoch N depend only on (seed, N), and a checkpoint holds
the model, optimizer and dropout-seed state, so a resumed run -- an interrupted one, or a
finished one extended with more ``epochs`` -- reaches the weights an uninterrupted run would.

Resuming.  Settings given on resume that equal the run's change nothing; ``epochs``,
``learning_rate`` (the next epoch's), ``lr_decay``, ``patience``, ``clipnorm`` and
``max_minutes`` may change and are recorded in ``config.json``; any other setting given with
another value is refused.

A loss that is not finite, or whose mean is too large for a perplexity (>= 709 nats per
token), raises ``TrainingError``: the run diverged, and nothing non-finite is written.  A
corpus given as ``-`` is read from standard input, once; resuming such a run needs ``-`` and
the same text piped in again (checked against the SHA-256 that ``config.json`` records).

Progress and notices go to the ``lmonnx`` logger (INFO); the CLI prints them on stderr.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from lmonnx.batching import (Batch, PackedBatch, StreamWindow, packed_batches, padded_batches,
                             split_windows, stream_windows)
from lmonnx.corpus import require_sentences
from lmonnx.errors import InvalidArgumentError, RunDirError, TrainingError
from lmonnx.examples import ExampleBuilder
from lmonnx.metrics import perplexity_of
from lmonnx.rundir import (CONFIG_FILE, CURVE_FILE, MODEL_FILE, RUN_FORMAT, STDIN, STDIN_CORPUS,
                           VOCAB_FILE, EpochRecord, History, RunDir, checkpoint_name,
                           finite_or_none, load_run_config, sentences_sha256)
from lmonnx.train.config import SEED_MAX, TrainConfig, flag_of, resumed_config
from lmonnx.train.steps import (BatchStep, RecipeModel, StreamStep, TrainStep, Validator,
                                evaluate_nll)
from lmonnx.vocab import SPECIAL_TOKENS, TokenizerOptions, Vocabulary

log = logging.getLogger("lmonnx")

MAX_MEAN_NLL = 709.0
"""Nats per token above which ``exp`` overflows a float64: a model this far beyond a uniform
guess over any vocabulary (ln V nats) has diverged, and its perplexity cannot be stored."""

__all__ = ["TrainConfig", "TrainResult", "TrainingRun", "train", "load_run_config",
           "evaluate_nll", "sentence_items", "SEED_MAX", "MAX_MEAN_NLL"]


@dataclass
class TrainResult:
    """What ``train`` leaves behind: the run directory and its epoch records."""

    run_dir: Path
    history: list[EpochRecord]
    best_epoch: int
    vocab_size: int

    @property
    def best(self) -> EpochRecord:
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


def _epoch_batches(items: list, config: TrainConfig, epoch: int
                   ) -> list[tuple[Batch | PackedBatch | StreamWindow, np.float32]]:
    """Epoch ``epoch`` (1-based), each batch with what its summed loss is divided by (its
    tokens: the per-token mean); a function of (seed, epoch) only.  Tied recipe: the shuffled
    sentences as one stream in ``batch_size`` columns, windows of ``max_length``; course:
    random batches of ``batch_size`` windows, packed (``config.pack``) or padded."""
    rng = np.random.default_rng([config.seed, epoch])
    if config.recipe == "tied":
        batches = stream_windows(items, columns=config.batch_size, window=config.max_length,
                                 rng=rng)
    else:
        make = packed_batches if config.pack else padded_batches
        batches = make(items, batch_size=config.batch_size, rng=rng)
    return [(b, np.float32(b.tokens)) for b in batches]


def held_out_split(lines: list, config: TrainConfig) -> tuple[list, list | None]:
    """(training lines, held-out lines or None): ``config.holdout`` of the sentences drawn
    at random by ``config.seed`` (the same split on resume), the rest in corpus order."""
    if not config.holdout:
        return lines, None
    rng = np.random.default_rng([config.seed, 0])  # epochs use (seed, epoch >= 1)
    held = np.zeros(len(lines), bool)
    held[rng.permutation(len(lines))[:max(1, round(config.holdout * len(lines)))]] = True
    if held.all():
        raise InvalidArgumentError(f"--holdout {config.holdout} leaves no training sentence "
                                   f"of {len(lines)}; lower it or give --valid")
    return ([line for line, h in zip(lines, held) if not h],
            [line for line, h in zip(lines, held) if h])


def _check_loss(epoch: int, what: str, nll: float, tokens: int, config: TrainConfig) -> None:
    """``TrainingError`` (one line, with the flags to change) when the loss is not finite or
    its mean per token is too large for a perplexity: the run has diverged."""
    mean = nll / tokens if tokens else nll
    if math.isfinite(mean) and mean < MAX_MEAN_NLL:
        return
    clip = ("clip gradients with --clipnorm (e.g. 5)" if config.clipnorm == 0
            else f"lower --clipnorm (now {config.clipnorm:g})")
    size = "" if not math.isfinite(mean) else " (its perplexity overflows a float64)"
    raise TrainingError(f"training diverged in epoch {epoch}: the {what} loss is {mean:.4g} "
                        f"nats per token{size}; lower --learning-rate (now "
                        f"{config.learning_rate:g}) or {clip}, and continue with --resume")


def _selection_loss(record: EpochRecord) -> float:
    return record.selection_loss


def _ppl(value) -> str:
    return "inf" if value is None else f"{value:.2f}"


# ---- the run in progress -------------------------------------------------------------------

class TrainingRun:
    """A run being trained: its directory, settings, data, model, optimizer and history.

    ``fit`` is the epoch loop: ``train_epoch`` (one pass over the epoch's batches),
    ``validate`` (the validation NLL into the record), ``end_epoch`` (best model, schedule,
    stopping, checkpoint, history, curve).  The recipe's model, its step and the validator
    meet the contracts of :mod:`lmonnx.train.steps` (``RecipeModel``, ``TrainStep``)."""

    def __init__(self, run: RunDir, config: TrainConfig, vocab: Vocabulary, items: list,
                 valid_items: list | None, history: History):
        self.run, self.config, self.vocab = run, config, vocab
        self.items, self.valid_items, self.history = items, valid_items, history
        self.model: RecipeModel = _build_model(config, len(vocab))
        self.optimizer = _make_optimizer(config)
        step_kind = StreamStep if config.recipe == "tied" else BatchStep
        self.step: TrainStep = step_kind(self.model, self.optimizer)
        self.validator = Validator(self.model)

    def fit(self, on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
        """Train epochs ``len(history) + 1 .. config.epochs`` (fewer when patience runs out)."""
        try:
            for epoch in range(len(self.history.epochs) + 1, self.config.epochs + 1):
                record = self.train_epoch(epoch)
                self.validate(record)
                stop = self.end_epoch(record)
                if on_epoch is not None:
                    on_epoch(record)
                if stop:
                    break
        except KeyboardInterrupt:
            log.warning(f"interrupted after {len(self.history.epochs)} finished epoch(s); "
                        "continue with the same command and --resume")
            raise
        best = self.history.best
        summary = (f"valid ppl {_ppl(best.valid_perplexity)}" if best.valid_tokens
                   else f"train loss {best.train_loss:.4f}")
        log.info(f"best epoch {best.epoch} ({summary}) saved to {self.run.file(MODEL_FILE)}")
        return TrainResult(self.run.path, self.history.epochs, best.epoch, len(self.vocab))

    def train_epoch(self, epoch: int) -> EpochRecord:
        """One pass over epoch ``epoch``'s batches at the current learning rate."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        batches = _epoch_batches(self.items, self.config, epoch)
        self.step.start_epoch()
        nll, tokens = 0.0, 0
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{self.config.epochs}",
                  unit="batch", disable=None, leave=False) as bar:
            for i, (batch, loss_scale) in enumerate(batches):
                loss_sum, n = self.step(batch, loss_scale)
                loss_sum, n = float(loss_sum), int(n)
                if not math.isfinite(loss_sum):
                    _check_loss(epoch, "training", loss_sum, n, self.config)
                nll, tokens = nll + loss_sum, tokens + n
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{nll / tokens:.3f}")
        seconds = time.perf_counter() - t0
        _check_loss(epoch, "training", nll, tokens, self.config)
        return EpochRecord(epoch=epoch, train_loss=nll / tokens,
                           train_perplexity=finite_or_none(perplexity_of(nll, tokens)),
                           train_tokens=tokens, train_seconds=round(seconds, 3),
                           tokens_per_second=round(tokens / seconds, 1),
                           learning_rate=self.history.learning_rate)

    def validate(self, record: EpochRecord) -> None:
        """The validation set's NLL, tokens and perplexity into ``record`` (none without one)."""
        if self.valid_items is None:
            return
        t0 = time.perf_counter()
        nll, n = evaluate_nll(self.model, self.valid_items, validator=self.validator)
        _check_loss(record.epoch, "validation", nll, n, self.config)
        record.valid_nll, record.valid_tokens = nll, n
        record.valid_perplexity = finite_or_none(perplexity_of(nll, n))
        record.valid_seconds = round(time.perf_counter() - t0, 3)

    def end_epoch(self, record: EpochRecord) -> bool:
        """Keep a new best, apply the plateau rule, save, report; whether to stop now."""
        history, config = self.history, self.config
        improved = history.best is None or _selection_loss(record) < _selection_loss(
            history.best)
        if improved:
            history.best_epoch = record.epoch
        record.epochs_without_improvement = stale = record.epoch - history.best_epoch
        history.epochs.append(record)
        decayed = (not improved and stale % config.lr_patience == 0
                   and config.lr_decay != 1)
        out_of_time, last = self._budget()
        if decayed or (last and config.lr_decay != 1):  # the next epoch's rate
            history.learning_rate /= float(config.lr_decay)
            self.optimizer.learning_rate.assign(history.learning_rate)
        # Patience running out in the last epoch counts too: extending the run must not go
        # on where a longer run would have stopped.
        stopped_early = bool(config.patience) and stale >= config.patience
        self._save(record.epoch, improved, stopped_early, stopped_early or out_of_time)
        self._report(record, improved, stopped_early, out_of_time)
        if last and not (stopped_early or out_of_time):
            log.info(f"the next epoch should be the last within --max-minutes "
                     f"{config.max_minutes:g}; it trains at learning rate "
                     f"{history.learning_rate:.3g}")
        return stopped_early or out_of_time

    def _budget(self) -> tuple[bool, bool]:
        return budget_state(self.config, self.history)

    def _save(self, epoch: int, improved: bool, stopped_early: bool, finished: bool) -> None:
        """Checkpoint, then the best model (stamped with its epoch), then history.json
        pointing at the checkpoint, then drop the older checkpoint -- only while the best
        model is on disk.  A crash at any moment leaves a checkpoint that history.json names,
        and ``model.keras`` says which epoch it holds (``RunDir.model_epoch``)."""
        name = checkpoint_name(epoch)
        from lmonnx.train.checkpoint import save_checkpoint

        save_checkpoint(self.run.claim(name), self.model, self.optimizer, epoch)
        if improved:
            self.save_model(epoch)
        previous = self.history.checkpoint
        self.history.checkpoint, self.history.stopped_early = name, stopped_early
        self.history.status = ("complete" if epoch == self.config.epochs or finished
                               else "running")
        self.run.write_history(self.history)
        if previous and previous != name and self.run.file(MODEL_FILE).is_file():
            self.run.release(previous)
        from lmonnx.train.curve import plot_curve

        plot_curve(self.run.claim(CURVE_FILE), self.history.epochs, stopped_early)

    def save_model(self, epoch: int) -> None:
        """``model.keras`` from the current weights, which are epoch ``epoch``'s."""
        from lmonnx.atomic import atomic_path

        self.model.epoch = epoch
        with atomic_path(self.run.claim(MODEL_FILE), suffix=".keras") as tmp:  # Keras wants it
            self.model.save(tmp)

    def _report(self, record: EpochRecord, improved: bool, stopped_early: bool,
                out_of_time: bool) -> None:
        valid = (f"valid ppl {_ppl(record.valid_perplexity)}" if self.valid_items is not None
                 else "no validation set")
        rate = self.history.learning_rate
        changed = "now" if rate != record.learning_rate else "stays"
        patience = self.config.lr_patience  # "2/3": the stale epochs counted toward an anneal
        counted = record.epochs_without_improvement % patience or patience
        stale = f" {counted}/{patience}" if patience > 1 else ""
        after = ("  *best" if improved else
                 f"  (no improvement{stale}; learning rate {changed} {rate:.3g})"
                 if self.config.lr_decay != 1 else "  (no improvement)")
        log.info(f"epoch {record.epoch}/{self.config.epochs}: {self.config.optimizer} at "
                 f"learning rate {record.learning_rate:.3g}, train loss "
                 f"{record.train_loss:.4f} (ppl {_ppl(record.train_perplexity)}), {valid}, "
                 f"{record.train_seconds:.1f} s ({record.tokens_per_second:.0f} tokens/s)"
                 + after)
        if stopped_early:
            log.info(f"stopping early: no improvement in {record.epochs_without_improvement} "
                     f"epochs (--patience {self.config.patience}); best epoch "
                     f"{self.history.best_epoch}")
        elif out_of_time:
            log.info(f"stopping: no further epoch fits in --max-minutes "
                     f"{self.config.max_minutes:g}; best epoch {self.history.best_epoch} "
                     "(a larger --max-minutes with --resume goes on)")


def _build_model(config: TrainConfig, vocab_size: int) -> RecipeModel:
    from lmonnx.train.model import LanguageModel  # first: TensorFlow's start-up, quiet

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(config.seed))
    tf.config.experimental.enable_op_determinism()

    try:
        if config.recipe == "tied":
            from lmonnx.train.tied import TiedLanguageModel

            model = TiedLanguageModel(vocab_size, config.max_length, config.num_lstm_units,
                                      config.num_lstm_layers, dropout=config.dropout,
                                      softmax=config.softmax, cutoffs=config.cutoffs,
                                      tail_div=config.tail_div, tie_tails=config.tie_tails)
        else:
            model = LanguageModel(vocab_size, config.max_length, config.num_lstm_units,
                                  config.num_lstm_layers, embedding_dim=config.embedding_dim,
                                  dropout=config.dropout)
        model.build()
    except (MemoryError, tf.errors.ResourceExhaustedError):
        raise InvalidArgumentError(f"the model does not fit in memory (--units "
                                   f"{config.num_lstm_units}, --layers {config.num_lstm_layers}"
                                   f", vocabulary {vocab_size}); choose smaller values") from None
    return model


def _make_optimizer(config: TrainConfig):
    import keras

    clip = {"global_clipnorm": float(config.clipnorm)} if config.clipnorm > 0 else {}
    optimizer = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[config.optimizer]
    return optimizer(learning_rate=float(config.learning_rate), **clip)


# ---- starting and resuming -------------------------------------------------------------------

def train(config: TrainConfig | Mapping[str, Any] | None, corpus, valid=None, out_dir="run",
          errors: str = "strict", resume: bool = False, force: bool = False,
          on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Train the recipe's model (``TiedLanguageModel`` by default, ``LanguageModel`` with
    ``recipe="course"``) on ``corpus`` (one sentence per line; ``"-"``: standard input) into
    ``out_dir``.

    ``config``: a :class:`TrainConfig`, or the settings to change from its defaults
    (name -> value; None: none).  With ``resume`` the run in ``out_dir`` continues after its
    last finished epoch with its stored settings; settings in ``config`` that differ from them
    are applied when they may change on resume (``lmonnx.train.config.RESUMABLE``: a larger
    ``epochs`` extends a finished run) and refused otherwise.  ``force`` starts over in a
    directory holding a run, deleting only the files that run owns (:mod:`lmonnx.rundir`).
    User errors raise an ``LmonnxError`` (a ``ValueError``) with a one-line message before
    anything is written; divergence raises ``TrainingError`` during training.  ``on_epoch``
    is called with each finished epoch's record after the epoch's files are written.
    """
    given = _given(config)
    corpus, valid, run = Path(corpus), None if valid is None else Path(valid), RunDir(out_dir)
    # Every setting checked now; a new run's also against its recipe (a resumed run's recipe
    # is the stored one, checked when it is read).
    config = TrainConfig().with_overrides(given)
    if resume:
        config.validate()
    else:
        config = config.resolved()
    if resume and force:
        raise InvalidArgumentError("--resume and --force contradict each other: pick one")
    if str(corpus) == STDIN and valid is not None and str(valid) == STDIN:
        raise InvalidArgumentError("CORPUS and --valid cannot both be - (standard input)")
    require_sentences(corpus, errors)  # a missing corpus fails here, before anything is read
    if valid is not None:
        require_sentences(valid, errors)
    if not resume:
        if valid is not None and given.get("holdout"):
            raise InvalidArgumentError("--holdout and --valid: give one validation set")
        training = _start(config, corpus, valid, run, errors, force)
    else:
        training = _resume(given, corpus, valid, run, errors)
        if isinstance(training, TrainResult):  # nothing to train
            return training
    return training.fit(on_epoch)


def _given(config) -> dict[str, Any]:
    """The settings given: a None value is one left to the recipe, not given."""
    if config is None:
        return {}
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {k: v for k, v in config.items() if v is not None}
    raise InvalidArgumentError(f"config must be a TrainConfig or a mapping of settings; got "
                               f"{type(config).__name__}")


def _start(config: TrainConfig, corpus: Path, valid: Path | None, run: RunDir, errors: str,
           force: bool) -> TrainingRun:
    """A new run: everything read and built first, then the run directory written."""
    run.check_new(force)
    _warn_unusual_rate(config)
    source = _read_source(corpus, errors)
    valid_source = _read_source(valid, errors) if valid is not None else None
    lines, valid_lines = _split(config, source, valid_source)
    vocab = Vocabulary.fit((line.text for line in lines), config.vocab_size,
                           TokenizerOptions.from_preset(config.tokenizer))
    if len(vocab) <= len(SPECIAL_TOKENS):
        name = "standard input" if str(corpus) == STDIN else corpus
        raise InvalidArgumentError(f"{name}: no words after tokenization with the "
                                   f"{config.tokenizer!r} tokenizer (punctuation only?); "
                                   "nothing to train on")
    training = _setup(run, config, vocab, lines, valid_lines,
                      History(learning_rate=float(config.learning_rate)))
    run.start_new(force)  # the manifest first, then every file it lists
    vocab.save(run.claim(VOCAB_FILE))
    run.write_config(_run_config(config, training, source, valid_source, errors))
    run.write_history(training.history)
    unit = "sentence(s) as one stream" if config.recipe == "tied" else "window(s)"
    log.info(f"training on {len(training.items)} {unit} "
             f"({sum(len(x) for _, x, _ in training.items)} tokens), vocabulary {len(vocab)}, "
             f"{training.model.count_params()} parameters")
    return training


def _warn_unusual_rate(config: TrainConfig) -> None:
    """A warning (one line) when the learning rate is outside its optimizer's usual range:
    SGD at Adam's rate learns almost nothing, and nothing else would say so."""
    notice = config.unusual_learning_rate()
    if notice is not None:
        log.warning(notice)


def _split(config: TrainConfig, source: _Source, valid_source: _Source | None
           ) -> tuple[list, list | None]:
    """(training lines, validation lines or None): the held-out share of the corpus with
    ``holdout``, else ``--valid``'s lines."""
    lines, held_out = held_out_split(source.lines, config)
    if held_out is not None:
        return lines, held_out
    return lines, valid_source.lines if valid_source else None


def _setup(run: RunDir, config: TrainConfig, vocab: Vocabulary, lines: list,
           valid_lines: list | None, history: History) -> TrainingRun:
    """The run object of a new or a resumed run: training items (whole sentences for the
    tied recipe's stream, windows for the course's), validation sentences, model."""
    items = (sentence_items(vocab, lines) if config.recipe == "tied"
             else _training_items(vocab, lines, config.max_length))
    valid_items = sentence_items(vocab, valid_lines) if valid_lines is not None else None
    return TrainingRun(run, config, vocab, items, valid_items, history)


def _run_config(config: TrainConfig, training: TrainingRun, source: _Source,
                valid_source: _Source | None, errors: str) -> dict:
    return {
        "format": RUN_FORMAT,
        "vocab_size": len(training.vocab),
        "max_length": config.max_length,
        "num_lstm_units": config.num_lstm_units,
        "num_lstm_layers": config.num_lstm_layers,
        "embedding_dim": training.model.embedding_dim,
        "dropout": float(config.dropout),
        "tokenizer": training.vocab.options.to_dict(),
        "train": config.to_dict(),
        "corpus": source.recorded,
        "corpus_sha256": source.sha256,
        "valid": valid_source.recorded if valid_source else None,
        "valid_sha256": valid_source.sha256 if valid_source else None,
        "errors": errors,
    }


def _resume(given: dict, corpus: Path, valid: Path | None, run: RunDir,
            errors: str) -> TrainingRun | TrainResult:
    """The run in ``run`` ready to continue, or its result when there is nothing to train.
    Nothing is written before every check has passed."""
    run.check_resume()
    run_config, history = run.read_config(), run.read_history()
    if history is None:
        raise RunDirError(f"nothing to resume in {run.path}: no history.json; drop --resume "
                          "to start a new run")
    stored = TrainConfig.from_dict(run_config["train"], run.file(CONFIG_FILE))
    config, changed = resumed_config(stored, given, run.path)
    done = len(history.epochs)
    if _nothing_to_train(run, config, history):
        return TrainResult(run.path, history.epochs, history.best_epoch,
                           run_config["vocab_size"])
    _check_best_model(run, history)
    errors = run_config.get("errors", errors)
    source = _resume_source(corpus, run_config["corpus"], run_config["corpus_sha256"], errors,
                            run, "CORPUS")
    valid_source = _resume_source(valid, run_config["valid"], run_config["valid_sha256"],
                                  errors, run, "--valid")
    if "learning_rate" in changed:  # the next epoch trains with the rate given
        history.learning_rate = float(config.learning_rate)
    training = _setup(run, config, _load_vocab(run), *_split(config, source, valid_source),
                      history)
    if done:
        _restore(training, done)
    if changed:  # only now, every check passed: record what the run continues with
        run.write_config(dict(run_config, train=config.to_dict()))
        log.info(f"resuming {run.path} with " + ", ".join(
            f"{flag_of(k)} {new} (was {'unset' if old is None else old})"
            for k, (old, new) in changed.items()))
        if "learning_rate" in changed:
            _warn_unusual_rate(config)
    history.status = "running"
    run.write_history(history)
    log.info(f"resuming {run.path} after epoch {done} of {config.epochs}")
    return training


def budget_state(config: TrainConfig, history: History) -> tuple[bool, bool]:
    """(no further epoch fits in ``config.max_minutes``, the next one should be the last),
    counting every epoch of the run (resumed ones too), the next one timed by the faster of
    the last two (training and validation: the first epoch of a process also traces the
    steps); (False, False) without a budget or an epoch."""
    if config.max_minutes is None or not history.epochs:
        return False, False
    took = [r.train_seconds + (r.valid_seconds or 0) for r in history.epochs]
    left, epoch = config.max_minutes * 60 - sum(took), min(took[-2:])
    return left < epoch, len(took) > 1 and epoch <= left < 2 * epoch


def _nothing_to_train(run: RunDir, config: TrainConfig, history: History) -> bool:
    done = len(history.epochs)
    if budget_state(config, history)[0] and config.epochs > done:
        log.info(f"{run.path}: the run's --max-minutes {config.max_minutes:g} is spent after "
                 f"epoch {done}; nothing to resume (pass a larger --max-minutes to go on)")
    elif history.stopped_early and config.patience and (
            history.epochs[-1].epochs_without_improvement >= config.patience):
        stale = history.epochs[-1].epochs_without_improvement
        log.info(f"{run.path}: run stopped early after epoch {done} (no improvement in "
                 f"{stale} epochs, --patience {config.patience}); nothing to resume (a larger "
                 "--patience goes on)")
    elif config.epochs < done:
        log.info(f"{run.path}: already trained {done} epochs, past --epochs {config.epochs}; "
                 "nothing changed (a run cannot be shortened)")
    elif config.epochs == done:
        log.info(f"{run.path}: run already complete ({done} epochs); nothing to resume "
                 "(pass a larger --epochs to extend it)")
    else:
        return False
    return True


def _check_best_model(run: RunDir, history: History) -> None:
    """``RunDirError`` when the best model is gone and the newest checkpoint does not hold it
    (resuming would release the older checkpoint that does)."""
    if history.best_epoch and not run.file(MODEL_FILE).is_file() \
            and history.best_epoch != len(history.epochs):
        raise RunDirError(f"{run.file(MODEL_FILE)} is missing: it held epoch "
                          f"{history.best_epoch}, the best, which no checkpoint holds any more; "
                          "restore the file or start over with --force")


def _restore(training: TrainingRun, done: int) -> None:
    """The model and optimizer after epoch ``done`` from its checkpoint; a missing
    ``model.keras`` that held that epoch is saved again."""
    from lmonnx.train.checkpoint import load_checkpoint

    run, history = training.run, training.history
    name = history.checkpoint
    path = run.file(name) if name == checkpoint_name(done) else None
    if path is None or not path.is_file():
        raise RunDirError(f"{run.path}: {checkpoint_name(done)}, the checkpoint of epoch "
                          f"{done}, is missing; start over with --force")
    if load_checkpoint(path, training.model, training.optimizer) != done:
        raise RunDirError(f"{path} does not hold epoch {done} as history.json says; start "
                          "over with --force")
    training.optimizer.learning_rate.assign(history.learning_rate)
    if not run.file(MODEL_FILE).is_file():  # _check_best_model: this is the best epoch
        training.save_model(done)
        log.info(f"{run.file(MODEL_FILE)} was missing: saved again from {path}")


def _load_vocab(run: RunDir) -> Vocabulary:
    path = run.file(VOCAB_FILE)
    if not path.is_file():
        raise RunDirError(f"{path} is missing: the run cannot go on without its vocabulary; "
                          "restore it or start over with --force")
    return Vocabulary.load(path)


def _resume_source(given: Path | None, stored: str | None, stored_sha: str | None,
                   errors: str, run: RunDir, what: str) -> _Source | None:
    """The corpus (``what`` = "CORPUS") or validation text (``"--valid"``) a run is resumed
    with: the stored one, which ``given`` must match; its sentences must hash as stored."""
    verb = "trained" if what == "CORPUS" else "validated"
    if stored is None:
        if given is not None:
            raise InvalidArgumentError(f"{run.path} was {verb} without {what}; resume without "
                                       "it or start a new run")
        return None
    if given is None:
        if stored == STDIN_CORPUS:
            raise InvalidArgumentError(f"{run.path} was {verb} on standard input; resume with "
                                       f"{what} - and the same text piped in")
        given = Path(stored)
    elif (STDIN_CORPUS if str(given) == STDIN else str(given.resolve())) != stored:
        shown = "standard input" if stored == STDIN_CORPUS else stored
        raise InvalidArgumentError(f"{run.path} was {verb} on {shown}, not {given}; resume "
                                   f"with the same {what} or start a new run")
    source = _read_source(given, errors)
    if source.sha256 != stored_sha:
        name = "standard input" if str(given) == STDIN else str(given)
        raise InvalidArgumentError(f"{name} is not the text {run.path} was {verb} on (its "
                                   "sentences hash differently); resume with the same text or "
                                   "start a new run")
    return source
