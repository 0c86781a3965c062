"""The settings of a training run, their defaults, flags and ranges, in one place (no TensorFlow).

``lmonnx train --help`` reads its defaults from :class:`TrainConfig`'s fields, the CLI passes
only the flags a user gave (:func:`TrainConfig.with_overrides`), and ``--resume`` decides from
:data:`RESUMABLE` which given settings it applies and which it refuses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmonnx.errors import InvalidArgumentError, RunDirError
from lmonnx.factored import SOFTMAX_CHOICES
from lmonnx.validation import check_bool, check_choice, check_int, check_real
from lmonnx.vocab import PRESETS

RECIPES: dict[str, dict[str, Any]] = {
    # Zaremba et al. (2014) and pytorch's word_language_model, tied and with locked dropout:
    # chosen by measurement on KJV and PTB (README, Benchmarks, "Model quality against KenLM").
    "tied": dict(dropout=0.2, epochs=40, batch_size=20, clipnorm=0.25, optimizer="sgd",
                 patience=5),
    # The course's LanguageModel as it was taught (its slips fixed): today's model.
    "course": dict(dropout=0.0, epochs=5, batch_size=32, clipnorm=5.0, optimizer="adam",
                   patience=0),
}
"""Each recipe's value of every setting left None (``TrainConfig.resolved``)."""

OPTIMIZER_RATES = {"sgd": 20.0, "adam": 1e-2}
"""The learning rate of each optimizer when none is given: the tied recipe's SGD and the
course's Adam (so ``--optimizer adam`` alone never runs Adam at SGD's rate)."""

_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}

USUAL_RATES = {"sgd": (1.0, 40.0), "adam": (1e-4, 1e-2)}
"""The learning rates each optimizer is run at on these models (the loss a per-token mean),
its default (:data:`OPTIMIZER_RATES`) included: plain SGD from Zaremba et al.'s 1 to twice
the tied recipe's 20 (pytorch's word_language_model's); Adam from 1e-4 to the course
recipe's 1e-2 (Keras' own default, 1e-3, between).  A given rate outside its optimizer's
range is one line of warning (:meth:`TrainConfig.unusual_learning_rate`): SGD at Adam's 0.01
learns little (``make demo``'s training with ``--learning-rate 0.01``: validation perplexity
5.1x the true one after 10 epochs, 1.14x at the default 20), Adam at SGD's 20 diverges or
stalls."""

RECIPE_HELP = ("tied (the default): embedding = output layer (units wide), locked dropout on "
               "embeddings, between layers and before the output, the text as one stream "
               "carrying the LSTM state over windows of --max-length, SGD with plateau decay; "
               "course: the course's LanguageModel (V**0.25-wide embedding, separate output "
               "layer, Adam, random windows packed end to end)")

ADDED_SETTINGS = {"softmax": "full", "cutoffs": None, "tail_div": None, "tie_tails": False,
                  "lr_patience": 1}
"""Settings newer than some run directories, with the value that reproduces those runs."""

SEED_MAX = 2**32 - 1
"""The largest seed NumPy's legacy generator (which ``keras.utils.set_random_seed`` seeds) takes."""

RESUMABLE = ("epochs", "learning_rate", "lr_decay", "lr_patience", "patience", "clipnorm",
             "max_minutes")
"""Settings a resumed run may change (applied from the next epoch on, recorded in config.json);
every other one decides the model, its data or its batches and must equal the run's."""


