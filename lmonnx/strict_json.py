"""Strict JSON, as every lmonnx output writes it: ``lmonnx evaluate --json`` and its
per-sentence / per-token lines, the CLI's other commands, Ray's sinks and the HTTP server.

JSON has no spelling for NaN or the infinities (a model whose logits hold NaN, a diverged
model's perplexity): they are written as ``null``, never as Python's ``NaN`` tokens that
strict parsers refuse.
"""

from __future__ import annotations

import json
from typing import Iterator, Mapping

from lmonnx.metrics import finite_or_none


def json_text(value, **dumps_options) -> str:
    """``value`` as strict JSON (``json.dumps`` options pass through): NaN and infinities,
    which JSON has no spelling for, become ``null``.  The record is rebuilt only when it holds
    one (per-token output calls this for every token)."""
    try:
        return json.dumps(value, allow_nan=False, **dumps_options)
    except ValueError:
        return json.dumps(_finite_or_none(value), allow_nan=False, **dumps_options)


def json_pieces(value, items_per_piece: int = 4096) -> Iterator[str]:
    """:func:`json_text` of ``value`` in pieces that join to the same JSON: a list longer than
    ``items_per_piece`` is encoded a slice at a time.  ``json.dumps`` holds the GIL for a
    whole call (an echoed 600k-token answer: 0.85 s), so a worker thread that encodes a
    large answer this way lets the event loop run between pieces."""
    if isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield (", " if i else "") + json.dumps(str(key)) + ": "
            yield from json_pieces(item, items_per_piece)
        yield "}"
    elif isinstance(value, (list, tuple)) and len(value) > items_per_piece:
        yield "["
        for start in range(0, len(value), items_per_piece):
            yield (", " if start else "") + json_text(
                list(value[start:start + items_per_piece]))[1:-1]
        yield "]"
    else:
        yield json_text(value)


def json_line(record: Mapping) -> str:
    """``record`` as one line of strict JSON, non-ASCII text as is."""
    return json_text(record, ensure_ascii=False)


def _finite_or_none(value):
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


__all__ = ["json_text", "json_pieces", "json_line"]
