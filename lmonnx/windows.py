"""The one windowed stepper: a sequence run a window of positions at a time, the recurrent
state carried from each window into the next.

Every path that meets a sentence longer than one call uses it: evaluation
(``evaluate.WindowedRow``, the rows ``score_batch`` cannot hold at once), the state after a
long history (``Incremental.state_after``), the server's prompt scoring (a window per turn of
its compute thread) and training's validation in TensorFlow.  It owns only the bookkeeping
(where the next window starts, the state, when it is done); what a window computes is the
caller's ``run``, so the same loop serves onnxruntime logits, the CUDA loss head and a
TensorFlow step::

    steps = CarriedWindows(len(ids), window)
    for part, logits in steps.run_all(lambda part, state: session.run(ids[None, part], state)):
        ...                    # part: the window's slice of positions
    steps.state                # the state after the last position

With a causal model the outputs of every position equal one pass over the whole sequence
(to float rounding), and memory holds one window's outputs, whatever the length.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from lmonnx.validation import check_int

Out = TypeVar("Out")
WindowRun = Callable[[slice, Any], "tuple[Out, Any]"]
"""``run(part, state) -> (output, state after the window)``; ``state`` None is the start."""


class CarriedWindows(Generic[Out]):
    """``length`` positions in consecutive windows of at most ``window``, the state carried.

    ``state``: the state before the first position (None: the model's zero state).  After
    each :meth:`step`, :attr:`state` is the state after that window's last position and
    :attr:`start` the next window's first position.
    """

    def __init__(self, length: int, window: int, state: Any = None):
        self.length = check_int("length", length, low=0)
        self.window = check_int("window", window)
        self.state = state
        self.start = 0

    @property
    def done(self) -> bool:
        """Every position has been run (at once for a sequence of no positions)."""
        return self.start >= self.length

    @property
    def windows(self) -> int:
        """How many windows the whole sequence takes."""
        return -(-self.length // self.window)

    def step(self, run: WindowRun) -> tuple[slice, Out]:
        """Run the next window: ``(its slice of positions, what run returned for it)``."""
        if self.done:
            raise RuntimeError(f"all {self.length} positions have been run")
        part = slice(self.start, min(self.start + self.window, self.length))
        out, self.state = run(part, self.state)
        self.start = part.stop
        return part, out

    def run_all(self, run: WindowRun) -> Iterator[tuple[slice, Out]]:
        """:meth:`step` until :attr:`done`, yielding each window's ``(slice, output)``."""
        while not self.done:
            yield self.step(run)


__all__ = ["CarriedWindows", "WindowRun"]
