"""A beam search side by side: incremental ``step_batch`` vs re-scoring every prefix.

    python benchmarks/beam_table.py [--beams 8 64] [--steps 30] [--threads 2]

The model is a random-weight lmonnx format-2 model of the PTB medium-small shape (V = 10000,
2 x 200 LSTM), built without TensorFlow: the figures are runtime cost, not quality.  A real
beam search runs with ``step_batch`` (each step: the beam's next-word distributions from the
states, the best ``beam`` extensions kept, ONE onnxruntime call to advance them).  At chosen
steps the same hypotheses are then scored the way a decoder without state must: ``score`` on
every hypothesis's whole prefix.  Both are timed at the same step, best of ``--repeat``,
interleaved.  Also: ``Scorer.step`` latency for one hypothesis.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmonnx import Scorer
from lmonnx._testing import build_random_lm, make_vocab

VOCAB = [f"w{i}" for i in range(10000 - 4)]


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def beam_search(scorer: Scorer, beam: int, steps: int, report_at: set[int], repeat: int):
    """Yield (step, step_batch seconds, re-score seconds) for the steps in ``report_at``."""
    vocab = scorer.vocab
    hyps = [([], 0.0, scorer.begin())]
    for step in range(1, steps + 1):
        states = [s for _, _, s in hyps]
        dist = scorer.next_logprobs(states).astype(np.float64)
        dist[:, [0, 2, 3]] = -np.inf  # no padding, <s>, and keep every hypothesis open
        totals = np.array([score for _, score, _ in hyps])[:, None] + dist
        flat = np.argpartition(totals.ravel(), -beam)[-beam:]
        rows, ids = np.unravel_index(flat, totals.shape)
        words = [vocab.id_to_token(int(i)) for i in ids]
        parents = [states[r] for r in rows]
        if step in report_at:
            prefixes = [" ".join(hyps[r][0] + [w]) for r, w in zip(rows, words)]
            t_inc = best_of(lambda: scorer.step_batch(parents, words), repeat)
            t_full = best_of(lambda: scorer.score(prefixes), repeat)
            yield step, t_inc, t_full
        _, new_states = scorer.step_batch(parents, words)
        hyps = [(hyps[r][0] + [w], float(totals[r, i]), s)
                for r, i, w, s in zip(rows, ids, words, new_states)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beams", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ptb_shape.onnx"
        build_random_lm(path, make_vocab(VOCAB), units=200, layers=2, embedding_dim=10, seed=0)
        scorer = Scorer(path, providers="cpu", num_threads=args.threads)
        state = scorer.begin()
        scorer.step(state, "w1")  # warm-up
        one = best_of(lambda: scorer.step(state, "w1"), 200)

        print(f"beam search, V={len(VOCAB) + 4}, 2x200 LSTM (random weights), "
              f"{args.threads} threads, best of {args.repeat}; "
              f"{platform.processor() or platform.machine()}")
        print(f"Scorer.step, one hypothesis: {1e3 * one:.3f} ms")
        header = f"{'beam':>5}{'step':>6}{'step_batch ms':>15}{'re-score ms':>13}{'speedup':>9}"
        print(header)
        print("-" * len(header))
        report_at = {1, 10, args.steps}
        final = {}
        for beam in args.beams:
            for step, t_inc, t_full in beam_search(scorer, beam, args.steps, report_at,
                                                   args.repeat):
                print(f"{beam:>5}{step:>6}{1e3 * t_inc:>15.3f}{1e3 * t_full:>13.3f}"
                      f"{t_full / t_inc:>8.1f}x")
                final[beam] = t_full / t_inc
        for beam, ratio in final.items():
            print(f"beam {beam}, step {args.steps}: step_batch is {ratio:.1f}x faster per step "
                  "than re-scoring every prefix" + (" (goal >= 5x)" if beam == 64 else ""))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
