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
from lmonnx.validation import check_bool, check_choice, check_int, check_real
from lmonnx.vocab import PRESETS

SEED_MAX = 2**32 - 1
"""The largest seed NumPy's legacy generator (which ``keras.utils.set_random_seed`` seeds) takes."""

RESUMABLE = ("epochs", "learning_rate", "lr_decay", "patience", "clipnorm")
"""Settings a resumed run may change (applied from the next epoch on, recorded in config.json);
every other one decides the model, its data or its batches and must equal the run's."""


def _setting(default, flag: str, help: str, kind: str, **bounds):
    """A dataclass field carrying its CLI flag, help text and the range ``validate`` checks."""
    return field(default=default, metadata=dict(flag=flag, help=help, kind=kind, bounds=bounds))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (the flags of ``lmonnx train``; each field's
    metadata holds its flag, help and range).  ``embedding_dim`` None means
    ``int(vocab_size ** 0.25)``; ``pack`` False pads each random batch to its longest window."""

    tokenizer: str = _setting("keras", "--tokenizer", "tokenizer preset", "choice",
                              choices=PRESETS)
    vocab_size: int = _setting(10000, "--vocab-size", "vocabulary entries, the 4 special "
                               "tokens included", "int", low=5,
                               why="4 special tokens and at least one word")
    max_length: int = _setting(35, "--max-length", "longest training window; longer "
                               "sentences are cut into windows", "int", low=1)
    num_lstm_units: int = _setting(200, "--units", "LSTM units per layer", "int", low=1)
    num_lstm_layers: int = _setting(2, "--layers", "stacked LSTM layers", "int", low=1)
    dropout: float = _setting(0.0, "--dropout", "drop rate (not keep probability)", "real",
                              low=0.0, high=1.0, high_open=True, why="a drop rate")
    embedding_dim: int | None = _setting(None, "--embedding-dim", "embedding width "
                                         "(default: int(vocab_size ** 0.25), as in the course)",
                                         "int", low=1)
    epochs: int = _setting(5, "--epochs", "epochs in all; with --resume a larger number "
                           "extends a finished run", "int", low=1)
    batch_size: int = _setting(32, "--batch-size", "training windows per batch at most",
                               "int", low=1)
    learning_rate: float = _setting(1e-2, "--learning-rate", "Adam learning rate", "real",
                                    low=0.0, low_open=True)
    clipnorm: float = _setting(5.0, "--clipnorm", "clip the global gradient norm to this "
                               "(0: no clipping)", "real", low=0.0)
    seed: int = _setting(0, "--seed", "same seed, same data: same run", "int", low=0,
                         high=SEED_MAX)
    pack: bool = _setting(True, "--no-pack", "pad each random batch to its longest window "
                          "instead of packing its windows end to end in fewer rows (the same "
                          "windows per batch; packing is faster)", "bool")
    lr_decay: float = _setting(4.0, "--lr-decay", "divide the learning rate by this after an "
                               "epoch without improvement (1: constant rate)", "real", low=1.0)
    patience: int = _setting(0, "--patience", "stop after this many epochs in a row without "
                             "improvement (0: never)", "int", low=0)

    def validate(self) -> None:
        """``InvalidArgumentError`` / ``ArgumentTypeError`` naming the flag of the first
        setting out of range."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            bounds = dict(meta["bounds"])
            if meta["kind"] == "int" and not (value is None and f.default is None):
                check_int(meta["flag"], value, **bounds)
            elif meta["kind"] == "real":
                check_real(meta["flag"], value, **bounds)
            elif meta["kind"] == "choice":
                check_choice(meta["flag"], value, bounds["choices"])
            elif meta["kind"] == "bool":
                check_bool(f.name, value)

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
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            what = "lacks " + ", ".join(missing) if missing else "has unknown " + ", ".join(
                unknown)
            raise RunDirError(f"{path} {what}: it was written by another version of lmonnx; "
                              "re-train, or resume it with that version")
        return cls(**d)


def flag_of(name: str) -> str:
    """The CLI flag of a setting (``num_lstm_units`` -> ``--units``)."""
    return next(f.metadata["flag"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def _shown(name: str, value) -> str:
    return f"{name}={value}" if isinstance(value, bool) else f"{flag_of(name)} {value}"


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
