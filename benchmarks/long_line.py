"""Peak memory and time of scoring one very long line (windows that carry the LSTM state).

    python benchmarks/long_line.py [--words 1000000] [--vocab 3000] [--units 200]

A random-weight format-2 model (2 layers, built without TensorFlow) scores one line of
``--words`` random words with the default budget (a batch's logits <= 64 MiB).  In one pass the
logits alone would take ``4 * words * vocab`` bytes; the script prints that figure beside the
measured peak resident memory of the process (VmHWM) and the NLL of a few-window check.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lmonnx import Scorer
from lmonnx._testing import build_random_lm, make_vocab


def peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--words", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--units", type=int, default=200)
    args = parser.parse_args(argv)
    words = [f"w{i}" for i in range(args.vocab - 4)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.onnx"
        build_random_lm(path, make_vocab(words), units=args.units, layers=2, seed=0)
        line = " ".join(np.random.default_rng(0).choice(words, size=args.words))
        scorer = Scorer(path, providers="cpu")
        before = peak_rss_mib()
        start = time.perf_counter()
        score = scorer.score([line])[0]
        seconds = time.perf_counter() - start
        peak = peak_rss_mib()
    one_pass_gib = 4 * (args.words + 1) * args.vocab / 2**30
    print(f"one line of {args.words:,} words, V={args.vocab}, 2x{args.units} LSTM: "
          f"{score.tokens:,} tokens in {seconds:.1f} s ({score.tokens / seconds:,.0f} tokens/s)")
    print(f"peak resident memory {peak:,.0f} MiB (process before scoring: {before:,.0f} MiB); "
          f"one pass would need {one_pass_gib:,.1f} GiB for the logits alone")


if __name__ == "__main__":
    main()
