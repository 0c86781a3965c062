"""Inputs and peers for the kernel benchmarks, shared by bench_kernel.py and kernel_table.py.

Every peer computes the same number, the masked sum of token NLL in nats,

    sum_i mask[i] * (logsumexp(logits[i, :]) - logits[i, labels[i]])

over the same float32 logits [rows, V], except the memory floor, which only reads the logits
once (onnxruntime ``ReduceSum``) and so bounds what any kernel that reads them can reach.

A peer is built by ``make_peer(name, inputs, threads)``, which does all set-up (ONNX graph,
session, tensor conversion) and returns a zero-argument callable that runs one evaluation;
only that callable is timed.  Peers whose library is missing raise ``PeerUnavailable``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
"""Label at padded positions, as PyTorch's and ONNX's ``ignore_index`` expect."""

SEQUENCE_LENGTH = 64
"""Rows are cut into sentences of this many positions; padding sits at each sentence's end."""


class PeerUnavailable(RuntimeError):
    """The library a peer needs is not installed."""


@dataclass(frozen=True)
class KernelInputs:
    """One benchmark case.

    logits : float32 [rows, V], C-contiguous
    labels : int64 [rows], IGNORE_INDEX at padded positions (what ignore_index peers take)
    safe_labels : int64 [rows], 0 at padded positions (for peers that gather unconditionally)
    mask : bool [rows], False at padded positions
    """

    logits: np.ndarray
    labels: np.ndarray
    safe_labels: np.ndarray
    mask: np.ndarray

    @property
    def rows(self) -> int:
        return self.logits.shape[0]

    @property
    def vocab(self) -> int:
        return self.logits.shape[1]


def make_inputs(rows: int = 4096, vocab: int = 10000, padding: float = 0.0,
                seed: int = 0) -> KernelInputs:
    """Random logits and labels with right padding: ``padding`` of every sentence is masked.

    The rows form sentences of SEQUENCE_LENGTH positions (fewer if rows is smaller); each keeps
    ``round((1 - padding) * length)`` real positions at its start, like a padded LM batch.
    """
    if not 0.0 <= padding < 1.0:
        raise ValueError(f"padding must be in [0, 1), got {padding}")
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab), dtype=np.float32)
    logits *= 3.0
    safe_labels = rng.integers(0, vocab, size=rows, dtype=np.int64)
    length = min(SEQUENCE_LENGTH, rows)
    real = int(round((1.0 - padding) * length))
    mask = (np.arange(rows) % length) < real
    labels = np.where(mask, safe_labels, IGNORE_INDEX).astype(np.int64)
    safe_labels = np.where(mask, safe_labels, 0).astype(np.int64)
    return KernelInputs(logits, labels, safe_labels, mask)


def rows_for_vocab(vocab: int, elements: int = 4096 * 10000) -> int:
    """Rows that keep rows * vocab near ``elements`` (the V sweep holds the bytes read fixed)."""
    return max(1, int(round(elements / vocab)))


def reference_sum(inputs: KernelInputs) -> float:
    """Float64 NumPy value of the masked NLL sum, to check that every peer agrees."""
    x = inputs.logits[inputs.mask].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[:, 0]
    picked = x[np.arange(x.shape[0]), inputs.labels[inputs.mask]]
    return float((lse - picked).sum())


# ----------------------------------------------------------------------------- ONNX graphs --

def reduce_sum_model():
    """logits [N, V] -> sum of all logits: reads each logit once, the memory floor."""
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceSum", ["logits"], ["total"], keepdims=0)
    graph = helper.make_graph(
        [node], "memory_floor",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "V"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    return _model(graph)


def log_softmax_gather_model():
    """logits [N, V], labels int64 [N, 1], mask float32 [N, 1] -> masked NLL sum.

    The best way to write the loss inside an ONNX graph: LogSoftmax, GatherElements at the
    labels, times the mask, ReduceSum.
    """
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=-1),
        helper.make_node("GatherElements", ["logp", "labels"], ["picked"], axis=1),
        helper.make_node("Mul", ["picked", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked"], ["neg_total"], keepdims=0),
        helper.make_node("Neg", ["neg_total"], ["total"]),
    ]
    graph = helper.make_graph(
        nodes, "log_softmax_gather",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "V"]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", 1]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    return _model(graph)


def softmax_cross_entropy_model(ignore_index: int = IGNORE_INDEX, reduction: str = "sum"):
    """logits [N, V], labels int64 [N] -> ONNX SoftmaxCrossEntropyLoss with ignore_index."""
    from onnx import TensorProto, helper

    node = helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"],
                            reduction=reduction, ignore_index=ignore_index)
    loss_shape = [] if reduction != "none" else ["N"]
    graph = helper.make_graph(
        [node], "softmax_cross_entropy",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "V"]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, loss_shape)])
    return _model(graph)


