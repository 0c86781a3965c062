"""Corpus evaluation side by side, in one process: lmonnx vs TensorFlow (vs PyTorch).

    python benchmarks/eval_table.py --run RUN_DIR --model model.onnx [--corpus ptb.test.txt]

Every method computes the total masked NLL of the same corpus with the same weights:

  lmonnx      ``Scorer.evaluate``: length-bucketed batches, onnxruntime (fused LSTM ops) for
              logits, the lmonnx kernel for the masked NLL;
  lmonnx int8 the same on the int8 form of the model (``lmonnx.quantize``, made in this run);
  lmonnx cuda (on a GPU only) the loss head on the device, [B, T] values back; and
  cuda logits the same model on CUDA with the logits copied to the host for the kernel;
  tensorflow  the plain way: the trained Keras model, corpus order, batches of 64 padded to
              their longest sentence, the course's ``calculate_loss`` in a ``tf.function``;
  pytorch     (when installed) ``nn.LSTM`` with the Keras weights, the same plain batches,
              ``cross_entropy(ignore_index=0, reduction="sum")``.

It prints tokens/s, the speedup over TensorFlow, padding fraction, peak resident memory of
each method (VmHWM, reset between methods), the NLL agreement, and the effective GFLOP/s of
each method (the model's FLOPs per scored token x tokens / seconds) beside the roofline
measured in the same run: onnxruntime's own MatMul on the output projection's shape
(4096 x units @ units x vocab, the bulk of the FLOPs).  Threads: onnxruntime, TensorFlow and
PyTorch all get ``--threads``.
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

    import lmonnx.train.model  # noqa: F401  registers LanguageModel for load_model
    import lmonnx.train.tied  # noqa: F401  registers TiedLanguageModel

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
        w, b = model.output_weights()  # tied or not: [units, vocab], [vocab]
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


def flops_per_token(vocab: int, embedding: int, units: int, layers: int) -> float:
    """FLOPs per scored position: each LSTM layer's gates (4 units x (inputs + units)
    multiply-adds) and the output projection (units x vocab); embeddings and pointwise ops
    are noise beside them."""
    lstm = sum(2 * 4 * units * ((embedding if i == 0 else units) + units) for i in range(layers))
    return lstm + 2 * units * vocab


def matmul_roofline(units: int, vocab: int, threads: int, repeat: int = 20) -> float:
    """GFLOP/s of onnxruntime's MatMul on [4096, units] @ [units, vocab], best of ``repeat``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((units, vocab)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "roofline",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096, units])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096, vocab])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = rng.standard_normal((4096, units)).astype(np.float32)
    session.run(None, {"x": x})
    best = min(_timed(lambda: session.run(None, {"x": x})) for _ in range(repeat))
    return 2 * 4096 * units * vocab / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lmonnx_methods(model_path: Path, lines, threads: int) -> dict:
    """lmonnx fp32, int8 (quantized in this run) and, on a GPU, CUDA with the loss head and
    CUDA with the logits copied to the host."""
    import tempfile

    from lmonnx.quantize import quantize_bytes
    from lmonnx.runtime import ModelSession, cuda_unavailable_reason

    scorer = Scorer(model_path, providers="cpu", num_threads=threads)
    methods = {"lmonnx": lambda: scorer.evaluate(lines)}
    tmp = Path(tempfile.mkdtemp())
    int8_path = tmp / "int8.onnx"
    int8_path.write_bytes(quantize_bytes(model_path.read_bytes()))
    int8 = Scorer(int8_path, providers="cpu", num_threads=threads)
    methods["lmonnx int8"] = lambda: int8.evaluate(lines)
    if cuda_unavailable_reason() is None:
        cuda = Scorer(model_path, providers="cuda")
        methods["lmonnx cuda"] = lambda: cuda.evaluate(lines)
        logits_on_host = Scorer(model_path, providers="cuda")
        logits_on_host._session = ModelSession(model_path, providers="cuda", loss_head=False)
        methods["cuda logits"] = lambda: logits_on_host.evaluate(lines)
    return methods


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

    methods = lmonnx_methods(args.model, lines, args.threads)
    scorer = Scorer(args.model, providers="cpu", num_threads=args.threads)
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
            nll[name] = result.nll if name.startswith(("lmonnx", "cuda")) else result
    report = scorer.evaluate(lines)
    tokens = report.tokens
    config = scorer.config
    flops = flops_per_token(len(scorer.vocab), config["embedding_dim"], config["num_lstm_units"],
                            config["num_lstm_layers"])
    roofline = matmul_roofline(config["num_lstm_units"], len(scorer.vocab), args.threads)

    print(f"corpus {args.corpus.name}: {report.sentences} sentences, {tokens} tokens; "
          f"vocab {len(scorer.vocab)}, {model.num_lstm_layers}x{model.num_lstm_units} LSTM; "
          f"{args.threads} threads; best of {args.repeat}; {platform.processor() or platform.machine()}")
    print(f"resident memory of the process (TensorFlow, torch, both models loaded): {rss_mib():.0f} MiB")
    print(f"{flops / 1e6:.2f} MFLOP per scored token; roofline: onnxruntime MatMul "
          f"4096x{config['num_lstm_units']} @ {config['num_lstm_units']}x{len(scorer.vocab)} "
          f"= {roofline:.0f} GFLOP/s")
    header = (f"{'method':<13}{'seconds':>9}{'tokens/s':>11}{'vs TF':>8}{'GFLOP/s':>9}"
              f"{'roofline':>9}{'padding':>9}{'+peak MiB':>10}{'NLL rel. diff':>15}")
    print(header)
    print("-" * len(header))
    for name in methods:
        padding = report.padding_fraction if name.startswith(("lmonnx", "cuda")) else plain_padding
        rel = abs(nll[name] - nll["tensorflow"]) / abs(nll["tensorflow"])
        gflops = flops * tokens / best[name] / 1e9
        print(f"{name:<13}{best[name]:>9.3f}{tokens / best[name]:>11,.0f}"
              f"{best['tensorflow'] / best[name]:>7.2f}x{gflops:>9.0f}{100 * gflops / roofline:>8.0f}%"
              f"{100 * padding:>8.1f}%{peak[name]:>10.0f}{rel:>15.1e}")
    if "pytorch" not in methods:
        print(f"{'pytorch':<12}  not installed (make bench installs torch==2.13.0)")
    print(f"lmonnx perplexity {report.perplexity:.3f}; Scorer.evaluate is "
          f"{best['tensorflow'] / best['lmonnx']:.2f}x faster than TensorFlow the plain way, at "
          f"{100 * flops * tokens / best['lmonnx'] / 1e9 / roofline:.0f}% of the MatMul roofline "
          "(goal >= 70%)")
    # the same tokens: ppl_int8 / ppl_fp32 = exp((nll_int8 - nll_fp32) / tokens)
    change = math.exp((nll["lmonnx int8"] - nll["lmonnx"]) / tokens) - 1
    print(f"lmonnx int8 is {best['lmonnx'] / best['lmonnx int8']:.2f}x faster than fp32 "
          f"(goal >= 1.8x), perplexity change {100 * change:+.3f}% (goal < 1%)")
    if "lmonnx cuda" in methods:
        print(f"CUDA: the loss head is {best['cuda logits'] / best['lmonnx cuda']:.2f}x faster "
              "than copying the logits to the host")
    else:
        print("CUDA rows: no usable GPU here (" + (cuda_reason() or "?") + ")")


def cuda_reason():
    from lmonnx.runtime import cuda_unavailable_reason

    return cuda_unavailable_reason()


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
