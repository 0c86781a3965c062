"""Local evaluation vs evaluation on Ray Data, side by side, on one machine.

    python benchmarks/ray_table.py [--model model.onnx] [--corpus ptb.test.txt] [--scale 10]

Corpora: PTB test and the same text repeated ``--scale`` times (a corpus ``scale`` times as
large, same sentences, so the totals scale exactly).  Model: ``--model``, or a random-weight
model of ``make bench``'s shape (2 x 200 LSTM over the words of PTB validation, vocabulary
6,024, embedding 10; random weights cost exactly what trained ones do).  Methods:

  local        ``Scorer.evaluate(path)``: one process, onnxruntime with one thread per core;
  ray ...      ``lmonnx.distributed.RayEvaluator.evaluate(path)`` on a local cluster of this machine's
               CPUs (started once, its start-up time printed apart): read tasks, a pool of
               scoring actors, the driver summing rows.

Ray's seconds are the whole job as a user waits for it: actors starting and loading the model,
reading, scoring, collecting the rows.  ``actor s`` is the scoring time summed over actors (the
work); the rest of the wall time is Ray's overhead.  Each method runs ``--repeats`` times, the
runs interleaved, the fastest kept.  Every run's totals are checked against the local ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def bench_model(directory: Path, corpus: Path) -> Path:
    """A random 2 x 200 model over the words of PTB validation (else of ``corpus``)."""
    from lmonnx._testing import build_random_lm, make_vocab

    source = SHARED / "ptb.valid.txt" if (SHARED / "ptb.valid.txt").is_file() else corpus
    counts = Counter(source.read_text(encoding="utf-8").split())
    counts.pop("<unk>", None)
    path = directory / "bench.onnx"
    build_random_lm(path, make_vocab([w for w, _ in counts.most_common(9996)]), units=200,
                    layers=2, embedding_dim=10)
    return path


def ray_configs(cpus: int, read_cpus: float) -> list[tuple[str, dict]]:
    """What fits next to one read task: one single-threaded actor per core, or one actor
    with every core's thread."""
    share = (cpus - read_cpus) / cpus
    return [
        (f"ray {cpus} actors x {share:.3g} CPU", dict(num_actors=cpus, cpus_per_actor=share)),
        (f"ray 1 actor x {cpus - read_cpus:.3g} CPU ({cpus} threads)",
         dict(num_actors=1, cpus_per_actor=cpus - read_cpus)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--corpus", type=Path, default=SHARED / "ptb.test.txt")
    parser.add_argument("--scale", type=int, default=10, help="the larger corpus, x times")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(f"corpus not found: {args.corpus}", file=sys.stderr)
        return 1

    import ray

    import lmonnx.distributed as lray
    from lmonnx import Scorer
    from lmonnx.cluster import connect

    tmp = Path(tempfile.mkdtemp(prefix="lmonnx-ray-bench-"))
    model = args.model or bench_model(tmp, args.corpus)
    big = tmp / f"{args.corpus.stem}.x{args.scale}.txt"
    big.write_bytes(args.corpus.read_bytes() * args.scale)
    cpus = os.cpu_count() or 1

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-job news
    start = time.perf_counter()
    connect(None, num_cpus=cpus)  # ray.init with lmonnx's quiet defaults
    cluster_s = time.perf_counter() - start
    scorer = Scorer(model, providers="cpu")
    configs = ray_configs(cpus, lray.READ_CPUS)

    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs, Python "
          f"{platform.python_version()}, ray {ray.__version__}; model {model.name} "
          f"(vocab {len(scorer.vocab):,}); local Ray cluster started in {cluster_s:.1f} s "
          "(not counted below)")
    header = (f"{'corpus':<18} {'method':<42} {'tokens/s':>10} {'vs local':>8} {'wall s':>7} "
              f"{'actor s':>7} {'padding':>7}  totals")
    print(header)
    print("-" * len(header))
    for corpus in (args.corpus, big):
        best: dict[str, tuple] = {}
        local = None
        for _ in range(args.repeats):  # interleaved, so that drifting load hits all alike
            t = time.perf_counter()
            report = scorer.evaluate(corpus)
            wall = time.perf_counter() - t
            if "local" not in best or wall < best["local"][0]:
                best["local"] = (wall, report, report.seconds)
            local = report
            for name, config in configs:
                runner = lray.RayEvaluator(model, providers="cpu", progress=False, **config)
                report = runner.evaluate(corpus)
                wall = report.seconds
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, report, runner.actor_seconds)
        label = corpus.name if corpus == args.corpus else f"{args.corpus.name} x{args.scale}"
        local_rate = local.tokens / best["local"][0]
        for name, (wall, report, actor_s) in best.items():
            rate = report.tokens / wall
            same = all(getattr(report, k) == getattr(local, k) for k in
                       ("sentences", "tokens", "oovs", "nll", "top1_accuracy", "padding_fraction"))
            print(f"{label:<18} {name:<42} {rate:>10,.0f} {rate / local_rate:>7.2f}x "
                  f"{wall:>7.2f} {actor_s if actor_s is not None else wall:>7.2f} "
                  f"{100 * report.padding_fraction:>6.2f}%  "
                  f"{'= local' if same else 'DIFFER'} ({report.tokens:,} tokens)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
