"""Atomic file writes: a temp file in the target's directory, then a rename.

A reader never sees a half-written file, an interrupted write leaves the old file (or none)
and no temp file behind, and the result gets ordinary permissions (``mkstemp`` makes 0600).
Used for every file lmonnx writes: corpora, vocabularies, run files, models.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _new_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; on success it replaces ``path``.

    ``suffix`` is for writers that insist on one (Keras wants ``.keras``, savefig ``.png``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (str as UTF-8 with ``\\n`` line ends, or bytes) to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
