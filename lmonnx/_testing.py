"""A TensorFlow-free stand-in for an exported lmonnx model, for tests and benchmarks.

Builds the same graph shape that ``lmonnx export`` writes (Gather embedding -> fused ONNX
``LSTM`` layers -> MatMul + Add logits; format 2 adds the state inputs and outputs) with random
weights and lmonnx metadata, so runtime,
evaluation and Scorer tests run in a second, without training anything.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lmonnx.artifact import (FACTORED_FORMAT, HEAD_OUTPUT, HIDDEN_OUTPUT, INPUT_NAME,
                             OUTPUT_NAME, STATE_INPUTS, STATE_OUTPUTS, metadata_props)
from lmonnx.factored import check_cutoffs, tail_dims, tail_names
from lmonnx.vocab import TokenizerOptions, Vocabulary


def make_vocab(words, preset="whitespace") -> Vocabulary:
    """A vocabulary of the four specials followed by ``words`` in the given order."""
    return Vocabulary(["<pad>", "<unk>", "<s>", "</s>", *words], TokenizerOptions.from_preset(preset))


def _lstm_layers(rng, nodes: list, init: list, *, units: int, layers: int, size: int,
                 scale: float, stateful: bool) -> str:
    """Append ``layers`` fused LSTMs over ``x0`` [T, B, size]; the name of the last output."""
    inp = "x0"
    for layer in range(layers):
        w = (rng.standard_normal((1, 4 * units, size)) * scale / np.sqrt(size)).astype(np.float32)
        r = (rng.standard_normal((1, 4 * units, units)) * scale / np.sqrt(units)).astype(np.float32)
        b = (rng.standard_normal((1, 8 * units)) * 0.1).astype(np.float32)
        init += [numpy_helper.from_array(w, f"W{layer}"), numpy_helper.from_array(r, f"R{layer}"),
                 numpy_helper.from_array(b, f"B{layer}")]
        lstm_inputs = [inp, f"W{layer}", f"R{layer}", f"B{layer}"]
        lstm_outputs = [f"y{layer}"]
        if stateful:
            init.append(numpy_helper.from_array(np.array([layer], dtype=np.int64), f"layer{layer}"))
            nodes += [helper.make_node("Gather", [STATE_INPUTS[k], f"layer{layer}"],
                                       [f"{STATE_INPUTS[k]}{layer}"], axis=0) for k in (0, 1)]
            lstm_inputs += ["lengths", f"{STATE_INPUTS[0]}{layer}", f"{STATE_INPUTS[1]}{layer}"]
            lstm_outputs += [f"yh{layer}", f"yc{layer}"]
        nodes += [
            helper.make_node("LSTM", lstm_inputs, lstm_outputs, hidden_size=units),
            helper.make_node("Squeeze", [f"y{layer}", "axis1"], [f"h{layer}"]),
        ]
        inp, size = f"h{layer}", units
    return inp


def _signature(nodes: list, vocab_size: int, *, units: int, layers: int, stateful: bool,
               head_size: int | None = None):
    """The graph's inputs and outputs (and, for format 2, the Concat of the layers' states);
    ``head_size``: format 3's ``head_logits`` [.., head_size] and ``hidden`` [.., units]."""
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT32, ["batch", "time"])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                             ["batch", "time", vocab_size])]
    if head_size is not None:
        outputs = [helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT,
                                                 ["batch", "time", head_size]),
                   helper.make_tensor_value_info(HIDDEN_OUTPUT, TensorProto.FLOAT,
                                                 ["batch", "time", units])]
    if stateful:
        state_shape = [layers, "batch", units]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape)
                   for n in STATE_INPUTS]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape)
                    for n in STATE_OUTPUTS]
        for k, kind in enumerate(("yh", "yc")):
            nodes.append(helper.make_node("Concat", [f"{kind}{i}" for i in range(layers)],
                                          [STATE_OUTPUTS[k]], axis=0))
    return inputs, outputs


