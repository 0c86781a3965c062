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

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lmonnx.artifact import model_props, write_metadata
from lmonnx.errors import InvalidArgumentError, MissingDependencyError, QuantizationError
from lmonnx.graph import copy_tail_weights, untie_output_matrix
from lmonnx.examples import Example
from lmonnx.validation import check_real

DEFAULT_MAX_CHANGE = 0.01
"""Largest relative perplexity increase (int8 vs fp32) accepted without ``force``."""
PER_CHANNEL = True
REDUCE_RANGE = False
SAMPLE_SENTENCES = 1000

Progress = Callable[[str], None]


class _FromPackage(logging.Filter):
    """Drops records logged from the modules under ``directory``."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = os.path.join(os.path.realpath(directory), "")

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.realpath(record.pathname).startswith(self.directory)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence onnxruntime's quantizer, nothing else, while the block runs.

    It has no logger of its own: ``quantize_dynamic`` logs with ``logging.warning(...)`` on the
    root logger (a generic "consider pre-processing", about shape inference for CNNs).  So a
    filter on the root logger drops the records whose source file lies in
    ``onnxruntime/quantization`` (a logger's filter sees only records logged on it, never ones
    that propagate up from the user's loggers), and while the root has no handler a
    ``NullHandler`` keeps ``logging.warning`` from calling ``basicConfig`` on it.  Both are
    removed afterwards."""
    import onnxruntime.quantization

    root = logging.getLogger()
    quiet = _FromPackage(os.path.dirname(onnxruntime.quantization.__file__))
    guard = logging.NullHandler() if not root.handlers else None
    root.addFilter(quiet)
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if guard is not None:
            root.removeHandler(guard)


