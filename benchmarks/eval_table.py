"""Corpus evaluation side by side, in one process: lmonnx vs TensorFlow (vs PyTorch).

    python benchmarks/eval_table.py --run RUN_DIR --model model.onnx [--corpus ptb.test.txt]

Every method computes the total masked NLL of the same corpus with the same weights:

  lmonnx      ``Scorer.evaluate``: length-bucketed batches, onnxruntime (fused LSTM ops) for
              logits, the lmonnx kernel for the masked NLL;
  tensorflow  the plain way: the trained Keras model, corpus order, batches of 64 padded to
              their longest sentence, the course's ``calculate_loss`` in a ``tf.function``;
  pytorch     (when installed) ``nn.LSTM`` with the Keras weights, the same plain batches,
              ``cross_entropy(ignore_index=0, reduction="sum")``.

It prints tokens/s, the speedup over TensorFlow, padding fraction, peak resident memory of
each method (VmHWM, reset between methods) and the NLL agreement.  Threads: onnxruntime,
TensorFlow and PyTorch all get ``--threads``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lmonnx import Scorer
from lmonnx.batching import make_pair, pad_batch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "ptb.test.txt"


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return math.nan


def peak_rss_mib() -> float:
    """Resident-set high-water mark since the last reset, MiB."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def plain_batches(vocab, lines, batch_size):
    """Corpus order, ``batch_size`` sentences per batch, padded to the longest: the plain way."""
    pairs = [make_pair(vocab.encode(line)) for line in lines]
    return [pad_batch(pairs[i:i + batch_size]) for i in range(0, len(pairs), batch_size)]


def tensorflow_method(run_dir, threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    import lmonnx.train  # noqa: F401  registers LanguageModel for load_model

    model = keras.saving.load_model(Path(run_dir) / "model.keras")

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)] * 2)
    def batch_loss(inputs, targets):
        lstm_outputs, binary_sequences = model.run_lstm(inputs, training=False)
        return model.calculate_loss(lstm_outputs, binary_sequences, targets)

    def run(batches):
        total = 0.0
        for b in batches:
            total += float(batch_loss(tf.constant(b.inputs), tf.constant(b.targets)))
        return total

    return model, run


def pytorch_method(model, threads):
    import torch

    torch.set_num_threads(threads)
    cells = model.cells
    units, layers = model.num_lstm_units, model.num_lstm_layers
    embedding = torch.nn.Embedding(model.vocab_size, model.embedding_dim)
    lstm = torch.nn.LSTM(model.embedding_dim, units, num_layers=layers, batch_first=True)
    dense = torch.nn.Linear(units, model.vocab_size)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(model.embedding.get_weights()[0]))
        for i, cell in enumerate(cells):
            kernel, recurrent, bias = cell.get_weights()  # Keras gate order i f c o = torch's i f g o
            getattr(lstm, f"weight_ih_l{i}").copy_(torch.from_numpy(kernel.T.copy()))
            getattr(lstm, f"weight_hh_l{i}").copy_(torch.from_numpy(recurrent.T.copy()))
            getattr(lstm, f"bias_ih_l{i}").copy_(torch.from_numpy(bias))
            getattr(lstm, f"bias_hh_l{i}").zero_()
        w, b = model.dense.get_weights()
        dense.weight.copy_(torch.from_numpy(w.T.copy()))
        dense.bias.copy_(torch.from_numpy(b))

    def run(batches):
        total = 0.0
        with torch.inference_mode():
            for batch in batches:
                x = torch.from_numpy(batch.inputs.astype(np.int64))
                y = torch.from_numpy(batch.targets.astype(np.int64))
                logits = dense(lstm(embedding(x))[0])
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=0,
                    reduction="sum"))
        return total

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory (model.keras)")
    parser.add_argument("--model", type=Path, required=True, help="the run exported to .onnx")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tf-batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed runs each")
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        sys.exit(f"eval_table: corpus not found: {args.corpus}")

    lines = [line.strip() for line in args.corpus.open(encoding="utf-8") if line.strip()]
    if args.limit:
        lines = lines[:args.limit]

    methods = {}
    scorer = Scorer(args.model, providers="cpu", num_threads=args.threads)
    methods["lmonnx"] = lambda: scorer.evaluate(lines)
    model, tf_run = tensorflow_method(args.run, args.threads)
    batches = plain_batches(scorer.vocab, lines, args.tf_batch_size)
    plain_padding = 1 - sum(b.tokens for b in batches) / sum(b.inputs.size for b in batches)
    methods["tensorflow"] = lambda: tf_run(batches)
    try:
        methods["pytorch"] = lambda run=pytorch_method(model, args.threads): run(batches)
    except ImportError:
        pass

    for fn in methods.values():  # warm-up: graph tracing, allocator growth
        fn()
    best = {name: math.inf for name in methods}
    peak = {name: 0.0 for name in methods}
    nll = {}
    for _ in range(args.repeat):
        for name, fn in methods.items():  # interleaved, so machine noise hits all alike
            measurable = reset_peak_rss()
            before = rss_mib()
            start = time.perf_counter()
            result = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            if measurable:  # memory the method added on top of what the process held
                peak[name] = max(peak[name], peak_rss_mib() - before)
            nll[name] = result.nll if name == "lmonnx" else result
    report = scorer.evaluate(lines)
    tokens = report.tokens

    print(f"corpus {args.corpus.name}: {report.sentences} sentences, {tokens} tokens; "
          f"vocab {len(scorer.vocab)}, {model.num_lstm_layers}x{model.num_lstm_units} LSTM; "
          f"{args.threads} threads; best of {args.repeat}; {platform.processor() or platform.machine()}")
    print(f"resident memory of the process (TensorFlow, torch, both models loaded): {rss_mib():.0f} MiB")
    header = f"{'method':<12}{'seconds':>10}{'tokens/s':>12}{'vs TF':>8}{'padding':>9}{'+peak MiB':>11}{'NLL rel. diff':>15}"
    print(header)
    print("-" * len(header))
    for name in methods:
        padding = report.padding_fraction if name == "lmonnx" else plain_padding
        rel = abs(nll[name] - nll["tensorflow"]) / abs(nll["tensorflow"])
        print(f"{name:<12}{best[name]:>10.3f}{tokens / best[name]:>12,.0f}"
              f"{best['tensorflow'] / best[name]:>7.2f}x{100 * padding:>8.1f}%"
              f"{peak[name]:>11.0f}{rel:>15.1e}")
    if "pytorch" not in methods:
        print(f"{'pytorch':<12}  not installed (make bench installs torch==2.13.0)")
    print(f"lmonnx perplexity {report.perplexity:.3f}; Scorer.evaluate is "
          f"{best['tensorflow'] / best['lmonnx']:.2f}x faster than TensorFlow the plain way")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
