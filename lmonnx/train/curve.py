"""``training_curve.png``: train and validation perplexity per epoch, and the learning rate."""

from __future__ import annotations

import math
from pathlib import Path

from lmonnx.atomic import atomic_path
from lmonnx.rundir import EpochRecord


def plot_curve(path: Path, history: list[EpochRecord], stopped_early: bool = False) -> None:
    """Draw the curve of ``history`` into ``path`` (PNG, atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def floats(values):  # null (an overflowed perplexity) -> a gap in the curve
        return [math.nan if v is None else v for v in values]

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [r.epoch for r in history]
    lines = ax.plot(epochs, floats(r.train_perplexity for r in history), "o-",
                    label="train (dropout on)")
    if any(r.valid_tokens for r in history):
        lines += ax.plot(epochs, floats(r.valid_perplexity for r in history), "s-",
                         label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (exp mean NLL per token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    lr_ax = ax.twinx()
    lines += lr_ax.step(epochs, [r.learning_rate for r in history], "--", where="mid",
                        color="0.5", label="learning rate")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    if stopped_early:
        lines.append(ax.axvline(epochs[-1], color="r", alpha=0.4,
                                label=f"stopped early (epoch {epochs[-1]})"))
    ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
