"""Reading text corpora: one sentence per non-empty line, streamed with constant memory.

The file is opened in binary and decoded line by line, so a multi-GB corpus streams and an
undecodable byte is reported with its line number instead of a traceback from deep inside a
text decoder. Strict UTF-8 by default; ``errors="replace"`` substitutes U+FFFD.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

ERRORS = ("strict", "replace")
_BOM = "\ufeff"


class CorpusError(ValueError):
    """A corpus that cannot be read; the message is one line, fit for the CLI."""


def _check(path, errors: str) -> Path:
    if errors not in ERRORS:
        raise CorpusError(f"errors must be one of {ERRORS}, got {errors!r}")
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


def _lines(path: Path, errors: str, with_bytes: bool = False) -> Iterator[tuple]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CorpusError(f"{path}: {exc.strerror or exc}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as exc:
                bad = raw[exc.start:exc.start + 1]
                raise CorpusError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{bad.hex()} at byte {exc.start + 1} "
                    f"of the line); pass --errors replace to substitute U+FFFD") from None
            if lineno == 1 and line.startswith(_BOM):
                line = line[1:]
            text = line.strip()
            if text and with_bytes:
                # the sentence's original bytes: surrounding spaces kept, one line break counted
                yield lineno, text, len(raw.rstrip(b"\r\n")) + 1
            elif text:
                yield lineno, text


def read_sentences(path, errors: str = "strict", *,
                   with_bytes: bool = False) -> Iterator[tuple]:
    """Stream ``(line number, stripped line)`` for every non-empty line of ``path``.

    With ``with_bytes``, ``(line number, stripped line, bytes)``: the line's original UTF-8
    bytes with its surrounding whitespace and one byte for its line break (what bits per byte
    divides by).

    Line numbers are 1-based and count blank lines, so they point into the file. A missing path,
    a directory or an unknown ``errors`` raise :class:`CorpusError` at the call; undecodable bytes
    raise it (with the line number) when iteration reaches them.
    """
    return _lines(_check(path, errors), errors, with_bytes)


def require_sentences(path, errors: str = "strict", *,
                      with_bytes: bool = False) -> Iterator[tuple]:
    """Like :func:`read_sentences`, but raise :class:`CorpusError` when the file has no sentence."""
    path = _check(path, errors)

    def gen():
        empty = True
        for item in _lines(path, errors, with_bytes):
            empty = False
            yield item
        if empty:
            raise CorpusError(f"{path}: no sentences (the file is empty or blank)")

    return gen()
