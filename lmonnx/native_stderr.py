"""Silencing what C and C++ libraries write straight to file descriptor 2.

TensorFlow's start-up lines (oneDNN, CUDA stubs, CPU features) and KenLM's loader (an ARPA
file's "faster if you build a binary file" and its progress bar) write to fd 2 from native
code, before any Python log level applies; lmonnx's one-line errors must not follow a screen
of them.  Python exceptions are unaffected: they are printed after the descriptor is restored.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

__all__ = ["native_stderr_silenced"]


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null while the block runs (process-wide: use it around
    loading, before any thread writes).  Where fd 2 cannot be duplicated (closed, or an
    embedded interpreter without one), nothing is redirected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
