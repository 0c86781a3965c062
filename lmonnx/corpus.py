"""Reading text: one sentence per non-empty line, decoded, cleaned and numbered the same way
for every entry point (a file, stdin, an iterable of lines, one sentence given to the API).

Lines are read in binary and decoded one by one, so a multi-GB corpus streams and an
undecodable byte is reported with its line number instead of a traceback from deep inside a
text decoder.  Strict UTF-8 by default; ``errors="replace"`` substitutes U+FFFD.

Every line, whatever its entry point, goes through :func:`to_line`: its UTF-8 bytes lose the
line break and a leading byte-order mark, are decoded, and the text is stripped of surrounding
whitespace.  A BOM is not text: a file written by a Windows editor, the same bytes piped into
``lmonnx score``, and the same line handed to ``Scorer.score`` all give one sentence.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple
from lmonnx.errors import ArgumentTypeError, CorpusError

ERRORS = ("strict", "replace")
STDIN = "-"
_BOM_BYTES = "\ufeff".encode("utf-8")




class Line(NamedTuple):
    """One sentence as read: ``key`` (1-based line number, blank lines counted), ``text``
    (cleaned), ``nbytes`` (its original UTF-8 bytes, BOM excluded, surrounding spaces
    included, plus one for the line break that ``</s>`` predicts: what bits per byte divides
    by)."""

    key: object
    text: str
    nbytes: int


def check_errors(errors: str) -> str:
    if errors not in ERRORS:
        raise CorpusError(f"errors must be one of {ERRORS}, got {errors!r}")
    return errors


def decode_line(raw: bytes, errors: str, where: str) -> str:
    """UTF-8 ``raw`` as text; :class:`CorpusError` naming ``where`` (``file:line``) if it is
    not valid UTF-8 and ``errors`` is strict."""
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 1]
        raise CorpusError(
            f"{where}: not valid UTF-8 (byte 0x{bad.hex()} at byte {exc.start + 1} of the "
            "line); pass --errors replace (errors=\"replace\" in Python) to substitute U+FFFD"
        ) from None


def _line_bytes(raw: bytes) -> bytes:
    raw = raw.rstrip(b"\r\n")
    while raw.startswith(_BOM_BYTES):
        raw = raw[len(_BOM_BYTES):]
    return raw


def as_bytes(line) -> bytes:
    """A line given as ``str`` or ``bytes`` as its UTF-8 bytes.  A ``str`` that Python decoded
    with ``surrogateescape`` (stdin under a C locale) gets its original bytes back, so that
    ``errors`` decides about them as it does for a file."""
    if isinstance(line, (bytes, bytearray, memoryview)):
        return bytes(line)
    if isinstance(line, str):
        return line.encode("utf-8", "surrogateescape")
    raise ArgumentTypeError(f"a line must be str or bytes, got {type(line).__name__}")


def to_line(key, line, errors: str = "strict", where: str = "<sentence>") -> Line:
    """One line (``str`` or ``bytes``, line break optional) as a :class:`Line`: the one path
    from raw text to a sentence for files, stdin, ``Scorer.evaluate`` and ``Scorer.score``.
    ``text`` may be empty (a blank line; ``Scorer.score`` scores it as ``</s>``)."""
    raw = _line_bytes(as_bytes(line))
    return Line(key, decode_line(raw, errors, where).strip(), len(raw) + 1)


def sentences_of_lines(lines: Iterable, errors: str = "strict",
                       source: str = "<lines>") -> Iterator[Line]:
    """:class:`Line` for every non-empty line of ``lines`` (``str`` or ``bytes`` items),
    numbered from 1 with blank lines counted.  Errors name ``source:line``."""
    check_errors(errors)
    if isinstance(lines, (str, bytes)):
        raise ArgumentTypeError(f"expected an iterable of lines, got one {type(lines).__name__}; "
                        "wrap a single sentence in a list")
    for lineno, line in enumerate(lines, start=1):
        item = to_line(lineno, line, errors, f"{source}:{lineno}")
        if item.text:
            yield item


def _check(path, errors: str) -> Path | None:
    """The path to open, or None for stdin; errors for missing paths and directories."""
    check_errors(errors)
    if str(path) == STDIN:
        return None
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except OSError as exc:
        raise CorpusError(f"{path}: {exc.strerror or exc}") from None
    if os.path.isdir(path):
        raise CorpusError(f"{path}: is a directory, not a text file")
    return path


def _lines(path: Path | None, errors: str) -> Iterator[Line]:
    name = "<stdin>" if path is None else str(path)
    try:  # a read can fail too (EIO from a device, a vanished mount): name the file
        if path is None:
            yield from sentences_of_lines(sys.stdin.buffer, errors, name)
            return
        with open(path, "rb") as f:
            yield from sentences_of_lines(f, errors, name)
    except OSError as exc:
        raise CorpusError(f"{name}: cannot read it: {exc.strerror or exc}") from None


def check_corpora(paths, errors: str = "strict") -> None:
    """Check corpus paths before any work: stdin (``-``) named at most once, every path an
    existing file, not a directory; :class:`CorpusError` naming the first bad one."""
    if [str(p) for p in paths].count(STDIN) > 1:
        raise CorpusError("stdin (-) can be read only once; name it once")
    for path in paths:
        _check(path, errors)


def read_sentences(path, errors: str = "strict") -> Iterator[Line]:
    """Stream a :class:`Line` for every non-empty line of the file ``path`` (``"-"``: stdin).

    A missing path, a directory or an unknown ``errors`` raise :class:`CorpusError` at the
    call; undecodable bytes raise it (with the line number) when iteration reaches them.
    """
    return _lines(_check(path, errors), errors)


def require_sentences(path, errors: str = "strict") -> Iterator[Line]:
    """Like :func:`read_sentences`, but raise :class:`CorpusError` when there is no sentence."""
    checked = _check(path, errors)

    def gen():
        empty = True
        for item in _lines(checked, errors):
            empty = False
            yield item
        if empty:
            raise CorpusError(f"{path}: no sentences (the input is empty or blank)")

    return gen()