def _model(graph):
    from onnx import checker, helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    return model


def ort_session(model, threads: int):
    """A CPU InferenceSession over ``model`` with ``threads`` intra-op threads.

    Spinning is off so that idle onnxruntime threads do not steal the two cores from whatever
    runs next when peers are timed one after another.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------- peers --

def _lmonnx(inputs: KernelInputs, threads: int):
    from lmonnx import masked_cross_entropy

    logits, labels, mask = inputs.logits, inputs.labels, inputs.mask
    return lambda: masked_cross_entropy(logits, labels, mask, reduction="sum",
                                        num_threads=threads)


def _ort_floor(inputs: KernelInputs, threads: int):
    session = ort_session(reduce_sum_model(), threads)
    feed = {"logits": inputs.logits}
    return lambda: session.run(None, feed)[0]


def _ort_log_softmax_gather(inputs: KernelInputs, threads: int):
    session = ort_session(log_softmax_gather_model(), threads)
    feed = {"logits": inputs.logits, "labels": inputs.safe_labels[:, None],
            "mask": inputs.mask.astype(np.float32)[:, None]}
    return lambda: session.run(None, feed)[0]


def _ort_softmax_cross_entropy(inputs: KernelInputs, threads: int):
    session = ort_session(softmax_cross_entropy_model(), threads)
    feed = {"logits": inputs.logits, "labels": inputs.labels}
    return lambda: session.run(None, feed)[0]


def _numpy(inputs: KernelInputs, threads: int):
    logits, safe_labels = inputs.logits, inputs.safe_labels
    weights = inputs.mask.astype(np.float32)
    index = np.arange(inputs.rows)

    def run():
        m = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[:, 0]
        return float(((lse - logits[index, safe_labels]) * weights).sum(dtype=np.float64))

    return run


def _torch(inputs: KernelInputs, threads: int):
    if importlib.util.find_spec("torch") is None:
        raise PeerUnavailable("torch")
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    logits = torch.from_numpy(inputs.logits)
    labels = torch.from_numpy(inputs.labels)

    def run():
        with torch.inference_mode():
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                   reduction="sum").item()

    return run


def _tensorflow(inputs: KernelInputs, threads: int):
    if importlib.util.find_spec("tensorflow") is None:
        raise PeerUnavailable("tensorflow")
    import tensorflow as tf

    try:  # only possible before TensorFlow's runtime starts; later calls keep the first setting
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    with tf.device("/CPU:0"):
        logits = tf.constant(inputs.logits)
        labels = tf.constant(inputs.safe_labels)
        mask = tf.constant(inputs.mask)

    # The tensors are arguments, not captured constants, so graph optimisation cannot fold
    # the whole loss into a constant at trace time.
    @tf.function(jit_compile=False)
    def loss(logits, labels, mask):
        per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.math.reduce_sum(per_token * tf.cast(mask, tf.float32))

    def run():
        with tf.device("/CPU:0"):
            return float(loss(logits, labels, mask))

    return run


PEERS = {
    "lmonnx": _lmonnx,
    "memory floor (ORT ReduceSum)": _ort_floor,
    "ORT LogSoftmax+GatherElements": _ort_log_softmax_gather,
    "ORT SoftmaxCrossEntropyLoss": _ort_softmax_cross_entropy,
    "NumPy max/exp/sum/log": _numpy,
    "PyTorch cross_entropy": _torch,
    "TensorFlow sparse_softmax_xent*mask": _tensorflow,
}
"""Peer name -> builder(inputs, threads) -> zero-argument callable.  Order is the table's."""

LMONNX = "lmonnx"
FLOOR = "memory floor (ORT ReduceSum)"
LOG_SOFTMAX_GATHER = "ORT LogSoftmax+GatherElements"


def make_peer(name: str, inputs: KernelInputs, threads: int = 2):
    """Build peer ``name`` over ``inputs``; raises PeerUnavailable when its library is absent."""
    return PEERS[name](inputs, threads)
