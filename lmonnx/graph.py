"""Edits and checks of the ONNX graph: what export does to tf2onnx's output, and the loss head.

Export (``lmonnx export``, on tf2onnx's ModelProto, in this order):

- ``wire_sequence_lengths``: every fused ``LSTM`` gets ``sequence_lens = sum(input_ids != 0)``,
  so the state handed back for a row is its state after its last real token;
- ``name_dynamic_axes``: tf2onnx's ``unk__N`` axes become ``batch`` and ``time``;
- ``tie_output_matrix``: a tied model's output ``MatMul`` reads the embedding's own
  initializer through ``Gemm(transB=1)``, so the file holds the [vocab, units] matrix once
  (tf2onnx folds the transpose into a second copy); ``untie_output_matrix`` undoes it for the
  int8 quantizer, which quantizes ``MatMul`` weights;
- ``check_graph``: one fused LSTM per layer carrying its state and lengths, no ``Loop``/``Scan``,
  ``onnx.checker``.

The loss head (runtime, CUDA): per-position log-probability of the target and top-1 hit, in
the graph.  On CUDA the logits [batch, time, vocab] must not cross PCIe (at V=10k they are 40 kB per
token): the head appends to the model::

    logits --LogSoftmax(axis=-1)--GatherElements(target_ids)--> token_logprob float32 [B, T]
    logits --ArgMax(axis=-1, first index)--Equal(target_ids)--> token_hit     bool    [B, T]

so onnxruntime runs it on the device and only [B, T] values come back (with the LSTM state of
format 2).  The numbers are the kernel's (``xent.token_nll_and_hits``): the NLL is
``-token_logprob`` and a hit is the first argmax, as ``logits.argmax(-1) == targets``.  On CPU
the C kernel stays the path (it reads the logits once and runs at the memory floor); tests run
the head with the CPU provider against the kernel.

Every edit uses the ``onnx`` package, imported when called (the head needs the ``gpu`` extra).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from lmonnx.artifact import (HEAD_OUTPUT, HIDDEN_OUTPUT, INPUT_NAME, OUTPUT_NAME,
                             STATE_INPUTS, STATE_OUTPUTS)
from lmonnx.errors import ExportError, MissingDependencyError

TARGETS = "target_ids"
TOKEN_LOGPROB = "token_logprob"
TOKEN_HIT = "token_hit"
LENGTHS = "lmonnx_sequence_lens"
FORBIDDEN_OPS = ("Loop", "Scan")


def add_loss_head(model: bytes) -> tuple[bytes, int | None] | None:
    """The serialized model with the head appended: input ``target_ids`` int32 [batch, time]
    added, output ``logits`` replaced by ``token_logprob`` and ``token_hit``.  Also returns
    the declared logits width (None when symbolic), which the head hides from the session.
    None for a graph without ``logits`` (format 3: its head and hidden states are small, and
    the tails are computed on the host)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingDependencyError("the CUDA loss head edits the graph with the onnx package: "
                          "install lmonnx[gpu]") from None
    proto = onnx.load_from_string(model)
    graph = proto.graph
    found = [o for o in graph.output if o.name == OUTPUT_NAME]
    if not found:
        return None
    (logits,) = found
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


# ---- export's edits of tf2onnx's graph ------------------------------------------------------