def _setting(default, flag: str, help: str, kind: str, **bounds):
    """A dataclass field carrying its CLI flag, help text and the range ``validate`` checks."""
    return field(default=default, metadata=dict(flag=flag, help=help, kind=kind, bounds=bounds))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (the flags of ``lmonnx train``; each field's
    metadata holds its flag, help and range).  A setting left None takes its recipe's value
    (:data:`RECIPES`, :meth:`resolved`); ``embedding_dim`` None is ``num_lstm_units`` (tied)
    or ``int(vocab_size ** 0.25)`` (course); ``pack`` (course only) False pads each random
    batch to its longest window."""

    recipe: str = _setting("tied", "--recipe", RECIPE_HELP, "choice", choices=tuple(RECIPES))
    tokenizer: str = _setting("keras", "--tokenizer", "tokenizer preset", "choice",
                              choices=PRESETS)
    vocab_size: int = _setting(10000, "--vocab-size", "vocabulary entries, the 4 special "
                               "tokens included", "int", low=5,
                               why="4 special tokens and at least one word")
    max_length: int = _setting(35, "--max-length", "training window: the steps "
                               "backpropagated through (tied), the longest window a sentence "
                               "is cut into (course)", "int", low=1)
    num_lstm_units: int = _setting(200, "--units", "LSTM units per layer", "int", low=1)
    num_lstm_layers: int = _setting(2, "--layers", "stacked LSTM layers", "int", low=1)
    dropout: float | None = _setting(None, "--dropout", "drop rate (not keep probability)",
                                     "real", low=0.0, high=1.0, high_open=True,
                                     why="a drop rate")
    embedding_dim: int | None = _setting(None, "--embedding-dim", "embedding width (tied: "
                                         "--units; course: int(vocab_size ** 0.25))",
                                         "int", low=1)
    epochs: int | None = _setting(None, "--epochs", "epochs at most; with --resume a larger "
                                  "number extends a finished run", "int", low=1)
    batch_size: int | None = _setting(None, "--batch-size", "rows per batch: the stream's "
                                      "columns (tied), windows (course)", "int", low=1)
    optimizer: str | None = _setting(None, "--optimizer", "sgd or adam", "choice",
                                     choices=("sgd", "adam"))
    learning_rate: float | None = _setting(None, "--learning-rate", "the optimizer's rate "
                                           "(default: sgd 20.0, adam 0.01, whichever "
                                           "optimizer runs)", "real", low=0.0, low_open=True)
    clipnorm: float | None = _setting(None, "--clipnorm", "clip the global gradient norm to "
                                      "this (0: no clipping)", "real", low=0.0)
    seed: int = _setting(0, "--seed", "same seed, same data: same run", "int", low=0,
                         high=SEED_MAX)
    pack: bool = _setting(True, "--no-pack", "course recipe: pad each random batch to its "
                          "longest window instead of packing its windows end to end in fewer "
                          "rows (the same windows per batch; packing is faster)", "bool")
    lr_decay: float = _setting(4.0, "--lr-decay", "divide the learning rate by this after an "
                               "epoch without improvement (1: constant rate)", "real", low=1.0)
    lr_patience: int = _setting(1, "--lr-patience", "divide the learning rate after this many "
                                "epochs in a row without improvement (and again after as "
                                "many more)", "int", low=1)
    patience: int | None = _setting(None, "--patience", "stop after this many epochs in a row "
                                    "without improvement (0: never)", "int", low=0)
    holdout: float = _setting(0.0, "--holdout", "without --valid: this share of the training "
                              "sentences (under 0.5), drawn at random (by --seed), is held "
                              "out as the validation set (0: none)", "real", low=0.0, high=0.5,
                              high_open=True, why="a share of the corpus")
    max_minutes: float | None = _setting(None, "--max-minutes", "the whole run's training "
                                         "budget in minutes: no epoch starts that would end "
                                         "past it (timed by the faster of the last two), and "
                                         "the last one that fits runs at the rate divided by "
                                         "--lr-decay", "real", low=0.0, low_open=True)

    softmax: str = _setting("full", "--softmax", "tied recipe's output layer: full (logits "
                            "over every word) or adaptive (a head over the frequent words and "
                            "tail clusters computed only for their targets: exact, normalized "
                            "and several times cheaper for a large vocabulary)", "choice",
                            choices=SOFTMAX_CHOICES)
    cutoffs: tuple[int, ...] | None = _setting(None, "--cutoffs", "--softmax adaptive: the "
                                               "head's size and the clusters' boundaries, "
                                               "comma-separated ids (default: 2000,10000,50000,"
                                               "... below the vocabulary size)", "ints", low=5)
    tail_div: int | None = _setting(None, "--tail-div", "--softmax adaptive: tail cluster k "
                                    "is scored from a projection --units / DIV**(k+1) wide "
                                    "(default: 4, PyTorch's div_value; 1: as wide as the "
                                    "LSTM; not with --tie-tails)", "int", low=1)
    tie_tails: bool = _setting(False, "--tie-tails", "--softmax adaptive: score each tail "
                               "word with its embedding row, as the head does (tied), instead "
                               "of a projection and matrix of the tail's own (not with "
                               "--tail-div); a tail word then costs --units multiply-adds",
                               "bool")

    def validate(self) -> None:
        """``InvalidArgumentError`` / ``ArgumentTypeError`` naming the flag of the first
        setting out of range."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            bounds = dict(meta["bounds"])
            if value is None and f.default is None:
                continue  # the recipe's value
            if meta["kind"] == "int":
                check_int(meta["flag"], value, **bounds)
            elif meta["kind"] == "real":
                check_real(meta["flag"], value, **bounds)
            elif meta["kind"] == "choice":
                check_choice(meta["flag"], value, bounds["choices"])
            elif meta["kind"] == "bool":
                check_bool(f.name, value)
            elif meta["kind"] == "ints":
                for item in value:
                    check_int(meta["flag"], item, **bounds)

    def resolved(self) -> "TrainConfig":
        """This config with every None setting replaced by its recipe's value; a tied model
        whose embedding width is not ``num_lstm_units`` is an ``InvalidArgumentError``."""
        self.validate()
        values = {k: v for k, v in RECIPES[self.recipe].items() if getattr(self, k) is None}
        if self.learning_rate is None:
            values["learning_rate"] = OPTIMIZER_RATES[values.get("optimizer", self.optimizer)]
        if self.recipe == "tied":
            if self.embedding_dim not in (None, self.num_lstm_units):
                raise InvalidArgumentError(
                    f"--embedding-dim {self.embedding_dim}: the tied recipe's embedding is its "
                    f"output layer, --units ({self.num_lstm_units}) wide; drop the flag or use "
                    "--recipe course")
            if not self.pack:
                raise InvalidArgumentError("--no-pack: the tied recipe trains on one stream, "
                                           "with no padding to pack; it applies to --recipe "
                                           "course only")
            values["embedding_dim"] = self.num_lstm_units
        elif self.softmax != "full":
            raise InvalidArgumentError(f"--softmax {self.softmax}: the factored output is "
                                       "the tied recipe's; --recipe course has a full Dense "
                                       "output")
        if self.cutoffs is not None and self.softmax != "adaptive":
            raise InvalidArgumentError("--cutoffs splits the adaptive softmax's vocabulary: "
                                       "it needs --softmax adaptive")
        if self.tie_tails and self.tail_div is not None:
            raise InvalidArgumentError("--tail-div sets the width of untied tails; tied tails "
                                       "(--tie-tails) are --units wide: drop one of the two")
        if self.tail_div is not None and self.softmax != "adaptive":
            raise InvalidArgumentError("--tail-div sets the adaptive softmax's tail widths: "
                                       "it needs --softmax adaptive")
        if self.tie_tails and self.softmax != "adaptive":
            raise InvalidArgumentError("--tie-tails ties the adaptive softmax's tail clusters "
                                       "to the embedding: it needs --softmax adaptive")
        return dataclasses.replace(self, **values)

    def unusual_learning_rate(self) -> str | None:
        """One line naming the learning rate, how far it lies outside its optimizer's usual
        range (:data:`USUAL_RATES`) and what to do; None inside it.  For a resolved config."""
        rate, optimizer = self.learning_rate, self.optimizer
        low, high = USUAL_RATES[optimizer]
        if low <= rate <= high:
            return None
        below = rate < low
        factor = low / rate if below else rate / high
        times = f"{factor:.2g}x" if factor < 10 or factor >= 1e6 else f"{factor:,.0f}x"
        whose = (f"the {self.recipe} recipe's optimizer, {optimizer}"
                 if RECIPES[self.recipe]["optimizer"] == optimizer else f"--optimizer {optimizer}")
        effect = "so low a rate learns little" if below else "so high a rate diverges or stalls"
        other = next(o for o in USUAL_RATES if o != optimizer)
        other_low, other_high = USUAL_RATES[other]
        advice = (f"{rate:g} is a rate for --optimizer {other} ({other_low:g} to "
                  f"{other_high:g})" if other_low <= rate <= other_high else
                  f"drop --learning-rate for {optimizer}'s {OPTIMIZER_RATES[optimizer]:g}")
        return (f"--learning-rate {rate:g} is {times} {'below' if below else 'above'} the "
                f"usual range of {whose} ({low:g} to {high:g}, default "
                f"{OPTIMIZER_RATES[optimizer]:g}): {_OPTIMIZER_NAMES[optimizer]} at {effect}; "
                f"{advice}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        """This config with ``overrides`` (setting name -> value) applied; unknown names are
        an ``InvalidArgumentError``."""
        unknown = sorted(set(overrides) - set(self.to_dict()))
        if unknown:
            raise InvalidArgumentError(f"unknown training setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path) -> "TrainConfig":
        """The settings stored in the run's config.json at ``path``; ``RunDirError`` when one
        is missing or unknown (a run from another lmonnx version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {**ADDED_SETTINGS, **d}
        if d.get("cutoffs") is not None:
            d["cutoffs"] = tuple(d["cutoffs"])  # JSON gave a list
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            what = "lacks " + ", ".join(missing) if missing else "has unknown " + ", ".join(
                unknown)
            raise RunDirError(f"{path} {what}: it was written by another version of lmonnx; "
                              "re-train, or resume it with that version")
        return cls(**d)


def recipe_defaults(name: str) -> str:
    """``tied 0.25, course 5.0``: the recipes' values of setting ``name`` (for --help)."""
    return ", ".join(f"{recipe} {values[name]}" for recipe, values in RECIPES.items())


def flag_of(name: str) -> str:
    """The CLI flag of a setting (``num_lstm_units`` -> ``--units``)."""
    return next(f.metadata["flag"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def _shown(name: str, value) -> str:
    """How the command line says a setting: ``--units 7``; a switch given (``--no-pack``),
    or not (``no --no-pack``)."""
    if isinstance(value, bool):
        default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
        return flag_of(name) if value != default else f"no {flag_of(name)}"
    if value is None:  # the recipe's or the model's own choice: no flag was given
        return f"no {flag_of(name)}"
    return f"{flag_of(name)} {value}"


def resumed_config(stored: TrainConfig, given: Mapping[str, Any], run_path
                   ) -> tuple[TrainConfig, dict[str, tuple]]:
    """The config a run resumes with: ``stored`` with the resumable settings of ``given`` that
    differ from it applied; (config, {name: (old, new)} of what changed).  A fixed setting given
    with another value than the run's is a ``RunDirError`` (one line, naming the flag)."""
    changed = {k: (getattr(stored, k), v) for k, v in given.items()
               if getattr(stored, k) != v}
    fixed = [k for k in changed if k not in RESUMABLE]
    if fixed:
        k = fixed[0]
        old, new = changed[k]
        raise RunDirError(f"{_shown(k, new)}: the run in {run_path} was trained with "
                          f"{_shown(k, old)}, which a resumed run cannot change (only "
                          f"{', '.join(flag_of(r) for r in RESUMABLE)} can); drop the flag "
                          "or start a new run")
    return stored.with_overrides({k: new for k, (_, new) in changed.items()}), changed
