"""The run directory that ``lmonnx train`` writes and ``lmonnx export`` reads (no TensorFlow).

The counterpart of ``artifact.py`` for training: file names, the ``config.json`` and
``history.json`` schema, checkpoint names, which files a run owns, and the short training
record that export puts into the model's metadata::

    lmonnx-run.json      the manifest: written first, lists every file this run created
    config.json          format, model shape, tokenizer, training settings, corpora
    vocab.json           the vocabulary with its tokenizer options
    model.keras          the best epoch by validation perplexity (by training loss without
                         --valid); its Keras config records that epoch (``model_epoch``)
    history.json         one record per finished epoch, best epoch, checkpoint pointer, status
    checkpoint-N.npz     model + optimizer state after epoch N (for --resume; only the newest)
    training_curve.png   train and validation perplexity per epoch, the learning rate

**history.json.**  ``{"status": "running" | "complete", "epochs": [record, ...], "best_epoch",
"checkpoint", "learning_rate", "stopped_early"}``: ``learning_rate`` is the rate the next epoch
trains with (after any decay on a plateau), ``stopped_early`` whether ``--patience`` ran out
(the run is then ``complete``, and extending it trains nothing).  A record holds ``epoch``, ``train_loss``
(mean NLL per token), ``train_perplexity``, ``train_tokens``, ``train_seconds``,
``tokens_per_second``, ``learning_rate`` (the rate the epoch trained with),
``epochs_without_improvement`` (0 for a new best) and, with a validation set, ``valid_nll``,
``valid_tokens``, ``valid_perplexity``, ``valid_seconds`` (null without one).  :class:`EpochRecord`
and :class:`History` are these documents; a file lacking a key is refused ("re-train").

**What a run owns.**  A run names a file in its manifest *before* it creates it and drops the
name *after* deleting it, each time rewriting the manifest atomically, so the manifest always
covers the run's files (a name whose file is gone is harmless).  ``train --force`` deletes only
the regular files the manifest lists; anything else in the directory is left alone.  A file that
carries one of the names above but that no run owns (a user's own ``config.json``, say) is never
overwritten or deleted: the command stops and names it, with or without ``--force``.

**Order of writes.**  After epoch N: ``checkpoint-N.npz``, then ``model.keras`` when N is the
best so far, then ``history.json`` naming the checkpoint, then the older checkpoint is deleted
(only while ``model.keras`` is on disk).  A run stopped between the model and the history is
recorded by export as what is on disk: :func:`training_record` takes the model's own epoch.

**Strict JSON.**  ``config.json``, ``history.json`` and the manifest are written with
``allow_nan=False``: a perplexity too large for a float64 is stored as ``null`` (the NLL sums
it comes from are finite and kept), and a non-finite loss stops training before it is written.

**Corpora.**  ``config.json`` records each corpus as its absolute path, or ``"<stdin>"``
(:data:`STDIN_CORPUS`) for text piped in as ``-``, with the SHA-256 of its sentences: resuming
needs the same text again (a file with the same sentences, or the same text piped in again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmonnx.errors import InvalidArgumentError, RunDirError
from lmonnx.atomic import write_atomic
from lmonnx.metrics import finite_or_none

RUN_FORMAT = "lmonnx-run/1"
MANIFEST_FILE = "lmonnx-run.json"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"
FIXED_FILES = (CONFIG_FILE, VOCAB_FILE, MODEL_FILE, HISTORY_FILE, CURVE_FILE)
"""Files with a fixed name in a run directory (the manifest aside)."""
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_SUFFIX = ".npz"
_CHECKPOINT_RE = re.compile(r"checkpoint-([0-9]+)\.npz\Z")

STDIN = "-"
STDIN_CORPUS = "<stdin>"
"""How ``config.json`` records a corpus that was read from standard input."""

TRAINING_RECORD_SETTINGS = ("recipe", "epochs", "batch_size", "optimizer", "learning_rate",
                            "clipnorm", "dropout", "seed", "pack", "lr_decay", "lr_patience",
                            "patience", "holdout", "max_minutes")

__all__ = ["RUN_FORMAT", "MANIFEST_FILE", "CONFIG_FILE", "VOCAB_FILE", "MODEL_FILE",
           "HISTORY_FILE", "CURVE_FILE", "FIXED_FILES", "STDIN_CORPUS", "RunDirError", "RunDir",
           "checkpoint_name", "checkpoint_epoch", "is_run_file_name", "finite_or_none",
           "dumps_json", "write_json", "read_json", "sentences_sha256", "training_record",
           "load_run_config", "EpochRecord", "History"]


# ---- names -----------------------------------------------------------------------------------

def checkpoint_name(epoch: int) -> str:
    """``checkpoint-<epoch>.npz``."""
    return f"{CHECKPOINT_PREFIX}{int(epoch)}{CHECKPOINT_SUFFIX}"


def checkpoint_epoch(name: str) -> int | None:
    """The epoch of a checkpoint file name, None for any other name."""
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def is_run_file_name(name: str) -> bool:
    """Whether a run may create a file of this name (the manifest included)."""
    return name == MANIFEST_FILE or name in FIXED_FILES or checkpoint_epoch(name) is not None


# ---- strict JSON -----------------------------------------------------------------------------

def dumps_json(payload) -> str:
    """Indented strict JSON (``ValueError`` for a NaN or an infinity), newline-terminated."""
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def write_json(path, payload) -> None:
    """Write ``payload`` to ``path`` as strict JSON, atomically."""
    write_atomic(path, dumps_json(payload))


def _reject_constant(name: str):
    raise InvalidArgumentError(f"{name} is not JSON")


def read_json(path):
    """Strict JSON from ``path``; ``RunDirError`` naming it when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{path} is not valid JSON ({first}); the run directory is damaged") \
            from None


