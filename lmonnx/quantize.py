"""int8 models for CPU: onnxruntime dynamic quantization, checked by the perplexity it costs.

    fp32 .onnx --quantize_dynamic (per-channel int8 weights; LSTM -> DynamicQuantizeLSTM,
                                   MatMul -> MatMulInteger)--> int8 graph
      + the fp32 metadata, and ``lmonnx.quantization``: method, options, and the perplexity of
        both models on sample sentences, measured through the evaluation code users run
      --refuse (unless forced) when the perplexity changes by more than ``max_change``-->

Options measured on a 4-epoch PTB model (2x200, V=6024, PTB test, 2 threads, one run while
another process was training on the same machine): per-channel weights with the output
projection quantized were the fastest (1.0 s vs 3.3 s fp32) at +0.02% perplexity; per-tensor
weights gave 1.5x, and leaving the projection in fp32 or ``reduce_range`` gave less speed for
no accuracy that matters.  ``make bench`` prints the figures of the current code.

The int8 ops have no CUDA kernels: such a model runs on CPU (``runtime`` refuses CUDA).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Iterable

from lmonnx.errors import InvalidArgumentError, MissingDependencyError, QuantizationError
from lmonnx.artifact import KEY_QUANTIZATION
from lmonnx.examples import Example

DEFAULT_MAX_CHANGE = 0.01
"""Largest relative perplexity change (int8 vs fp32) accepted without ``force``."""
PER_CHANNEL = True
REDUCE_RANGE = False




def quantize_bytes(model: bytes, *, per_channel: bool = PER_CHANNEL,
                   reduce_range: bool = REDUCE_RANGE) -> bytes:
    """The int8 (dynamic quantization) form of a serialized fp32 model, metadata kept."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise MissingDependencyError("quantization needs the onnx package: install lmonnx[cpu,train] "
                          "or pip install onnx") from None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        # onnxruntime's quantizer logs a generic "consider pre-processing" warning on the root
        # logger (it is about shape inference for CNNs); keep the user's stderr to our lines.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(src, dst, per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])
        finally:
            logging.disable(logging.NOTSET)
        proto = onnx.load(str(dst))
    original = onnx.load_from_string(model)
    del proto.metadata_props[:]
    proto.metadata_props.extend(original.metadata_props)
    return proto.SerializeToString()


def _perplexity(model: bytes, examples: list[Example], name: str) -> tuple[float, int]:
    from lmonnx.evaluate import Evaluator
    from lmonnx.runtime import ModelSession

    report = Evaluator(ModelSession(model, providers="cpu", name=name)).run(examples)
    return report.perplexity, report.tokens


def quantize_checked(model: bytes, examples: Iterable[Example], source: str, *,
                     max_change: float = DEFAULT_MAX_CHANGE, force: bool = False,
                     name: str = "<model>") -> tuple[bytes, dict]:
    """int8 bytes of ``model`` with an ``lmonnx.quantization`` record, after measuring the
    perplexity of both on ``examples`` (from ``source``).  :class:`QuantizationError` when
    it changes by more than ``max_change`` (relative) and not ``force``."""
    if not (isinstance(max_change, (int, float)) and math.isfinite(max_change)
            and max_change >= 0):
        raise InvalidArgumentError(f"--max-change must be a number >= 0 (a fraction), got {max_change!r}")
    examples = list(examples)
    if not examples:
        raise InvalidArgumentError(f"{source}: no sentences to measure the quantization on")
    int8 = quantize_bytes(model)
    fp32_ppl, tokens = _perplexity(model, examples, name)
    int8_ppl, _ = _perplexity(int8, examples, f"{name} (int8)")
    change = int8_ppl / fp32_ppl - 1.0
    record = {"method": "onnxruntime dynamic quantization, int8 weights",
              "per_channel": PER_CHANNEL, "reduce_range": REDUCE_RANGE,
              "quantized_ops": ["LSTM", "MatMul"], "sample": source, "sample_tokens": tokens,
              "perplexity_fp32": fp32_ppl, "perplexity_int8": int8_ppl,
              "perplexity_change": change}
    if abs(change) > max_change and not force:
        raise QuantizationError(
            f"int8 changes the perplexity by {100 * change:+.3f}% on {tokens} tokens of "
            f"{source} ({fp32_ppl:.3f} -> {int8_ppl:.3f}), more than the "
            f"{100 * max_change:g}% allowed; nothing written (--force writes it anyway)")
    import onnx

    proto = onnx.load_from_string(int8)
    entry = proto.metadata_props.add()
    entry.key, entry.value = KEY_QUANTIZATION, json.dumps(record, sort_keys=True)
    return proto.SerializeToString(), record


def describe(record: dict) -> str:
    return (f"int8: perplexity {record['perplexity_fp32']:.3f} -> {record['perplexity_int8']:.3f} "
            f"({100 * record['perplexity_change']:+.3f}%) on {record['sample_tokens']} tokens "
            f"of {record['sample']}")


def generated_examples(model: bytes, count: int = 200, seed: int = 0) -> tuple[list, str]:
    """``count`` sentences sampled from the fp32 model itself (format 2): a sample of what
    the model considers likely text, when the user gives none."""
    from lmonnx.corpus import to_line
    from lmonnx.examples import ExampleBuilder
    from lmonnx.incremental import END, Incremental
    from lmonnx.runtime import ModelSession

    session = ModelSession(model, providers="cpu")
    session.require_state("sampling sentences to measure the quantization (or give --sample)")
    incremental = Incremental(session)
    builder = ExampleBuilder(session.vocab)
    examples = []
    for i in range(count):
        words = incremental.generate("", words=60, seed=seed + i)
        text = " ".join(w for w in words if w != END)
        examples.append(builder.build(to_line(i, text)))
    return examples, f"{count} sentences sampled from the fp32 model"


def quantize_file(source, output, *, sample=None, errors: str = "strict",
                  max_change: float = DEFAULT_MAX_CHANGE, force: bool = False) -> dict:
    """``lmonnx quantize``: the int8 form of the lmonnx model at ``source``, written atomically
    to ``output``, never over ``source``.  Returns the ``lmonnx.quantization`` record."""
    from itertools import islice

    from lmonnx.atomic import check_output, write_atomic
    from lmonnx.corpus import read_sentences
    from lmonnx.examples import ExampleBuilder
    from lmonnx.runtime import ModelSession

    source, output = Path(source), Path(output)
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise InvalidArgumentError(f"-o {output} is the model being quantized; choose another file")
    check_output(output, "-o", force=force)
    session = ModelSession(source, providers="cpu")
    if session.quantization:
        raise InvalidArgumentError(f"{source} is already quantized ({session.quantization.get('method')})")
    model = source.read_bytes()
    if sample is not None:
        builder = ExampleBuilder(session.vocab)
        examples = list(builder.build_all(islice(read_sentences(sample, errors), 1000)))
        where = f"{Path(sample).name} (first {len(examples)} sentences)"
    else:
        examples, where = generated_examples(model)
    data, record = quantize_checked(model, examples, where, max_change=max_change, force=force,
                                    name=str(source))
    write_atomic(output, data)
    return record
