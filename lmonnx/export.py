"""``lmonnx export``: a training run -> one self-describing, self-validated ``.onnx`` file.

    RUN_DIR/model.keras --LanguageModel.inference_model()--> Embedding -> LSTM x L -> Dense
        (same weights, no mask: tf2onnx rewrites only unmasked Keras LSTMs into fused ONNX
         ``LSTM`` ops; a masked one becomes a ``Loop``; each layer's initial state is an input
         and its final state an output)
      --tf2onnx.convert.from_function--> ModelProto, format 2 (ARCHITECTURE.md):
            input_ids int32 [batch, time], state_h/state_c float32 [layers, batch, units]
         -> logits float32 [batch, time, vocab_size], state_h_out/state_c_out
      --wire sequence_lens = sum(input_ids != 0) into every LSTM (tf2onnx leaves it empty):
            the state handed back is each row's state after its last real token
      + metadata_props (artifact.py): vocabulary, tokenizer, model shape, training record
      --check: fused LSTM ops with their state and lengths wired, no Loop/Scan, onnx.checker--
      --state checks: a batch in two halves of time carrying the state equals one pass (loss
            within LOSS_RTOL); each row's state in a padded batch equals its state alone--
      --parity on real sentences (built by the one example builder, lmonnx.examples):
            the serialized bytes opened by ``lmonnx.runtime.ModelSession`` (the session users
            run) vs the trained Keras model (the masked one): logits at real positions within
            LOGIT_ATOL, masked loss (``lmonnx.evaluate.score_batch``'s NLL, what evaluation
            computes, vs Keras ``calculate_loss``) within LOSS_RTOL--
      --write atomically: temp file in the output's directory, then os.replace--> model.onnx

Right padding is what makes dropping the mask exact: a causal LSTM's output at a real position
depends only on earlier (real) positions, and the kernel's mask skips the padded ones.
The run directory is read through ``lmonnx.rundir`` (its config, history and training record).
No write replaces one of the command's inputs -- the run's files, its corpora, the sample text
-- with or without ``--force``, nor a directory.
TensorFlow is imported inside the functions: this module is loaded only by ``lmonnx export``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from lmonnx.errors import ExportError, InvalidArgumentError
from lmonnx.artifact import (FORMAT_VERSION, INPUT_NAME, OUTPUT_NAME, STATE_INPUTS,
                             STATE_OUTPUTS, metadata_props)
from lmonnx.atomic import write_atomic
from lmonnx.batching import bucketed_batches
from lmonnx.corpus import read_sentences, to_line
from lmonnx.examples import ExampleBuilder
from lmonnx.rundir import MODEL_FILE, STDIN_CORPUS, VOCAB_FILE, RunDir, is_run_file_name
from lmonnx.vocab import SPECIAL_TOKENS, Vocabulary

DEFAULT_OPSET = 17
MIN_OPSET = 11
LOGIT_ATOL = 1e-4
"""Largest |ONNX logit - Keras logit| allowed at a real (unpadded) position."""
LOSS_RTOL = 1e-5
"""Largest |ONNX loss - Keras loss| / |Keras loss| allowed for any sample batch; also the
largest relative change of a batch's loss when it is scored in two halves carrying the state."""
STATE_ATOL = 1e-5
"""Largest |state of a row in a padded batch - its state alone|."""
SAMPLE_SENTENCES = 256
FORBIDDEN_OPS = ("Loop", "Scan")

__all__ = ["ExportError", "ExportReport", "export_run", "convert", "check_parity", "check_state",
           "DEFAULT_OPSET", "LOGIT_ATOL", "LOSS_RTOL"]




@dataclass
class ParityReport:
    """onnxruntime against Keras on sample batches.  Losses are summed NLL in nats."""

    source: str
    sentences: int
    tokens: int
    batches: int
    max_logit_abs_diff: float
    loss_keras: float
    loss_onnx: float
    max_batch_loss_rel_diff: float

    @property
    def loss_rel_diff(self) -> float:
        if self.loss_keras == 0.0:
            return 0.0 if self.loss_onnx == 0.0 else math.inf
        return abs(self.loss_onnx - self.loss_keras) / abs(self.loss_keras)

    @property
    def ok(self) -> bool:
        return (self.max_logit_abs_diff <= LOGIT_ATOL
                and self.max_batch_loss_rel_diff <= LOSS_RTOL)

    def describe(self) -> str:
        return (f"max |logit diff| {self.max_logit_abs_diff:.2e} (limit {LOGIT_ATOL:.0e}), "
                f"loss rel diff {self.max_batch_loss_rel_diff:.2e} worst batch / "
                f"{self.loss_rel_diff:.2e} total (limit {LOSS_RTOL:.0e}) on {self.sentences} "
                f"sentences, {self.tokens} tokens, {self.batches} batches of {self.source}")