def wire_sequence_lengths(proto) -> None:
    """Give every LSTM ``sequence_lens = sum(input_ids != 0, axis=1)`` (int32 [batch]).

    Without it the fused op runs through the padding and hands back the state after the last
    padded position; with it, each row's ``Y_h``/``Y_c`` is its state after its last real
    token, whatever else shares its batch.  Outputs at real positions are unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    zero, axis = f"{LENGTHS}_zero", f"{LENGTHS}_axis"
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int32), zero),
                              numpy_helper.from_array(np.array([1], np.int64), axis)])
    nodes = [helper.make_node("Greater", [INPUT_NAME, zero], [f"{LENGTHS}_real"]),
             helper.make_node("Cast", [f"{LENGTHS}_real"], [f"{LENGTHS}_int"],
                              to=TensorProto.INT32),
             helper.make_node("ReduceSum", [f"{LENGTHS}_int", axis], [LENGTHS], keepdims=0)]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    for node in graph.node:
        if node.op_type == "LSTM":
            while len(node.input) < 5:
                node.input.append("")
            if node.input[4]:
                raise ExportError(f"tf2onnx already gave {node.name} a sequence_lens input")
            node.input[4] = LENGTHS


def _dynamic_axis_names(graph) -> dict[str, str]:
    """tf2onnx's ``unk__N`` -> ``batch`` / ``time``, read off the graph's inputs and outputs."""
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    scores = {OUTPUT_NAME} if OUTPUT_NAME in outputs else {HEAD_OUTPUT, HIDDEN_OUTPUT}
    if set(inputs) != {INPUT_NAME, *STATE_INPUTS} or set(outputs) != {*scores, *STATE_OUTPUTS}:
        raise ExportError(f"tf2onnx named the graph's inputs {sorted(inputs)} and outputs "
                          f"{sorted(outputs)}, not the lmonnx format's names")
    axes = {INPUT_NAME: ("batch", "time"),
            **{name: ("batch", "time") for name in (OUTPUT_NAME, HEAD_OUTPUT, HIDDEN_OUTPUT)}}
    axes.update({name: (None, "batch") for name in (*STATE_INPUTS, *STATE_OUTPUTS)})
    rename = {}
    for name, value in {**inputs, **outputs}.items():
        for dim, axis_name in zip(value.type.tensor_type.shape.dim, axes[name]):
            if axis_name is None:
                continue
            if dim.HasField("dim_value"):
                raise ExportError(f"{name} axis {axis_name} is fixed at {dim.dim_value}, "
                                  "expected a dynamic axis")
            rename[dim.dim_param] = axis_name
    return rename


def name_dynamic_axes(proto) -> None:
    """tf2onnx calls the dynamic axes ``unk__N``; call them ``batch`` and ``time``."""
    graph = proto.graph
    rename = _dynamic_axis_names(graph)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


TIED = "lmonnx_tied"
"""The prefix of the names ``tie_output_matrix`` gives (``untie_output_matrix`` finds its Gemm
by them)."""


def tie_output_matrix(proto) -> bool:
    """Replace ``MatMul(h, E^T)`` -- ``E^T`` an initializer equal to the transpose of the
    embedding ``Gather``'s matrix ``E`` -- by reshapes around ``Gemm(h2, E, transB=1)`` and drop
    ``E^T``.  h float32 [batch, time, units] -> logits [batch, time, vocab], the same numbers
    (one sgemm either way).  Whether the graph had such a MatMul (an untied model has none)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits, to_array = {i.name: i for i in graph.initializer}, numpy_helper.to_array
    tables = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = to_array(inits[node.input[1]])
        table = next((t for t in tables if weight.shape[::-1] == tuple(inits[t].dims)
                      and np.array_equal(weight.T, to_array(inits[t]))), None)
        if table is None:
            continue
        units, vocab = weight.shape
        h, out, p = node.input[0], node.output[0], TIED
        graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), f"{p}_{k}")
                                  for k, v in (("rows", [-1, units]), ("start", [0]),
                                               ("end", [-1]), ("vocab", [vocab]))])
        nodes = [helper.make_node("Reshape", [h, f"{p}_rows"], [f"{p}_h2"]),
                 helper.make_node("Gemm", [f"{p}_h2", table], [f"{p}_logits2"], transB=1),
                 helper.make_node("Shape", [h], [f"{p}_shape"]),
                 helper.make_node("Slice", [f"{p}_shape", f"{p}_start", f"{p}_end"],
                                  [f"{p}_lead"]),
                 helper.make_node("Concat", [f"{p}_lead", f"{p}_vocab"], [f"{p}_out_shape"],
                                  axis=0),
                 helper.make_node("Reshape", [f"{p}_logits2", f"{p}_out_shape"], [out])]
        transposed = node.input[1]
        graph.node.remove(node)
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
        if not any(transposed in n.input for n in graph.node):
            graph.initializer.remove(inits[transposed])
        return True
    return False


