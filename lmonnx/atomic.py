"""Atomic file writes: a temp file in the target's directory, then a rename.

A reader never sees a half-written file, an interrupted write leaves the old file (or none)
and no temp file behind, and the result gets ordinary permissions (``mkstemp`` makes 0600).
Used for every file lmonnx writes: corpora, vocabularies, run files, models.  A user's output
that is not a regular file (a FIFO, ``/dev/stdout``, a process substitution) is written
directly instead (:func:`output_file`).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

from lmonnx.errors import (OutputError, OutputWriteError, PathExistsError,
                           PathIsDirectoryError, PathNotFoundError)


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


_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STANDARD = {"-": 1, "/dev/stdout": 1, "/dev/stderr": 2}


def descriptor_of(path) -> int | None:
    """The open file descriptor a user's output names, if it names one: ``-`` and
    ``/dev/stdout`` (1), ``/dev/stderr`` (2), ``/dev/fd/N`` and ``/proc/self/fd/N`` (N, e.g. a
    process substitution).  Written through the descriptor itself: re-opening ``/dev/stdout``
    would truncate the file a shell redirected it to (``>> log``), and renaming over it would
    replace that file."""
    text = str(path)
    if text in _STANDARD:
        return _STANDARD[text]
    match = _FD_PATH.match(os.path.abspath(text))
    return int(match.group(1)) if match else None


def same_file_identity(path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names (``-``: stdin), or None when it does not exist."""
    try:
        st = os.fstat(0) if str(path) == "-" else os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Mapping[str, object], inputs: Sequence = (), *, force: bool) -> None:
    """Refuse to clobber, before any work: the one output policy of every command and API.

    ``outputs`` maps a name for messages (a flag such as ``--per-token``, a parameter such as
    ``per_token``) to a path, or None when not asked for.  Refused: an output that is one of
    ``inputs`` (by identity: a symlink, a hard link or the file behind stdin count), two
    outputs naming one file, a directory, a missing parent directory and, without ``force``,
    an existing regular file.  Descriptors, FIFOs and terminals need no ``force``.
    """
    protected = {same_file_identity(p): str(p) for p in inputs}
    protected.pop(None, None)
    seen: dict = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        identity = same_file_identity(path)
        if identity in protected:
            raise OutputError(f"{flag} {path} is an input of this command "
                              f"({protected[identity]}); choose another file")
        fd = descriptor_of(path)
        key = ("fd", fd) if fd is not None else (identity or Path(path).resolve())
        if key in seen:
            raise OutputError(f"{seen[key]} and {flag} name the same file {path}")
        seen[key] = flag
        check_output(path, flag, force=force)


def check_output(path, flag: str, *, force: bool) -> None:
    """Up-front checks of a user's output path, before any work: ``flag`` names it in errors.

    A directory is refused; an existing regular file needs ``force``; a FIFO, a terminal or a
    process substitution (``>(cat)``, i.e. ``/dev/fd/N``) is written to directly and needs no
    ``force`` (writing into a pipe overwrites nothing).
    """
    if str(path) == "":
        raise OutputError(f"{flag} is empty; give a file name")
    fd = descriptor_of(path)
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            raise OutputError(f"{flag} {path}: file descriptor {fd} is not open") from None
        return
    path = Path(path)
    try:
        st = os.stat(path)  # follows symlinks: a link to a file is that file
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise PathNotFoundError(f"{flag} {path}: directory {parent} does not exist") from None
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise PathIsDirectoryError(f"{flag} {path} is a directory; give a file name")
    if st is not None and stat.S_ISREG(st.st_mode) and not force:
        raise PathExistsError(f"{flag} {path} exists; pass --force to overwrite it")
    if st is None or stat.S_ISREG(st.st_mode):
        _check_can_create_beside(path, flag)


def _check_can_create_beside(path: Path, flag: str) -> None:
    """Create and remove a temp file where :func:`output_file` will, so that an unwritable
    directory fails now, naming the user's path, not after the work (root ignores mode bits:
    only trying tells)."""
    parent = Path(os.path.realpath(path)).parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot create a file in {parent} "
                          f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


@contextmanager
def output_file(path, flag: str = "output", *, binary: bool = False) -> Iterator[IO]:
    """Open a user's output for writing: text (UTF-8), or bytes with ``binary``.

    A regular file (or a new name) is written atomically: a temp file beside it replaces it
    only when the ``with`` block succeeds, so a failed run leaves the old file.  A symlink is
    followed and its target replaced, never the link itself.  ``-``, ``/dev/stdout``,
    ``/dev/stderr`` and ``/dev/fd/N`` are written through that descriptor (see
    :func:`descriptor_of`); anything else that exists (a FIFO, a terminal) is opened and
    written directly: renaming over it would detach its reader.  Errors name ``path``, never
    the temp file.
    """
    mode, encoding = ("wb", None) if binary else ("w", "utf-8")
    fd = descriptor_of(path)
    if fd is not None:
        with os.fdopen(os.dup(fd), mode, encoding=encoding) as f:
            sys.stdout.flush()  # what was printed before goes first
            yield f
        return
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise PathIsDirectoryError(f"{flag} {path} is a directory; give a file name")
        with open(path, mode, encoding=encoding) as f:
            yield f
        return
    target = Path(os.path.realpath(path))
    try:
        with atomic_path(target) as tmp, open(tmp, mode, encoding=encoding) as f:
            yield f
    except OSError as exc:
        # Say which of the user's files failed, not the name of our temp file.
        if exc.filename and Path(exc.filename).name.startswith(f".{target.name}."):
            raise OutputWriteError(exc.errno,
                                   f"{flag} {path}: cannot write it ({exc.strerror})") from None
        raise


def is_parquet(path) -> bool:
    """Whether an output path names a Parquet file (``.parquet`` / ``.pq``, any case)."""
    return Path(path).suffix.lower() in (".parquet", ".pq")
