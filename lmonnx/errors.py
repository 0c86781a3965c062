"""Every exception lmonnx raises on purpose, in one hierarchy.

``LmonnxError`` is what the CLI turns into one line on stderr and a non-zero exit; anything
else that escapes (a ``ValueError`` from deep inside NumPy, a ``KeyError``) is a bug in lmonnx
and keeps its traceback so that it gets reported.  The API promise still holds: a bad argument
is a ``ValueError`` or a ``TypeError`` (the classes below inherit from both families), so
``except ValueError`` in a user's code catches what it always did.

No imports beyond the standard library: the CLI catches these without loading onnxruntime or
TensorFlow for commands that never run a model.

    LmonnxError
    ├── InvalidArgumentError (ValueError)    a value out of range, an unknown choice
    ├── ArgumentTypeError (TypeError)        a value of the wrong type
    ├── CorpusError (ValueError)             text that cannot be read
    ├── ArtifactError (ValueError)           not a usable lmonnx .onnx
    ├── RunDirError (ValueError)             a run directory that cannot be used as asked
    ├── OutputError (ValueError)             an output that would clobber an input or itself
    ├── TrainingError (ValueError)           training diverged
    ├── ExportError (ValueError)             the converted model failed its checks
    ├── QuantizationError (ValueError)       int8 cost more than allowed
    ├── PathNotFoundError (FileNotFoundError)   a model or an output's directory is missing
    ├── PathIsDirectoryError (IsADirectoryError) a directory where a file belongs
    ├── PathExistsError (FileExistsError)    an output exists and --force was not given
    ├── OutputWriteError (OSError)           an output cannot be written (named, not a temp file)
    ├── ProviderError (RuntimeError)         CUDA asked for and unusable
    ├── InferenceError (RuntimeError)        onnxruntime failed on a batch
    └── MissingDependencyError (ImportError) an optional extra is not installed
"""

from __future__ import annotations


class LmonnxError(Exception):
    """Base of every error lmonnx raises for its users: the message is one line, fit for the
    CLI, and names the file, flag or argument at fault."""


class InvalidArgumentError(LmonnxError, ValueError):
    """An argument's value is out of range or not one of its choices."""


class ArgumentTypeError(LmonnxError, TypeError):
    """An argument has the wrong type."""


class CorpusError(LmonnxError, ValueError):
    """Text that cannot be read (missing, a directory, undecodable, empty)."""


class ArtifactError(LmonnxError, ValueError):
    """The file is not a usable lmonnx model (foreign, truncated, damaged, or from a newer
    version)."""


class RunDirError(LmonnxError, ValueError):
    """A run directory that cannot be used as asked."""


class OutputError(LmonnxError, ValueError):
    """An output that names one of the command's inputs, or another output."""


class TrainingError(LmonnxError, ValueError):
    """Training cannot go on (the loss diverged)."""


class ExportError(LmonnxError, ValueError):
    """The converted model does not match TensorFlow, or its graph is not the expected one."""


class QuantizationError(LmonnxError, ValueError):
    """The int8 model costs more perplexity than allowed."""


class PathNotFoundError(LmonnxError, FileNotFoundError):
    """A path the command needs does not exist (a model, an output's directory)."""


class PathIsDirectoryError(LmonnxError, IsADirectoryError):
    """A directory where a file belongs."""


class PathExistsError(LmonnxError, FileExistsError):
    """An output exists and overwriting it was not asked for (``--force``)."""


class OutputWriteError(LmonnxError, OSError):
    """An output could not be written; the message names the user's path."""


class ProviderError(LmonnxError, RuntimeError):
    """``providers="cuda"`` was asked for and CUDA cannot be used here."""


class InferenceError(LmonnxError, RuntimeError):
    """onnxruntime failed while running the model (out of memory on a huge batch, say)."""


class MissingDependencyError(LmonnxError, ImportError):
    """An optional extra (onnxruntime, TensorFlow, onnx, Ray) is not installed; the message
    says which ``pip install 'lmonnx[...]'`` brings it."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none): what a
    one-line error quotes from a foreign library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


__all__ = ["LmonnxError", "InvalidArgumentError", "ArgumentTypeError", "CorpusError",
           "ArtifactError", "RunDirError", "OutputError", "TrainingError", "ExportError",
           "QuantizationError", "PathNotFoundError", "PathIsDirectoryError", "PathExistsError",
           "OutputWriteError", "ProviderError", "InferenceError", "MissingDependencyError",
           "first_line"]