def _describe_quantization(record: dict) -> str:
    from lmonnx.quantize import describe

    return describe(record)


@dataclass
class ExportReport:
    """What ``export_run`` wrote and how it checked it."""

    output: Path
    size_bytes: int
    opset: int
    op_counts: dict[str, int]
    parity: ParityReport
    state: StateReport
    metadata: dict[str, str] = field(repr=False, default_factory=dict)
    quantization: dict | None = None

    def summary(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(),
                                                          key=lambda kv: (-kv[1], kv[0])))
        return "\n".join([
            f"wrote {self.output} ({self.size_bytes / 1e6:.2f} MB, lmonnx format "
            f"{self.metadata.get('lmonnx.format_version', '?')}, opset {self.opset}, "
            + (f"{self.op_counts.get('DynamicQuantizeLSTM', 0)} int8 DynamicQuantizeLSTM"
               if self.quantization else f"{self.op_counts.get('LSTM', 0)} fused LSTM")
            + " with state, no Loop)",
            f"ops: {ops}",
            f"parity: {self.parity.describe()}",
            f"state: {self.state.describe()}",
        ] + ([_describe_quantization(self.quantization)] if self.quantization else []))


# ---- pieces --------------------------------------------------------------------------------

def _load_keras_model(path: Path):
    """The saved Keras model at ``path``; ``ValueError`` naming it when it cannot be read
    (Keras itself says "File not found" for a file that exists but is truncated)."""
    import zipfile

    import keras

    try:
        complete = zipfile.is_zipfile(path)
    except OSError as exc:
        raise InvalidArgumentError(f"{path} is unreadable: {exc.strerror or exc}") from None
    if not complete:
        raise InvalidArgumentError(f"{path} is unreadable: not a complete .keras (zip) file, perhaps "
                         "truncated; retrain or restore it")
    try:
        return keras.saving.load_model(path)
    except Exception as exc:  # Keras raises many types for damaged archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(f"{path} is unreadable as a Keras model ({first}); retrain or "
                         "restore it") from None


def _load_run(run: RunDir):
    """(config, vocab, keras model) of a run directory; ``ValueError`` if it is not one."""
    import lmonnx.train  # noqa: F401  (registers LanguageModel with Keras)

    config = run.read_config()
    vocab = Vocabulary.load(run.file(VOCAB_FILE))
    model = _load_keras_model(run.file(MODEL_FILE))
    if getattr(model, "vocab_size", None) != len(vocab):
        raise InvalidArgumentError(f"{run.path}: {MODEL_FILE} has {getattr(model, 'vocab_size', '?')} "
                         f"outputs but {VOCAB_FILE} holds {len(vocab)} tokens; the run "
                         "directory is inconsistent")
    return config, vocab, model


def convert(model, opset: int = DEFAULT_OPSET):
    """tf2onnx ModelProto of ``model.inference_model()`` in format 2: inputs ``input_ids``
    int32 [batch, time], ``state_h``/``state_c`` float32 [layers, batch, units]; outputs
    ``logits`` float32 [batch, time, vocab_size], ``state_h_out``/``state_c_out``."""
    import tensorflow as tf
    import tf2onnx

    inference = model.inference_model()
    state = (model.num_lstm_layers, None, model.num_lstm_units)
    spec = (tf.TensorSpec((None, None), tf.int32, name=INPUT_NAME),
            tf.TensorSpec(state, tf.float32, name=STATE_INPUTS[0]),
            tf.TensorSpec(state, tf.float32, name=STATE_INPUTS[1]))

    @tf.function(input_signature=spec)
    def lm(input_ids, state_h, state_c):
        # Keras holds the state [batch, layers, units]; the artifact [layers, batch, units],
        # the layout of the ONNX LSTM's own initial_h / Y_h.
        logits, h, c = inference([input_ids, tf.transpose(state_h, [1, 0, 2]),
                                  tf.transpose(state_c, [1, 0, 2])], training=False)
        return {OUTPUT_NAME: logits, STATE_OUTPUTS[0]: tf.transpose(h, [1, 0, 2]),
                STATE_OUTPUTS[1]: tf.transpose(c, [1, 0, 2])}

    proto, _ = tf2onnx.convert.from_function(lm, input_signature=spec, opset=opset)
    _wire_sequence_lengths(proto)
    _name_dynamic_axes(proto)
    return proto