def sentences_sha256(texts: Iterable[str]) -> str:
    """SHA-256 (hex) of the sentences as trained on, one per line: what ``--resume`` compares
    (blank lines, a BOM, line endings and surrounding spaces do not change it)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


# ---- history.json -----------------------------------------------------------------------------

@dataclass
class EpochRecord:
    """One finished epoch as ``history.json`` stores it (losses in nats per token)."""

    epoch: int
    train_loss: float
    train_perplexity: float | None
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    learning_rate: float
    valid_nll: float | None = None
    valid_tokens: int | None = None
    valid_perplexity: float | None = None
    valid_seconds: float | None = None
    epochs_without_improvement: int = 0

    @property
    def selection_loss(self) -> float:
        """What picks the best epoch: mean validation NLL per token (the log of the validation
        perplexity, finite even where the perplexity overflows), else the training loss."""
        if self.valid_tokens:
            return self.valid_nll / self.valid_tokens
        return self.train_loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, path) -> "EpochRecord":
        return cls(**_fields_of(cls, d, path))


@dataclass
class History:
    """``history.json``: the epoch records, the best epoch, the newest checkpoint's name, the
    learning rate of the next epoch, whether patience ran out, and the run's status."""

    learning_rate: float
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    checkpoint: str | None = None
    stopped_early: bool = False
    status: str = "running"

    @property
    def best(self) -> EpochRecord | None:
        return self.epochs[self.best_epoch - 1] if self.best_epoch else None

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), epochs=[r.to_dict() for r in self.epochs])

    @classmethod
    def from_dict(cls, d, path) -> "History":
        values = _fields_of(cls, d, path)
        epochs = values["epochs"]
        if not isinstance(epochs, list) or not (values["best_epoch"] is None
                                                or 1 <= values["best_epoch"] <= len(epochs)):
            raise RunDirError(f"{path} is not an lmonnx training history; the run directory "
                              "is damaged")
        values["epochs"] = [EpochRecord.from_dict(r, path) for r in epochs]
        return cls(**values)