def untie_output_matrix(proto) -> None:
    """The inverse of :func:`tie_output_matrix` for the int8 quantizer: the tied ``Gemm``
    becomes ``MatMul`` with its own transposed copy of the matrix (which the quantizer then
    stores as int8; the embedding ``Gather`` keeps the float32 one)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type == "Gemm" and node.input[0] == f"{TIED}_h2":
            name = f"{TIED}_output_matrix"
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T), name))
            graph.node.remove(node)
            graph.node.insert(index, helper.make_node("MatMul", [node.input[0], name],
                                                      list(node.output)))
            return


def add_tail_weights(proto, tails) -> None:
    """Store a factored model's tail clusters in the file: ``tails`` is a list of
    (projection [units, dim], kernel [dim, size], bias [size]) float32 arrays, one per cluster,
    named by ``lmonnx.factored.tail_names``.  No node reads them: scoring computes a cluster
    outside the graph, for the positions whose target (or best word) lies in it."""
    from onnx import numpy_helper

    from lmonnx.factored import tail_names

    for k, weights in enumerate(tails):
        for name, array in zip(tail_names(k), weights):
            proto.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(array, np.float32), name))


def copy_tail_weights(target, source) -> None:
    """Put ``source``'s tail initializers back into ``target`` where a rewrite (the int8
    quantizer drops initializers no node reads) left them out."""
    have = {i.name for i in target.graph.initializer}
    target.graph.initializer.extend(i for i in source.graph.initializer
                                    if i.name.startswith("lmonnx_tail_") and i.name not in have)


def tail_cluster_model(k: int, projection: np.ndarray, kernel: np.ndarray,
                       bias: np.ndarray) -> bytes:
    """A serialized model computing cluster ``k``'s logits: ``logits [rows, size] = (hidden
    [rows, units] @ projection) @ kernel + bias``, float32 (an int8 file's tails too: int8
    was measured no faster on the few gathered rows a batch sends, and fp32 keeps them
    exact)."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                           ["rows", projection.shape[0]])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", kernel.shape[1]])
    # A tied tail's projection is the identity (``--tie-tails``): multiplying by it changes
    # no number, so the session skips it.
    projected = not np.array_equal(projection, np.eye(*projection.shape, dtype=projection.dtype))
    arrays = [("kernel", kernel), ("bias", bias)] + [("projection", projection)] * projected
    nodes = [helper.make_node("MatMul", ["hidden", "projection"], ["projected"])] * projected + [
        helper.make_node("MatMul", ["projected" if projected else "hidden", "kernel"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"])]
    weights = [numpy_helper.from_array(np.ascontiguousarray(a, np.float32), n)
               for n, a in arrays]
    graph = helper.make_graph(nodes, f"lmonnx_tail_{k}", [hidden], [logits], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime >= 1.18 reads
    return model.SerializeToString()


def op_counts(proto) -> dict[str, int]:
    """How many nodes of each op type the graph holds."""
    return dict(Counter(node.op_type for node in proto.graph.node))


def check_graph(proto, num_layers: int) -> dict[str, int]:
    """``ExportError`` unless the graph holds ``num_layers`` fused LSTMs that carry their state
    and lengths, no Loop/Scan, and passes ``onnx.checker``; returns its op counts."""
    import onnx

    counts = op_counts(proto)
    bad = {op: counts[op] for op in FORBIDDEN_OPS if counts.get(op)}
    if bad or counts.get("LSTM", 0) != num_layers:
        raise ExportError(
            f"expected {num_layers} fused ONNX LSTM op(s) and no Loop/Scan, got "
            f"LSTM x{counts.get('LSTM', 0)}" + "".join(f", {op} x{n}" for op, n in bad.items())
            + "; tf2onnx did not recognise the Keras LSTM layers")
    for node in proto.graph.node:
        # inputs X W R B sequence_lens initial_h initial_c; outputs Y Y_h Y_c
        if node.op_type == "LSTM" and (len(node.input) < 7 or not all(node.input[4:7])
                                       or len(node.output) < 3 or not all(node.output[1:3])):
            raise ExportError(f"{node.name}: the fused LSTM does not carry the state "
                              f"(inputs {list(node.input)}, outputs {list(node.output)}); "
                              "tf2onnx did not map the Keras initial/returned state onto it")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the converted model fails onnx.checker: "
                          f"{str(exc).splitlines()[0]}") from None
    return counts