LENGTHS = "lmonnx_sequence_lens"


def _wire_sequence_lengths(proto) -> None:
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


def _name_dynamic_axes(proto) -> None:
    """tf2onnx calls the dynamic axes ``unk__N``; call them ``batch`` and ``time``."""
    graph = proto.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    if set(inputs) != {INPUT_NAME, *STATE_INPUTS} or set(outputs) != {OUTPUT_NAME, *STATE_OUTPUTS}:
        raise ExportError(f"tf2onnx named the graph's inputs {sorted(inputs)} and outputs "
                          f"{sorted(outputs)}, not the lmonnx format {FORMAT_VERSION} names")
    axes = {INPUT_NAME: ("batch", "time"), OUTPUT_NAME: ("batch", "time")}
    axes.update({name: (None, "batch") for name in (*STATE_INPUTS, *STATE_OUTPUTS)})
    rename = {}
    for name, value in {**inputs, **outputs}.items():
        dims = value.type.tensor_type.shape.dim
        for dim, axis_name in zip(dims, axes[name]):
            if axis_name is None:
                continue
            if dim.HasField("dim_value"):
                raise ExportError(f"{name} axis {axis_name} is fixed at {dim.dim_value}, "
                                  "expected a dynamic axis")
            rename[dim.dim_param] = axis_name
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _check_graph(proto, num_layers: int) -> dict[str, int]:
    import onnx

    counts = Counter(node.op_type for node in proto.graph.node)
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
    return dict(counts)


def _corpus_paths(config: dict) -> list[Path]:
    """The run's validation and training corpora that are files (not standard input)."""
    return [Path(p) for p in (config.get("valid"), config.get("corpus"))
            if p and p != STDIN_CORPUS]


def _sample_examples(config: dict, vocab: Vocabulary, sample, limit: int):
    """Up to ``limit`` sentences as :class:`~lmonnx.examples.Example` objects (the one example
    builder), and where they came from."""
    errors = config.get("errors", "strict")
    builder = ExampleBuilder(vocab)
    candidates = [Path(sample)] if sample is not None else _corpus_paths(config)
    for path in candidates:
        if sample is None and not path.is_file():
            continue
        examples = list(builder.build_all(islice(read_sentences(path, errors), limit)))
        if examples:
            return examples, path.name
        if sample is not None:
            raise InvalidArgumentError(f"{path}: no sentences to check the export on")
    # The corpora moved away: random words still exercise every weight of the graph.
    rng = np.random.default_rng(0)
    words = vocab.tokens[len(SPECIAL_TOKENS):]
    lines = [to_line(i, " ".join(words[j] for j in rng.integers(0, len(words),
                                                                size=rng.integers(1, 40))))
             for i in range(min(limit, 64))]
    return list(builder.build_all(lines)), "random words (the run's corpora were not found)"