def build_random_lm(path, vocab: Vocabulary, *, units=16, layers=2, embedding_dim=4, seed=0,
                    scale=1.0, stateful: bool = True, cutoffs=None) -> None:
    """Write a random-weight lmonnx model with ``layers`` fused LSTMs of ``units`` to ``path``.

    ``stateful``: format 2 (state inputs and outputs, ``sequence_lens`` computed in the graph
    from ``input_ids != 0``), else format 1 (only to test that it is refused).  ``cutoffs``
    (the boundaries below the vocabulary size, e.g. ``[20, 60]``): format 3, the factored
    softmax (``lmonnx.factored``), with random tail clusters.
    """
    rng = np.random.default_rng(seed)
    V = len(vocab)
    init = [numpy_helper.from_array((rng.standard_normal((V, embedding_dim)) * scale)
                                    .astype(np.float32), "embedding"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    nodes = [
        helper.make_node("Gather", ["embedding", INPUT_NAME], ["emb"]),
        helper.make_node("Transpose", ["emb"], ["x0"], perm=[1, 0, 2]),  # [T, B, E]
    ]
    if stateful:  # lengths = sum(input_ids != 0) per row, the LSTM's sequence_lens
        init.append(numpy_helper.from_array(np.array(0, dtype=np.int32), "zero"))
        nodes += [
            helper.make_node("Greater", [INPUT_NAME, "zero"], ["real"]),
            helper.make_node("Cast", ["real"], ["real32"], to=TensorProto.INT32),
            helper.make_node("ReduceSum", ["real32", "axis1"], ["lengths"], keepdims=0),
        ]
    last = _lstm_layers(rng, nodes, init, units=units, layers=layers, size=embedding_dim,
                        scale=scale, stateful=stateful)
    full = check_cutoffs(cutoffs, V) if cutoffs is not None else None
    width = V if full is None else full[0] + len(full) - 1  # the head: words and clusters
    init += [numpy_helper.from_array((rng.standard_normal((units, width)) * scale * 2
                                      / np.sqrt(units)).astype(np.float32), "dense_w"),
             numpy_helper.from_array((rng.standard_normal(width) * 0.5).astype(np.float32),
                                     "dense_b")]
    logits = OUTPUT_NAME if full is None else HEAD_OUTPUT
    nodes += [
        helper.make_node("Transpose", [last], ["bth" if full is None else HIDDEN_OUTPUT],
                         perm=[1, 0, 2]),
        helper.make_node("MatMul", ["bth" if full is None else HIDDEN_OUTPUT, "dense_w"],
                         ["proj"]),
        helper.make_node("Add", ["proj", "dense_b"], [logits]),
    ]
    config = dict(vocab_size=V, max_length=35, num_lstm_units=units, num_lstm_layers=layers,
                  embedding_dim=embedding_dim, dropout=0.0)
    if full is not None:
        for k, dim in enumerate(tail_dims(units, len(full) - 1)):
            size = full[k + 1] - full[k]
            arrays = (rng.standard_normal((units, dim)) * scale / np.sqrt(units),
                      rng.standard_normal((dim, size)) * scale * 2 / np.sqrt(dim),
                      rng.standard_normal(size) * 0.5)
            init += [numpy_helper.from_array(a.astype(np.float32), name)
                     for a, name in zip(arrays, tail_names(k))]
        config.update(softmax="adaptive", cutoffs=full)
    inputs, outputs = _signature(nodes, V, units=units, layers=layers, stateful=stateful,
                                 head_size=None if full is None else width)
    model = helper.make_model(helper.make_graph(nodes, "random_lm", inputs, outputs, init),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = "1" if not stateful else "2" if full is None else FACTORED_FORMAT
    props = metadata_props(vocab, config, {"corpus": "random"}, format_version=version)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def edit_logits(src, dst, *, nan: bool = False, float16: bool = False) -> None:
    """A copy of the model at ``src`` written to ``dst`` whose logits are broken the way a
    foreign or diverged model's are: ``nan`` puts NaN in every logit (through the output
    bias), ``float16`` casts the logits output to float16."""
    model = onnx.load(str(src))
    graph = model.graph
    if nan:
        (bias,) = [t for t in graph.initializer if t.name == "dense_b"]
        values = np.full(numpy_helper.to_array(bias).shape, np.nan, np.float32)
        bias.CopyFrom(numpy_helper.from_array(values, "dense_b"))
    if float16:  # the logits, or a factored model's head
        name = OUTPUT_NAME if any(o.name == OUTPUT_NAME for o in graph.output) else HEAD_OUTPUT
        (add,) = [n for n in graph.node if name in n.output]
        add.output[0] = "logits_float32"
        graph.node.append(helper.make_node("Cast", ["logits_float32"], [name],
                                           to=TensorProto.FLOAT16))
        (out,) = [o for o in graph.output if o.name == name]
        out.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(dst))


SOFTMAXES = ("full", "factored")
"""The output layers a test fixture is built with (``params=SOFTMAXES``): every scoring test
that runs on both holds for format 2 and format 3 models alike."""


def random_cutoffs(softmax: str, vocab_size: int) -> list[int] | None:
    """``build_random_lm``'s ``cutoffs`` for a fixture's ``softmax``: None (full), or a head
    of a quarter of the vocabulary and two tail clusters."""
    if softmax == "full":
        return None
    head = max(5, vocab_size // 4)
    middle = max(head + 1, vocab_size // 2)
    return [head, middle] if middle < vocab_size else [head]
