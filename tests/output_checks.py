"""Shared checks of the one output policy for the commands that write a model (export,
quantize): a FIFO's reader gets the bytes, ``-o /dev/stdout`` writes through the descriptor."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


def bytes_through_fifo(fifo: Path, write) -> bytes:
    """Make ``fifo``, call ``write()`` while a thread reads it, and return what it read; fail
    when the FIFO was replaced (its reader then waits for ever on the old one)."""
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        write()
    finally:
        _let_the_reader_go(fifo, reader)
    assert fifo.is_fifo() and not reader.is_alive()
    return received[0]


def _let_the_reader_go(fifo: Path, reader: threading.Thread, timeout_s: float = 30.0) -> None:
    """Wait for ``reader`` to finish, opening and closing ``fifo`` for writing meanwhile so
    that a reader still blocked in open() (``write`` failed before opening it) sees end of
    file.  Non-blocking: a plain open() waits for a reader, and hung CI for ever when the
    reader was still draining the last bytes and then closed without opening again."""
    deadline = time.monotonic() + timeout_s
    while reader.is_alive() and time.monotonic() < deadline:
        if fifo.is_fifo():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader has it open (yet, or any more)
                pass
        reader.join(timeout=0.05)


def run_to_dev_stdout(args: list, tmp_path: Path) -> tuple[bytes, bytes]:
    """``python -m lmonnx *args`` with stdout a file: (that file's bytes, stderr).  Fails,
    putting the machine's link back, when the command replaced the /dev/stdout link."""
    out = tmp_path / "stdout.bin"
    with open(out, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "lmonnx", *map(str, args)], stdout=stdout,
                              stderr=subprocess.PIPE, env=os.environ.copy(), timeout=600)
    if not os.path.islink("/dev/stdout"):  # the bug, run as root
        os.unlink("/dev/stdout")
        os.symlink("/proc/self/fd/1", "/dev/stdout")
        pytest.fail("-o /dev/stdout replaced the /dev/stdout link with a file")
    assert done.returncode == 0, done.stderr
    return out.read_bytes(), done.stderr