def check_parity(model, session, examples, source: str, *, max_tokens: int = 4096,
                 max_batch_size: int = 32) -> ParityReport:
    """Compare the onnxruntime model in ``session`` (a :class:`lmonnx.runtime.ModelSession`)
    with the Keras ``model`` on bucketed batches of ``examples``: logits at real positions,
    and the masked loss of Keras ``calculate_loss`` against the NLL that evaluation computes
    (``lmonnx.evaluate.score_batch``, summed)."""
    from lmonnx.evaluate import score_batch

    items = [(ex.key, ex.inputs, ex.targets) for ex in examples]
    max_diff, loss_k, loss_o, worst_rel, tokens, n_batches, sentences = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for batch in bucketed_batches(items, max_tokens=max_tokens, max_batch_size=max_batch_size):
        lstm_outputs, binary = model.run_lstm(batch.inputs, training=False)
        keras_logits = model.get_logits(lstm_outputs).numpy()
        keras_loss = float(model.calculate_loss(lstm_outputs, binary, batch.targets))
        onnx_logits = session.logits(batch.inputs)
        if onnx_logits.shape != keras_logits.shape:
            raise ExportError(f"onnxruntime logits have shape {onnx_logits.shape}, Keras "
                              f"{keras_logits.shape}")
        real = batch.mask > 0
        diff = np.abs(onnx_logits[real] - keras_logits[real])
        max_diff = max(max_diff, float(diff.max()) if not np.isnan(diff).any() else math.inf)
        onnx_loss = math.fsum(r.nll for r in score_batch(session, batch))
        rel = (abs(onnx_loss - keras_loss) / abs(keras_loss) if keras_loss
               else (0.0 if onnx_loss == 0.0 else math.inf))
        worst_rel = max(worst_rel, rel if math.isfinite(rel) else math.inf)
        loss_k += keras_loss
        loss_o += onnx_loss
        tokens += batch.tokens
        sentences += len(batch)
        n_batches += 1
    return ParityReport(source, sentences, tokens, n_batches, max_diff, loss_k, loss_o, worst_rel)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_output(output: Path, force: bool, inputs: dict[Path, str] | None = None,
                  run: RunDir | None = None) -> None:
    """Refuse, in one line, an output that is a directory, one of the command's ``inputs``
    (path -> what it is) or a run-file name inside ``run`` (both whatever ``force`` says), or
    an existing file without ``force``."""
    if output.is_dir():
        raise InvalidArgumentError(f"-o {output} is a directory; give a file name such as {output}/model.onnx")
    for path, what in (inputs or {}).items():
        if _same_file(output, path):
            raise InvalidArgumentError(f"-o {output} is an input of this export ({what}); lmonnx never "
                             "overwrites it, even with --force: choose another file")
    if run is not None and _run_name_in(output, run.path):
        raise InvalidArgumentError(f"-o {output} would put a file named like the run's own files into "
                         f"the run directory {run.path}; choose another name, such as "
                         f"{output.parent / 'model.onnx'}")
    if (output.exists() or output.is_symlink()) and not force:
        raise FileExistsError(f"{output} already exists; pass --force to overwrite it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist")


def _run_name_in(output: Path, run_path: Path) -> bool:
    """Whether ``output`` is a path in the run directory with a name that a run creates
    (``checkpoint-7.npz`` too, before it exists)."""
    try:
        return is_run_file_name(output.name) and output.parent.resolve() == run_path.resolve()
    except OSError:
        return False


def _inputs(run: RunDir, config: dict | None, sample) -> dict[Path, str]:
    """Every file this export reads or that belongs to the run: none may be its output."""
    inputs = {path: f"the run's {path.name}" for path in run.input_files()}
    for path in _corpus_paths(config or {}):
        inputs.setdefault(path, f"the run's corpus {path.name}")
    if sample is not None:
        inputs.setdefault(Path(sample), "the --sample text")
    return inputs


# ---- the command ---------------------------------------------------------------------------

@dataclass
class StateReport:
    """The stateful graph checked on sample batches: halves vs one pass, rows vs alone."""

    batches: int
    max_halves_loss_rel_diff: float
    max_row_state_abs_diff: float

    @property
    def ok(self) -> bool:
        checks = ((self.max_halves_loss_rel_diff, LOSS_RTOL),
                  (self.max_row_state_abs_diff, STATE_ATOL))
        return all(value <= limit for value, limit in checks)  # NaN fails too

    def describe(self) -> str:
        return (f"two halves carrying the state vs one pass: loss rel diff "
                f"{self.max_halves_loss_rel_diff:.2e} (limit {LOSS_RTOL:.0e}); a row's state in "
                f"a padded batch vs alone: {self.max_row_state_abs_diff:.2e} (limit "
                f"{STATE_ATOL:.0e}); {self.batches} batches")


