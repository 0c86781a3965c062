"""The masked cross-entropy kernel against its floor and peers (pytest-benchmark).

Main case: 4096 x 10000 float32 logits, 2 threads, no padding.  Peers, all computing the masked
NLL sum in nats: the memory floor (onnxruntime ReduceSum: reading the logits once), onnxruntime
LogSoftmax+GatherElements and SoftmaxCrossEntropyLoss, NumPy, PyTorch and TensorFlow (the two
skip when not installed).  Sweeps: V in (1k, 10k, 50k) at a fixed 41M logits (164 MB), and the
padding fraction in (0, 0.5, 0.9) at 4096 x 10000.

pytest-benchmark runs each peer in its own timing loop; for ratios measured side by side in
one run, use ``python benchmarks/kernel_table.py``.  ``make test`` runs this file once with
``--benchmark-disable`` so that it cannot rot.
"""

import functools

import pytest

import kernel_peers as peers

ROWS, VOCAB, THREADS = 4096, 10000, 2


@functools.lru_cache(maxsize=2)  # inputs are 164 MB each: keep only the two most recent
def inputs_for(rows: int, vocab: int, padding: float) -> peers.KernelInputs:
    return peers.make_inputs(rows, vocab, padding)


@functools.lru_cache(maxsize=4)
def reference_for(rows: int, vocab: int, padding: float) -> float:
    return peers.reference_sum(inputs_for(rows, vocab, padding))


def _bench(benchmark, name, rows=ROWS, vocab=VOCAB, padding=0.0, group=None):
    """Time peer ``name``; check that what it computed is the masked NLL sum."""
    inputs = inputs_for(rows, vocab, padding)
    run = peers.make_peer(name, inputs, THREADS)
    benchmark.group = group or f"{rows}x{vocab} float32, {THREADS} threads"
    benchmark.extra_info.update(rows=rows, vocab=vocab, padding=padding, threads=THREADS)
    value = float(benchmark(run))
    if name != peers.FLOOR:
        assert value == pytest.approx(reference_for(rows, vocab, padding), rel=1e-4)


def test_lmonnx(benchmark):
    _bench(benchmark, peers.LMONNX)


def test_memory_floor_ort_reduce_sum(benchmark):
    _bench(benchmark, peers.FLOOR)


def test_ort_log_softmax_gather_elements(benchmark):
    _bench(benchmark, peers.LOG_SOFTMAX_GATHER)


def test_ort_softmax_cross_entropy_loss(benchmark):
    _bench(benchmark, "ORT SoftmaxCrossEntropyLoss")


def test_numpy(benchmark):
    _bench(benchmark, "NumPy max/exp/sum/log")


def test_torch_cross_entropy(benchmark):
    pytest.importorskip("torch")
    _bench(benchmark, "PyTorch cross_entropy")


def test_tensorflow_sparse_softmax_cross_entropy(benchmark):
    pytest.importorskip("tensorflow")
    _bench(benchmark, "TensorFlow sparse_softmax_xent*mask")


@pytest.mark.parametrize("name", [peers.LMONNX, peers.FLOOR, peers.LOG_SOFTMAX_GATHER],
                         ids=["lmonnx", "floor", "ort-logsoftmax-gather"])
@pytest.mark.parametrize("vocab", [1000, 10000, 50000], ids=lambda v: f"V={v}")
def test_vocab_sweep(benchmark, vocab, name):
    """Same bytes read at every V (rows x V = 41M logits): what changes is the row length."""
    rows = peers.rows_for_vocab(vocab)
    _bench(benchmark, name, rows=rows, vocab=vocab, group=f"V sweep, V={vocab}")


@pytest.mark.parametrize("name", [peers.LMONNX, peers.LOG_SOFTMAX_GATHER],
                         ids=["lmonnx", "ort-logsoftmax-gather"])
@pytest.mark.parametrize("padding", [0.0, 0.5, 0.9], ids=lambda p: f"padding={p:.0%}")
def test_padding_sweep(benchmark, padding, name):
    """Masked rows are skipped by lmonnx; an ONNX graph computes them and multiplies by 0."""
    _bench(benchmark, name, padding=padding, group=f"padding sweep, {padding:.0%} padded")