def quantize_bytes(model: bytes, *, per_channel: bool = PER_CHANNEL,
                   reduce_range: bool = REDUCE_RANGE) -> bytes:
    """The int8 (dynamic quantization) form of a serialized fp32 model, metadata kept."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise MissingDependencyError("quantization needs the onnx package: install "
                                     "lmonnx[cpu,train] or pip install onnx") from None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        fp32 = onnx.load_from_string(model)
        untie_output_matrix(fp32)  # the quantizer takes MatMul weights, not a shared Gemm's
        src.write_bytes(fp32.SerializeToString())
        with _quiet_quantizer():
            quantize_dynamic(src, dst, per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])
        proto = onnx.load(str(dst))
    copy_tail_weights(proto, fp32)  # a factored model's tails: fp32, read outside the graph
    write_metadata(proto, model_props(onnx.load_from_string(model)))
    return proto.SerializeToString()


def _perplexity(model: bytes, examples: list[Example], name: str) -> tuple[float, int]:
    from lmonnx.evaluate import Evaluator
    from lmonnx.runtime import ModelSession

    report = Evaluator(ModelSession(model, providers="cpu", name=name)).run(examples)
    return report.perplexity, report.tokens


def quantize_checked(model: bytes, examples: Iterable[Example], source: str, *,
                     max_change: float = DEFAULT_MAX_CHANGE, force: bool = False,
                     name: str = "<model>", progress: Progress | None = None,
                     ) -> tuple[bytes, dict]:
    """int8 bytes of ``model`` (called ``name`` in messages) with an ``lmonnx.quantization``
    record, after measuring the perplexity of both on ``examples`` (from ``source``).
    :class:`QuantizationError` when int8 raises the perplexity by more than ``max_change``
    (relative: 0.01 is 1%) and not ``force``; an unchanged or lower perplexity always passes.
    ``progress`` is called with a line before each stage."""
    say = progress or (lambda message: None)
    max_change = check_real("--max-change", max_change, low=0, why="a fraction")
    examples = list(examples)
    if not examples:
        raise InvalidArgumentError(f"{source}: no sentences to measure the quantization on")
    say(f"quantizing {name} to int8")
    int8 = quantize_bytes(model)
    say(f"measuring both models on {len(examples)} sentences of {source}")
    fp32_ppl, tokens = _perplexity(model, examples, name)
    int8_ppl, _ = _perplexity(int8, examples, f"{name} (int8)")
    change = int8_ppl / fp32_ppl - 1.0
    record = {"method": "onnxruntime dynamic quantization, int8 weights",
              "per_channel": PER_CHANNEL, "reduce_range": REDUCE_RANGE,
              "quantized_ops": ["LSTM", "MatMul"], "sample": source, "sample_tokens": tokens,
              "perplexity_fp32": fp32_ppl, "perplexity_int8": int8_ppl,
              "perplexity_change": change}
    if not change <= max_change and not force:  # NaN is refused too
        raise QuantizationError(
            f"int8 changes the perplexity by {100 * change:+.3f}% on {tokens} tokens of "
            f"{source} ({fp32_ppl:.3f} -> {int8_ppl:.3f}), more than the "
            f"{100 * max_change:g}% allowed; nothing written (--force writes it anyway)")
    import onnx

    proto = onnx.load_from_string(int8)
    write_metadata(proto, model_props(proto), quantization=record)
    return proto.SerializeToString(), record


def describe(record: dict) -> str:
    return (f"int8: perplexity {record['perplexity_fp32']:.3f} -> {record['perplexity_int8']:.3f} "
            f"({100 * record['perplexity_change']:+.3f}%) on {record['sample_tokens']} tokens "
            f"of {record['sample']}")


def generated_examples(model: bytes, count: int = 200, seed: int = 0, *,
                       name: str = "<model>") -> tuple[list, str]:
    """``count`` sentences sampled from the fp32 model itself (format 2, called ``name`` in
    messages): a sample of what the model considers likely text, when the user gives none."""
    from lmonnx.corpus import to_line
    from lmonnx.examples import ExampleBuilder
    from lmonnx.incremental import END, Incremental
    from lmonnx.runtime import ModelSession

    session = ModelSession(model, providers="cpu", name=name)
    incremental = Incremental(session)
    builder = ExampleBuilder(session.vocab)
    examples = []
    for i in range(count):
        words = incremental.generate("", words=60, seed=seed + i)
        text = " ".join(w for w in words if w != END)
        examples.append(builder.build(to_line(i, text)))
    return examples, f"{count} sentences sampled from the fp32 model"


def _sample_examples(session, model: bytes, source: Path, sample, errors: str,
                     progress: Progress | None):
    """(examples, where they came from): ``sample``'s first sentences, else sentences the
    model samples itself."""
    from itertools import islice

    from lmonnx.corpus import read_sentences
    from lmonnx.examples import ExampleBuilder

    if sample is None:
        if progress is not None:
            progress(f"sampling sentences from {source}")
        return generated_examples(model, name=str(source))
    builder = ExampleBuilder(session.vocab)
    examples = list(builder.build_all(islice(read_sentences(sample, errors), SAMPLE_SENTENCES)))
    return examples, f"{Path(sample).name} (first {len(examples)} sentences)"


def quantize_file(source, output, *, sample=None, errors: str = "strict",
                  max_change: float = DEFAULT_MAX_CHANGE, force: bool = False,
                  progress: Progress | None = None) -> dict:
    """``lmonnx quantize``: the int8 form of the lmonnx model at ``source``, written to
    ``output`` (atomically for a file; a FIFO or ``/dev/stdout`` too), never over ``source`` or
    ``sample``, even with ``force`` (``OutputError``).  Returns the ``lmonnx.quantization``
    record; ``progress`` is called with a line before each stage."""
    from lmonnx.atomic import check_outputs, output_file
    from lmonnx.runtime import ModelSession

    source, output = Path(source), Path(output)
    inputs = [source, *([sample] if sample is not None else [])]
    check_outputs({"-o": output}, inputs, force=force)
    session = ModelSession(source, providers="cpu")
    if session.quantization:
        raise InvalidArgumentError(f"{source} is already quantized "
                                   f"({session.quantization.get('method')})")
    model = source.read_bytes()
    examples, where = _sample_examples(session, model, source, sample, errors, progress)
    data, record = quantize_checked(model, examples, where, max_change=max_change, force=force,
                                    name=str(source), progress=progress)
    check_outputs({"-o": output}, inputs, force=force)  # it may have appeared meanwhile
    with output_file(output, "-o", binary=True) as f:
        f.write(data)
    return record
