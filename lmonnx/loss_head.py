"""The loss head: per-position log-probability of the target and top-1 hit, in the graph.

On CUDA the logits [batch, time, vocab] must not cross PCIe (at V=10k they are 40 kB per
token): the head appends to the model::

    logits --LogSoftmax(axis=-1)--GatherElements(target_ids)--> token_logprob float32 [B, T]
    logits --ArgMax(axis=-1, first index)--Equal(target_ids)--> token_hit     bool    [B, T]

so onnxruntime runs it on the device and only [B, T] values come back (with the LSTM state of
format 2).  The numbers are the kernel's (``xent.token_nll_and_hits``): the NLL is
``-token_logprob`` and a hit is the first argmax, as ``logits.argmax(-1) == targets``.  On CPU
the C kernel stays the path (it reads the logits once and runs at the memory floor); tests run
the head with the CPU provider against the kernel.

Building the head edits the graph with the ``onnx`` package (in the ``gpu`` extra).
"""

from __future__ import annotations

from lmonnx.errors import MissingDependencyError
from lmonnx.artifact import INPUT_NAME, OUTPUT_NAME

TARGETS = "target_ids"
TOKEN_LOGPROB = "token_logprob"
TOKEN_HIT = "token_hit"


def add_loss_head(model: bytes) -> tuple[bytes, int | None]:
    """The serialized model with the head appended: input ``target_ids`` int32 [batch, time]
    added, output ``logits`` replaced by ``token_logprob`` and ``token_hit``.  Also returns
    the declared logits width (None when symbolic), which the head hides from the session."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingDependencyError("the CUDA loss head edits the graph with the onnx package: "
                          "install lmonnx[gpu]") from None
    import numpy as np

    proto = onnx.load_from_string(model)
    graph = proto.graph
    (logits,) = [o for o in graph.output if o.name == OUTPUT_NAME]
    dims = logits.type.tensor_type.shape.dim
    width = dims[2].dim_value if len(dims) == 3 and dims[2].HasField("dim_value") else None
    prefix = "lmonnx_head_"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}last"))
    graph.node.extend([
        helper.make_node("Cast", [TARGETS], [f"{prefix}t64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", [f"{prefix}t64", f"{prefix}last"], [f"{prefix}t3"]),
        helper.make_node("LogSoftmax", [OUTPUT_NAME], [f"{prefix}logp"], axis=-1),
        helper.make_node("GatherElements", [f"{prefix}logp", f"{prefix}t3"], [f"{prefix}g"],
                         axis=-1),
        helper.make_node("Squeeze", [f"{prefix}g", f"{prefix}last"], [TOKEN_LOGPROB]),
        helper.make_node("ArgMax", [OUTPUT_NAME], [f"{prefix}argmax"], axis=-1, keepdims=0,
                         select_last_index=0),
        helper.make_node("Equal", [f"{prefix}argmax", f"{prefix}t64"], [TOKEN_HIT]),
    ])
    bt = ["batch", "time"]
    graph.input.append(helper.make_tensor_value_info(TARGETS, TensorProto.INT32, bt))
    outputs = [o for o in graph.output if o.name != OUTPUT_NAME]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(TOKEN_LOGPROB, TensorProto.FLOAT, bt),
                         helper.make_tensor_value_info(TOKEN_HIT, TensorProto.BOOL, bt),
                         *outputs])
    assert INPUT_NAME in {i.name for i in graph.input}
    return proto.SerializeToString(), width
