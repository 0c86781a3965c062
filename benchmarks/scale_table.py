"""Large vocabularies side by side, in one process: the full vs the factored (adaptive) softmax.

    python benchmarks/scale_table.py [--vocab 10000,50000,100000] [--units 200] [--layers 2]
                                     [--sentences 2000] [--zipf 1.0] [--steps 5] [--repeat 3]
                                     [--threads 2] [--quick]

For each vocabulary size V, two tied models of the same shape (``layers`` x ``units`` LSTM,
``lmonnx.train.tied.TiedLanguageModel``) with random weights (``keras.utils.set_random_seed``:
speed does not depend on the weights), one with the full softmax and one with the adaptive
softmax at its default cutoffs (``lmonnx.factored.default_cutoffs``: a head of 2,000 words,
clusters at 10k and 50k below V):

  scoring   each model through lmonnx's own export pipeline (``lmonnx.export.convert`` and
            the metadata ``lmonnx export`` writes: format 2 for full, format 3 for adaptive),
            opened by ``ModelSession`` (CPU, fp32), checked against Keras on the first 32
            sentences (``lmonnx.export.check_parity``: max |logit diff|, adaptive: of the
            log-probabilities), then the same Zipfian sentences scored by
            ``lmonnx.evaluate.Evaluator`` (what ``lmonnx evaluate`` and ``Scorer`` run: the
            full model's logits read by the kernel; the adaptive model's head, and each tail
            cluster only for its targets);
  training  the tied recipe's optimizer step (``lmonnx.train.steps.StreamStep``, SGD at the
            recipe's rate with its global-norm clipping, as the trainer makes it, dropout on)
            on windows of the same text cut as the trainer cuts them
            (``lmonnx.batching.stream_windows``: ``batch_size`` columns x ``max_length``), after
            one warm-up step (tracing).

The text: ``--sentences`` sentences of 1 + Poisson(19) words (PTB's mean is about 21 with
``</s>``), each word drawn from a Zipf law of exponent ``--zipf`` over the V - 4 words (rank r
has weight 1 / r**zipf; the vocabulary is in rank order, as a fitted one is in frequency
order).  The same uniform draws are mapped through each V's law, so every V sees the same
sentence lengths and the same quantiles.  ``lmonnx synth`` is not used: its Markov chain's
unigram law is a fixed Zipf exponent of 0.6 (a flatter tail than text: the 2,000-word head
would hold under half the tokens instead of two thirds), and drawing a 100k-word chain takes
16 s.

Every measurement is interleaved (each repeat runs every method once, in the same order), the
best of ``--repeat`` kept; only the ratios within one run are meant to carry over to other
machines.  Threads: onnxruntime, the kernel and TensorFlow all get ``--threads``.

At the defaults it takes about 4 minutes on 2 cores (Intel Xeon, a quiet machine) and needs
about 11 GiB of memory at its peak: tf2onnx converts a V=100k model in ~40 s and ~9 GiB.
A busy machine slows the adaptive scoring far more than the full one (the kernel's OpenMP
threads on small cluster arrays wait for a core): compare on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

DEFAULT_VOCABS = (10_000, 50_000, 100_000)
MEAN_WORDS = 20  # 1 + Poisson(19)
PARITY_SENTENCES = 32
QUICK = dict(vocab="300,3000", units=16, layers=2, sentences=60, steps=2, repeat=1)
"""``--quick``: two tiny vocabularies (3000: a head of 2000 words and one cluster), seconds."""


# ---- the text --------------------------------------------------------------------------------

def zipf_ranks(words: int, uniforms: np.ndarray, exponent: float) -> np.ndarray:
    """0-based ranks in [0, words) of a Zipf law (weight 1 / (r + 1)**exponent), by inverting
    its CDF at ``uniforms`` (so one set of draws gives every vocabulary size its own law)."""
    cdf = np.cumsum(1.0 / np.arange(1, words + 1, dtype=np.float64) ** exponent)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, uniforms, side="right"), words - 1)


@dataclass
class Draws:
    """The random part of the text, shared by every vocabulary size."""

    lengths: np.ndarray  # words per sentence
    uniforms: np.ndarray  # one per word, all sentences end to end

    @classmethod
    def make(cls, sentences: int, seed: int) -> "Draws":
        rng = np.random.default_rng(seed)
        lengths = 1 + rng.poisson(MEAN_WORDS - 1, size=sentences)
        return cls(lengths, rng.random(int(lengths.sum())))


def zipf_text(vocab_size: int, draws: Draws, exponent: float):
    """(vocabulary: the specials then ``w0``..``w{V-5}`` in rank order, lines ``Line``)."""
    from lmonnx._testing import make_vocab
    from lmonnx.corpus import to_line

    words = vocab_size - 4
    vocab = make_vocab([f"w{r}" for r in range(words)])
    ranks = zipf_ranks(words, draws.uniforms, exponent)
    cuts = np.cumsum(draws.lengths)[:-1]
    lines = [to_line(i + 1, " ".join(f"w{r}" for r in sentence))
             for i, sentence in enumerate(np.split(ranks, cuts))]
    return vocab, lines


# ---- the models ------------------------------------------------------------------------------

class _Run:
    """The one thing ``lmonnx.export``'s pipeline asks a run directory here: its training
    record (written into the model's metadata)."""

    @staticmethod
    def training_record(config: dict) -> dict:
        return {"corpus": "random weights (benchmarks/scale_table.py)"}


@dataclass
class Method:
    """One (V, softmax) model: its Keras model, exported bytes, session and results."""

    vocab_size: int
    softmax: str
    model: object
    data: bytes
    session: object
    cutoffs: list | None
    export_seconds: float = math.nan
    parity: object = None
    score_best: float = math.inf
    report: object = None
    train_best: float = math.inf  # seconds per token, best round
    train_steps: object = None
    windows: list = field(default_factory=list)
    next_window: int = 0

    @property
    def name(self) -> str:
        return f"V={self.vocab_size} {self.softmax}"


def build(vocab_size: int, softmax: str, vocab, config, args) -> Method:
    """A random-weight tied model exported through lmonnx's pipeline and opened for scoring."""
    import keras

    from lmonnx import export
    from lmonnx.runtime import ModelSession
    from lmonnx.train.tied import TiedLanguageModel

    keras.utils.set_random_seed(args.seed)
    model = TiedLanguageModel(vocab_size, config.max_length, args.units, args.layers,
                              dropout=config.dropout, softmax=softmax)
    model.build()
    shape = dict(vocab_size=vocab_size, max_length=config.max_length, num_lstm_units=args.units,
                 num_lstm_layers=args.layers, embedding_dim=args.units, dropout=config.dropout)
    # export's own conversion and metadata (format 2 or 3), as `lmonnx export` writes them
    start = time.perf_counter()
    data, _, _ = export._converted(model, _Run(), shape, vocab, export.DEFAULT_OPSET)
    gc.collect()  # tf2onnx leaves gigabytes in reference cycles (V=100k: ~4 GiB) until a collection
    seconds = time.perf_counter() - start
    session = ModelSession(data, providers="cpu", num_threads=args.threads,
                           name=f"V={vocab_size} {softmax}")
    return Method(vocab_size, softmax, model, data, session, getattr(model, "cutoffs", None),
                  export_seconds=seconds)


# ---- timing ----------------------------------------------------------------------------------

def score(method: Method, examples, threads: int):
    from lmonnx.evaluate import Evaluator

    return Evaluator(method.session, corpus=f"zipf V={method.vocab_size}",
                     num_threads=threads).run(examples)


def train_round(method: Method, steps: int, loss_scale_of) -> tuple[float, int]:
    """(seconds, tokens) of ``steps`` optimizer steps on the method's next windows."""
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        window = method.windows[method.next_window % len(method.windows)]
        method.next_window += 1
        loss_sum, n = method.train_steps(window, loss_scale_of(window))
        float(loss_sum)  # wait for the step
        tokens += int(n)
    return time.perf_counter() - start, tokens


def make_step(method: Method, config):
    """The tied recipe's ``StreamStep`` with the trainer's optimizer (SGD, global-norm clip)."""
    import keras

    from lmonnx.train.steps import StreamStep

    clip = {"global_clipnorm": float(config.clipnorm)} if config.clipnorm > 0 else {}
    optimizer = keras.optimizers.SGD(learning_rate=float(config.learning_rate), **clip)
    step = StreamStep(method.model, optimizer)
    step.start_epoch()
    return step


# ---- the table -------------------------------------------------------------------------------

def head_share(lines_examples, cutoffs) -> float:
    """Share of the scored targets that fall in the adaptive head."""
    targets = np.concatenate([e.targets for e in lines_examples])
    return float(np.mean(targets < cutoffs[0]))


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_gib() -> float:
    """The process's resident-set high-water mark (VmHWM), GiB; NaN where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def print_table(args, argv, config, methods, texts, *, load_before: float, times) -> None:
    import onnxruntime
    import tensorflow as tf

    by = {(m.vocab_size, m.softmax): m for m in methods}
    tokens = {v: by[v, "full"].report.tokens for v in args.vocabs}
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores) | Python "
          f"{platform.python_version()}, TensorFlow {tf.__version__}, onnxruntime "
          f"{onnxruntime.__version__} | {args.threads} threads | load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"command: python benchmarks/scale_table.py {shlex.join(argv)}".rstrip())
    print(f"models: tied {args.layers}x{args.units} LSTM, random weights (seed {args.seed}), "
          f"fp32; adaptive: default cutoffs; text: {args.sentences} sentences, "
          f"{tokens[args.vocabs[0]]:,} tokens (</s> included), Zipf exponent {args.zipf}; "
          f"best of {args.repeat} interleaved repeats")
    print()
    print("Scoring (lmonnx.evaluate.Evaluator over ModelSession, CPU, fp32; export: "
          "lmonnx.export's conversion and metadata):")
    print()
    rows = []
    for v in args.vocabs:
        full, ada = by[v, "full"], by[v, "adaptive"]
        rows.append([
            f"{v:,}", ",".join(map(str, ada.cutoffs[:-1])),
            f"{100 * head_share(texts[v], ada.cutoffs):.1f}%",
            f"{len(full.data) / 1e6:.1f} / {len(ada.data) / 1e6:.1f}",
            f"{full.export_seconds:.1f} / {ada.export_seconds:.1f}",
            f"{full.parity.max_logit_abs_diff:.0e} / {ada.parity.max_logit_abs_diff:.0e}",
            f"{full.report.perplexity:,.0f} / {ada.report.perplexity:,.0f}",
            f"{tokens[v] / full.score_best:,.0f}", f"{tokens[v] / ada.score_best:,.0f}",
            f"**{full.score_best / ada.score_best:.2f}x**"])
    print(markdown(["V", "adaptive cutoffs", "targets in head", ".onnx MB full / adaptive",
                    "export s", "max logit diff vs Keras", "ppl (random weights)",
                    "full tokens/s", "adaptive tokens/s", "speedup"], rows))
    print()
    per_step = config.batch_size * config.max_length
    print(f"Training (the tied recipe's StreamStep: SGD at {config.learning_rate:g}, global "
          f"clipnorm {config.clipnorm:g}, dropout {config.dropout:g}; stream windows of "
          f"{config.batch_size} x {config.max_length}; {args.steps} steps a repeat after a "
          "warm-up step):")
    print()
    rows = []
    for v in args.vocabs:
        full, ada = by[v, "full"], by[v, "adaptive"]
        rows.append([
            f"{v:,}",
            f"{full.model.count_params() / 1e6:.2f}M / {ada.model.count_params() / 1e6:.2f}M",
            f"{1000 * full.train_best * per_step:,.0f} / {1000 * ada.train_best * per_step:,.0f}",
            f"{1 / full.train_best:,.0f}", f"{1 / ada.train_best:,.0f}",
            f"**{full.train_best / ada.train_best:.2f}x**"])
    print(markdown(["V", "parameters full / adaptive", f"ms per {per_step}-token step",
                    "full tokens/s", "adaptive tokens/s", "speedup"], rows))
    print()
    building, scoring, training = times
    print(f"time: {sum(times):.0f} s (building, exporting and checking {building:.0f} s, "
          f"scoring {scoring:.0f} s, training {training:.0f} s); peak resident memory "
          f"{peak_rss_gib():.1f} GiB")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default=",".join(map(str, DEFAULT_VOCABS)),
                    help="comma-separated vocabulary sizes (ids, the 4 specials included)")
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=2000, help="scored sentences")
    ap.add_argument("--zipf", type=float, default=1.0, help="the words' Zipf exponent")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per repeat")
    ap.add_argument("--repeat", type=int, default=3, help="best of N interleaved repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in seconds: " + ", ".join(f"--{k} {v}"
                                                                for k, v in QUICK.items()))
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    try:
        args.vocabs = [int(v) for v in str(args.vocab).split(",")]
    except ValueError:
        ap.error(f"--vocab: comma-separated integers, got {args.vocab!r}")
    if any(v < 10 for v in args.vocabs):
        ap.error("--vocab: each size at least 10 (4 ids are the specials)")
    if min(args.units, args.layers, args.sentences, args.steps, args.repeat, args.threads) < 1:
        ap.error("--units, --layers, --sentences, --steps, --repeat, --threads: at least 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]

    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    except RuntimeError:
        # TensorFlow already ran in this process (pytest runs other benchmarks first): its
        # pools are fixed; the table prints the threads it asked for, so say so.
        print(f"note: TensorFlow was initialized before; its thread pools are not "
              f"{args.threads}", file=sys.stderr)
    from lmonnx.batching import stream_windows
    from lmonnx.examples import ExampleBuilder
    from lmonnx.export import check_parity
    from lmonnx.train.config import TrainConfig

    config = TrainConfig().resolved()  # the tied recipe's defaults
    draws = Draws.make(args.sentences, args.seed)
    methods: list[Method] = []
    texts = {}
    for v in args.vocabs:
        vocab, lines = zipf_text(v, draws, args.zipf)
        examples = list(ExampleBuilder(vocab).build_all(lines))
        texts[v] = examples
        items = [(e.key, e.inputs, e.targets) for e in examples]
        for softmax in ("full", "adaptive"):
            m = build(v, softmax, vocab, config, args)
            m.parity = check_parity(m.model, m.session, examples[:PARITY_SENTENCES],
                                    "zipf text", window=config.max_length)
            if not m.parity.ok:
                print(f"scale_table: {m.name} failed its parity check: "
                      f"{m.parity.describe()}", file=sys.stderr)
                return 1
            m.windows = stream_windows(items, columns=config.batch_size,
                                       window=config.max_length,
                                       rng=np.random.default_rng(args.seed))
            methods.append(m)
    built = time.perf_counter()

    # scoring: warm-up, then interleaved repeats
    for m in methods:
        m.report = score(m, texts[m.vocab_size], args.threads)
    for _ in range(args.repeat):
        for m in methods:
            start = time.perf_counter()
            m.report = score(m, texts[m.vocab_size], args.threads)
            m.score_best = min(m.score_best, time.perf_counter() - start)
    scored = time.perf_counter()

    # training: one warm-up (tracing) step each, then interleaved rounds of --steps steps
    def loss_scale_of(window):
        return np.float32(window.tokens)

    for m in methods:
        m.train_steps = make_step(m, config)
        train_round(m, 1, loss_scale_of)
    for _ in range(args.repeat):
        for m in methods:
            seconds, tokens = train_round(m, args.steps, loss_scale_of)
            m.train_best = min(m.train_best, seconds / tokens)
    trained = time.perf_counter()

    print_table(args, argv, config, methods, texts, load_before=load_before,
                times=(built - began, scored - built, trained - scored))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