def _fields_of(cls, d, path) -> dict[str, Any]:
    """``d``'s values of ``cls``'s fields; ``RunDirError`` when it is not a dict holding
    exactly those (a file from another version of lmonnx, or damaged)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(d, dict) or set(d) != set(names):
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise RunDirError(f"{path} is not an lmonnx training history of this version (expected "
                          f"the keys {', '.join(names)}; got {got}); re-train")
    return {n: d[n] for n in names}


# ---- the training record ---------------------------------------------------------------------

def _corpus_name(recorded: str | None) -> str | None:
    if not recorded:
        return None
    return recorded if recorded == STDIN_CORPUS else Path(recorded).name


def training_record(config: dict, history: History | None,
                    model_epoch: int | None = None) -> dict:
    """The short record export stores in the model's ``lmonnx.training`` metadata: corpus file
    names (not paths), the main settings, epochs trained and the saved model's epoch with its
    numbers.  ``model_epoch`` (the epoch ``model.keras`` holds, :meth:`RunDir.model_epoch`)
    wins over ``history``: a run stopped between saving the model and its history is
    recorded as what is on disk."""
    record: dict[str, Any] = {"corpus": _corpus_name(config.get("corpus")),
                              "valid": _corpus_name(config.get("valid"))}
    train = config.get("train") or {}
    record.update({k: train[k] for k in TRAINING_RECORD_SETTINGS if k in train})
    epochs = history.epochs if history else []
    best = model_epoch if model_epoch is not None else (history.best_epoch if history else None)
    record["epochs_trained"] = max(len(epochs), best or 0)
    if history and history.stopped_early:
        record["stopped_early"] = True
    if best:
        b = epochs[best - 1] if best <= len(epochs) else None
        record.update(best_epoch=best, train_loss=b and b.train_loss,
                      valid_perplexity=b and b.valid_perplexity,
                      valid_tokens=b and b.valid_tokens)
    return record


# ---- the directory ---------------------------------------------------------------------------

def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _not_a_run(run_dir: Path, why: str) -> RunDirError:
    return RunDirError(f"{run_dir} is not an lmonnx run directory ({why}); "
                       "create one with `lmonnx train CORPUS --out DIR`")


def load_run_config(run_dir) -> dict:
    """``config.json`` of a run directory; ``RunDirError`` when ``run_dir`` is not a run."""
    return RunDir(run_dir).read_config()


class RunDir:
    """A run directory: its files by name, what it owns, its config and history.

    Nothing is written by the constructor or by the ``check_*`` methods.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._manifest: list[str] | None = None  # cached once this process writes it

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- ownership -------------------------------------------------------------------------

    def read_manifest(self) -> list[str] | None:
        """The names the manifest lists, or None when there is no manifest."""
        path = self.file(MANIFEST_FILE)
        if not _lexists(path):
            return None
        if not _is_regular(path):
            raise self._unowned(MANIFEST_FILE)
        doc = read_json(path)
        files = doc.get("files") if isinstance(doc, dict) else None
        if (not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT
                or not isinstance(files, list)
                or not all(isinstance(n, str) and is_run_file_name(n) for n in files)):
            raise RunDirError(f"{path} is not an lmonnx run manifest (format {RUN_FORMAT!r}); "
                              "not touching the directory: move the file or choose another --out")
        return list(files)

    def owned(self) -> list[str]:
        """The names this directory's run owns (its manifest's list; none without one)."""
        if not self.path.is_dir():
            return []
        return self.read_manifest() or []

    def _unowned(self, name: str) -> RunDirError:
        return RunDirError(
            f"{self.file(name)} exists but no lmonnx run in {self.path} owns it (no "
            f"{MANIFEST_FILE} lists it); lmonnx never overwrites or deletes it, with or "
            "without --force: move it away or choose another --out")

    def _check_names(self, owned: list[str]) -> None:
        """Every entry with one of our names must be an owned regular file."""
        owned_set = set(owned)
        for name in sorted(os.listdir(self.path)):
            if not is_run_file_name(name) or name == MANIFEST_FILE:
                continue
            if name not in owned_set or not _is_regular(self.file(name)):
                raise self._unowned(name)

    def check_new(self, force: bool) -> list[str]:
        """Check that a new run may start here; return the files ``--force`` will remove.

        Refuses (``RunDirError``) a path that is not a directory, a directory with files of our
        names that no run owns (whatever ``force`` says), and an existing run without ``force``.
        """
        if _lexists(self.path) and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a directory")
        if not self.path.is_dir():
            return []
        owned = self.owned()
        self._check_names(owned)
        present = [n for n in owned if _is_regular(self.file(n))]
        if present and not force:
            raise RunDirError(f"{self.path} already holds a training run; pass --resume to "
                              "continue it or --force to start over")
        return present

    def start_new(self, force: bool) -> None:
        """Make the directory ready for a new run: check again, delete the previous run's own
        files (``force``), then write a fresh, empty manifest."""
        remove = self.check_new(force)
        for name in remove:
            try:
                os.unlink(self.file(name))
            except FileNotFoundError:
                pass
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest([])

    def check_resume(self) -> None:
        """Check that there is a run to resume here (changes nothing)."""
        if _lexists(self.path) and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a directory")
        owned = self.owned()
        missing = [n for n in (CONFIG_FILE, HISTORY_FILE) if n not in owned]
        if missing:
            raise RunDirError(f"nothing to resume in {self.path}: no {' and '.join(missing)} "
                              "of a run there; drop --resume to start a new run")
        self._check_names(owned)

    def _write_manifest(self, files: list[str]) -> None:
        self._manifest = list(dict.fromkeys(files))
        write_json(self.file(MANIFEST_FILE), {
            "format": RUN_FORMAT,
            "note": "files that `lmonnx train` created here; `--force` deletes only these",
            "files": self._manifest,
        })

    def claim(self, name: str) -> Path:
        """List ``name`` in the manifest (before the file is created); returns its path."""
        if not is_run_file_name(name) or name == MANIFEST_FILE:
            raise InvalidArgumentError(f"{name!r} is not a run file name")
        files = self._manifest if self._manifest is not None else (self.read_manifest() or [])
        if name not in files:
            self._write_manifest([*files, name])
        return self.file(name)

    def release(self, name: str) -> None:
        """Delete an owned file, then drop it from the manifest."""
        try:
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass
        files = self._manifest if self._manifest is not None else (self.read_manifest() or [])
        if name in files:
            self._write_manifest([n for n in files if n != name])

    def input_files(self) -> list[Path]:
        """Every path of this directory that a command reading the run treats as an input:
        the manifest, the fixed names and the run's checkpoints (present or not)."""
        names = [MANIFEST_FILE, *FIXED_FILES]
        try:
            names += [n for n in os.listdir(self.path) if checkpoint_epoch(n) is not None]
            names += self.owned()
        except (OSError, RunDirError):
            pass
        return [self.file(n) for n in dict.fromkeys(names)]

    # ---- config and history ----------------------------------------------------------------

    def read_config(self) -> dict:
        """``config.json``; ``RunDirError`` when this directory is not a run."""
        if not self.path.is_dir():
            raise _not_a_run(self.path, "no such directory")
        path = self.file(CONFIG_FILE)
        if not path.is_file():
            raise _not_a_run(self.path, f"no {CONFIG_FILE}")
        config = read_json(path)
        if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
            raise RunDirError(f"{path} is not an lmonnx run config (format {RUN_FORMAT!r} "
                              "expected)")
        return config

    def write_config(self, config: dict) -> None:
        write_json(self.claim(CONFIG_FILE), config)

    def read_history(self) -> History | None:
        """``history.json``, or None when the run has none yet."""
        path = self.file(HISTORY_FILE)
        if not path.is_file():
            return None
        return History.from_dict(read_json(path), path)

    def write_history(self, history: History) -> None:
        write_json(self.claim(HISTORY_FILE), history.to_dict())

    def model_epoch(self) -> int | None:
        """The epoch whose weights ``model.keras`` holds (stored in its Keras config by the
        trainer), or None when there is no such file or it does not say."""
        try:
            with zipfile.ZipFile(self.file(MODEL_FILE)) as archive:
                doc = json.loads(archive.read("config.json"))
            epoch = doc["config"]["epoch"]
        except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
            return None
        return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None

    def training_record(self, config: dict | None = None) -> dict:
        """:func:`training_record` of this run (``config`` read when not given)."""
        return training_record(config if config is not None else self.read_config(),
                               self.read_history(), self.model_epoch())

    def require_model(self) -> None:
        """``RunDirError`` unless this is a run with a saved model and vocabulary."""
        self.read_config()
        for name in (VOCAB_FILE, MODEL_FILE):
            if not self.file(name).is_file():
                raise RunDirError(f"{self.path} is not a finished lmonnx run (no {name}; "
                                  "training saves it after the first epoch)")