def check_state(session, examples, *, max_tokens: int = 4096,
                max_batch_size: int = 32) -> StateReport:
    """The stateful contract on bucketed batches of ``examples``, through ``session`` (a
    :class:`lmonnx.runtime.ModelSession`): (1) the batch cut in two halves of time, the state
    carried from the first into the second, gives the loss of one pass; (2) each row's
    returned state in the padded batch equals the state it gets alone."""
    from lmonnx.xent import masked_cross_entropy

    items = [(ex.key, ex.inputs, ex.targets) for ex in examples]
    worst_halves, worst_state, n = 0.0, 0.0, 0
    for batch in bucketed_batches(items, max_tokens=max_tokens, max_batch_size=max_batch_size):
        logits, (h, c) = session.run(batch.inputs)
        whole = masked_cross_entropy(logits, batch.targets, batch.mask)
        cut = max(1, batch.inputs.shape[1] // 2)
        first, state = session.run(batch.inputs[:, :cut])
        second, _ = session.run(batch.inputs[:, cut:], state)
        halves = (masked_cross_entropy(first, batch.targets[:, :cut], batch.mask[:, :cut])
                  + masked_cross_entropy(second, batch.targets[:, cut:], batch.mask[:, cut:]))
        if batch.inputs.shape[1] > cut:  # rows that end in the first half keep their state
            worst_halves = max(worst_halves, abs(halves - whole) / abs(whole) if whole else 0.0)
        for r in range(len(batch)):
            n_r = int(batch.lengths[r])
            _, (h_r, c_r) = session.run(batch.inputs[r:r + 1, :n_r])
            worst_state = max(worst_state, float(np.abs(h_r[:, 0] - h[:, r]).max()),
                              float(np.abs(c_r[:, 0] - c[:, r]).max()))
        n += 1
    return StateReport(n, worst_halves, worst_state)


def export_run(run_dir, output, opset: int | None = None, force: bool = False, *,
               sample=None, max_sentences: int = SAMPLE_SENTENCES, verbose: bool = True,
               quantize: str | None = None, max_change: float | None = None) -> ExportReport:
    """Convert the run in ``run_dir`` to ``output`` (.onnx), check it, write it atomically.

    ``sample``: a text file whose first ``max_sentences`` sentences check parity (default:
    the run's validation corpus, else its training corpus).  Raises ``ValueError`` for a
    ``run_dir`` that is not a run or an ``output`` that is one of the run's files, its corpora
    or ``sample`` (whatever ``force`` says), ``FileExistsError`` for another existing
    ``output`` without ``force``, and ``ExportError`` (a ``ValueError``) when a check fails;
    nothing is written then.
    """
    if quantize not in (None, "int8"):
        raise InvalidArgumentError(f"quantize must be None or 'int8', got {quantize!r}")
    if max_change is not None and quantize is None:
        raise InvalidArgumentError("--max-change bounds what int8 may cost: it needs --quantize int8")
    run, output = RunDir(run_dir), Path(output)
    opset = DEFAULT_OPSET if opset is None else opset
    # The cheap checks first, before TensorFlow starts.
    try:
        config = run.read_config()
    except ValueError:
        config = None  # require_model says why, after the output's own checks
    inputs = _inputs(run, config, sample)
    _check_output(output, force, inputs, run)
    run.require_model()
    _check_opset(opset)
    config, vocab, model = _load_run(run)

    proto = convert(model, opset)
    op_counts = _check_graph(proto, model.num_lstm_layers)
    props = metadata_props(vocab, {k: config[k] for k in (
        "vocab_size", "max_length", "num_lstm_units", "num_lstm_layers", "embedding_dim",
        "dropout")}, run.training_record(config))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = ("lmonnx stacked-LSTM word language model (input_ids, state_h, state_c "
                        "-> logits, state_h_out, state_c_out)")
    data = proto.SerializeToString()

    # Validate the bytes about to be written through the session code that users run.
    from lmonnx.runtime import ModelSession

    session = ModelSession(data, providers="cpu", name=f"{output} (being exported)")
    examples, source = _sample_examples(config, vocab, sample, max_sentences)
    parity = check_parity(model, session, examples, source)
    if not parity.ok:
        raise ExportError(f"export failed its parity check, nothing written: {parity.describe()}")
    state = check_state(session, examples)
    if not state.ok:
        raise ExportError(f"export failed its state check, nothing written: {state.describe()}")

    quantization = None
    if quantize == "int8":
        from lmonnx.quantize import DEFAULT_MAX_CHANGE, quantize_checked

        data, quantization = quantize_checked(
            data, examples, source, force=force, name=str(output),
            max_change=DEFAULT_MAX_CHANGE if max_change is None else max_change)
        import onnx

        op_counts = dict(Counter(n.op_type for n in onnx.load_from_string(data).graph.node))

    _check_output(output, force, inputs, run)  # it may have appeared during the conversion
    write_atomic(output, data)
    report = ExportReport(output, len(data), opset, op_counts, parity, state, props,
                          quantization)
    if verbose:
        print(report.summary())
    return report


def _check_opset(opset) -> None:
    import lmonnx.train  # noqa: F401  (quiet TensorFlow start-up before tf2onnx imports it)
    import tf2onnx.constants

    highest = max(tf2onnx.constants.OPSET_TO_IR_VERSION)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise InvalidArgumentError(f"--opset must be an integer from {MIN_OPSET} to {highest} "
                         f"(tf2onnx's newest); got {opset!r}")
