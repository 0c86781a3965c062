"""``lmonnx export``: a training run -> one self-describing, self-validated ``.onnx`` file.

    RUN_DIR/model.keras --LanguageModel.inference_model()--> Embedding -> LSTM x L -> Dense
        (same weights, no mask: tf2onnx rewrites only unmasked Keras LSTMs into fused ONNX
         ``LSTM`` ops; a masked one becomes a ``Loop``; each layer's initial state is an input
         and its final state an output)
      --tf2onnx.convert.from_function--> ModelProto, format 2 (ARCHITECTURE.md)
      --graph.py: wire sequence_lens = sum(input_ids != 0) into every LSTM, name the dynamic
            axes, check: fused LSTMs with their state and lengths, no Loop/Scan, onnx.checker--
      + metadata (artifact.write_metadata): vocabulary, tokenizer, model shape, training record
      --verify.py, on sample sentences cut into training windows, through the session users
            run: parity with Keras, the state contract--
      [--quantize int8: quantize.py, checked by the perplexity it costs]
      --write (atomic.output_file: atomic for a file, through a FIFO or /dev/stdout)--> .onnx

Right padding is what makes dropping the mask exact: a causal LSTM's output at a real position
depends only on earlier (real) positions, and the kernel's mask skips the padded ones.
The run directory is read through ``lmonnx.rundir``.  Outputs follow ``atomic.check_outputs``:
no write replaces one of the command's inputs -- the run's files, its corpora, the sample
text -- with or without ``--force``, nor a directory.  Progress goes to a caller's callback
(the CLI prints it on a terminal); the library prints nothing.
TensorFlow is imported inside the functions: this module is loaded only by ``lmonnx export``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np

from lmonnx.artifact import (FACTORED_FORMAT, FORMAT_VERSION, HEAD_OUTPUT, HIDDEN_OUTPUT,
                             INPUT_NAME, OUTPUT_NAME, STATE_INPUTS, STATE_OUTPUTS,
                             metadata_props, write_metadata)
from lmonnx.atomic import check_outputs, output_file
from lmonnx.corpus import read_sentences, to_line
from lmonnx.errors import ExportError, InvalidArgumentError, OutputError
from lmonnx.examples import ExampleBuilder
from lmonnx.graph import (add_tail_weights, check_graph, name_dynamic_axes, op_counts,
                          tie_output_matrix, wire_sequence_lengths)
from lmonnx.rundir import MODEL_FILE, STDIN_CORPUS, VOCAB_FILE, RunDir, is_run_file_name
from lmonnx.verify import (LOGIT_ATOL, LOSS_RTOL, ParityReport, StateReport, check_parity,
                           check_state)
from lmonnx.validation import check_int
from lmonnx.vocab import SPECIAL_TOKENS, Vocabulary

DEFAULT_OPSET = 17
MIN_OPSET = 11
SAMPLE_SENTENCES = 256
MODEL_CONFIG_KEYS = ("vocab_size", "max_length", "num_lstm_units", "num_lstm_layers",
                     "embedding_dim", "dropout")

__all__ = ["ExportError", "ExportReport", "export_run", "convert", "check_parity", "check_state",
           "DEFAULT_OPSET", "LOGIT_ATOL", "LOSS_RTOL"]


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
        from lmonnx.quantize import describe

        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(),
                                                          key=lambda kv: (-kv[1], kv[0])))
        lstm = (f"{self.op_counts.get('DynamicQuantizeLSTM', 0)} int8 DynamicQuantizeLSTM"
                if self.quantization else f"{self.op_counts.get('LSTM', 0)} fused LSTM")
        return "\n".join([
            f"wrote {self.output} ({self.size_bytes / 1e6:.2f} MB, lmonnx format "
            f"{self.metadata.get('lmonnx.format_version', '?')}, opset {self.opset}, "
            f"{lstm} with state, no Loop)",
            f"ops: {ops}",
            f"parity: {self.parity.describe()}",
            f"state: {self.state.describe()}",
        ] + ([describe(self.quantization)] if self.quantization else []))


# ---- reading the run and converting it --------------------------------------------------------

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
    import lmonnx.train.model  # noqa: F401  (registers LanguageModel with Keras)
    import lmonnx.train.tied  # noqa: F401  (registers TiedLanguageModel)

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
    ``logits`` float32 [batch, time, vocab_size], ``state_h_out``/``state_c_out``.  A factored
    model's is format 3: ``head_logits`` and ``hidden`` instead of ``logits``, and the tail
    clusters' weights as initializers (``lmonnx.artifact.FACTORED_FORMAT``)."""
    import tensorflow as tf
    import tf2onnx

    inference = model.inference_model()
    state = (model.num_lstm_layers, None, model.num_lstm_units)
    spec = (tf.TensorSpec((None, None), tf.int32, name=INPUT_NAME),
            tf.TensorSpec(state, tf.float32, name=STATE_INPUTS[0]),
            tf.TensorSpec(state, tf.float32, name=STATE_INPUTS[1]))

    factored = is_factored(model)
    scores = (HEAD_OUTPUT, HIDDEN_OUTPUT) if factored else (OUTPUT_NAME,)

    @tf.function(input_signature=spec)
    def lm(input_ids, state_h, state_c):
        # Keras holds the state [batch, layers, units]; the artifact [layers, batch, units],
        # the layout of the ONNX LSTM's own initial_h / Y_h.
        *outputs, h, c = inference([input_ids, tf.transpose(state_h, [1, 0, 2]),
                                    tf.transpose(state_c, [1, 0, 2])], training=False)
        return {**dict(zip(scores, outputs)), STATE_OUTPUTS[0]: tf.transpose(h, [1, 0, 2]),
                STATE_OUTPUTS[1]: tf.transpose(c, [1, 0, 2])}

    proto, _ = tf2onnx.convert.from_function(lm, input_signature=spec, opset=opset)
    wire_sequence_lengths(proto)
    name_dynamic_axes(proto)
    if factored:
        add_tail_weights(proto, model.output_layer.tail_weights())
    else:
        tie_output_matrix(proto)
    return proto


def is_factored(model) -> bool:
    """Whether a Keras model has the factored output layer (exported as format 3)."""
    return getattr(model, "softmax", "full") == "adaptive"


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


def _inputs(run: RunDir, config: dict | None, sample) -> list[Path]:
    """Every file this export reads or that belongs to the run: none may be its output."""
    return [*run.input_files(), *_corpus_paths(config or {}),
            *([Path(sample)] if sample is not None else [])]


def _check_output(output: Path, force: bool, inputs: list[Path], run: RunDir) -> None:
    """The one output policy (``atomic.check_outputs``), plus a name the run would create
    inside the run directory (``checkpoint-7.npz`` before it exists)."""
    if _run_name_in(output, run.path):
        raise OutputError(f"-o {output} would put a file named like the run's own files into "
                          f"the run directory {run.path}; choose another name, such as "
                          f"{output.parent / 'model.onnx'}")
    check_outputs({"-o": output}, inputs, force=force)


def _run_name_in(output: Path, run_path: Path) -> bool:
    """Whether ``output`` is a path in the run directory with a name that a run creates
    (``checkpoint-7.npz`` too, before it exists)."""
    try:
        return is_run_file_name(output.name) and output.parent.resolve() == run_path.resolve()
    except OSError:
        return False


# ---- the command -------------------------------------------------------------------------

def _converted(model, run: RunDir, config: dict, vocab: Vocabulary, opset: int):
    """(serialized checked model with its metadata, op counts, metadata props)."""
    proto = convert(model, opset)
    counts = check_graph(proto, model.num_lstm_layers)
    shape = {k: config[k] for k in MODEL_CONFIG_KEYS}
    if is_factored(model):
        shape.update(softmax="adaptive", cutoffs=list(model.cutoffs),
                     tie_tails=bool(getattr(model, "tie_tails", False)))
    props = metadata_props(vocab, shape, run.training_record(config),
                           FACTORED_FORMAT if is_factored(model) else FORMAT_VERSION)
    write_metadata(proto, props)
    outputs = "head_logits, hidden" if is_factored(model) else "logits"
    proto.doc_string = ("lmonnx stacked-LSTM word language model (input_ids, state_h, state_c "
                        f"-> {outputs}, state_h_out, state_c_out)")
    return proto.SerializeToString(), counts, props


def _verified(model, data: bytes, examples, source: str, output: Path, window: int):
    """(parity, state) of the serialized model through ``ModelSession``; ``ExportError``
    when either check fails."""
    from lmonnx.runtime import ModelSession

    session = ModelSession(data, providers="cpu", name=f"{output} (being exported)")
    parity = check_parity(model, session, examples, source, window=window)
    if not parity.ok:
        raise ExportError(f"export failed its parity check, nothing written: {parity.describe()}")
    state = check_state(session, examples, window=window)
    if not state.ok:
        raise ExportError(f"export failed its state check, nothing written: {state.describe()}")
    return parity, state


def _quantized(data: bytes, examples, source: str, output: Path, force: bool,
               max_change: float | None, progress):
    """(int8 bytes, quantization record, op counts) of the checked fp32 ``data``."""
    import onnx

    from lmonnx.quantize import DEFAULT_MAX_CHANGE, quantize_checked

    data, record = quantize_checked(
        data, examples, source, force=force, name=str(output),
        max_change=DEFAULT_MAX_CHANGE if max_change is None else max_change, progress=progress)
    return data, record, op_counts(onnx.load_from_string(data))


def _check_quantize_options(quantize, max_change) -> None:
    if quantize not in (None, "int8"):
        raise InvalidArgumentError(f"quantize must be None or 'int8', got {quantize!r}")
    if max_change is not None and quantize is None:
        raise InvalidArgumentError("--max-change bounds what int8 may cost: it needs --quantize int8")


def export_run(run_dir, output, opset: int | None = None, force: bool = False, *,
               sample=None, max_sentences: int = SAMPLE_SENTENCES,
               quantize: str | None = None, max_change: float | None = None,
               progress: Callable[[str], None] | None = None) -> ExportReport:
    """Convert the run in ``run_dir`` to ``output`` (.onnx, a FIFO or ``/dev/stdout`` too),
    check it, write it.  ``sample``: a text file whose first ``max_sentences`` sentences check
    it (default: the run's validation corpus, else its training corpus).  ``progress`` is
    called with a line before each stage.

    Raises ``RunDirError`` for a ``run_dir`` that is not a finished run, ``OutputError`` for an
    ``output`` that is one of the run's files, its corpora or ``sample`` (whatever ``force``
    says), ``FileExistsError`` for another existing ``output`` without ``force``, and
    ``ExportError`` when a check fails; nothing is written then.
    """
    _check_quantize_options(quantize, max_change)
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
    say = progress or (lambda message: None)
    say(f"loading {run.file(MODEL_FILE)}")
    config, vocab, model = _load_run(run)
    say(f"converting with tf2onnx (opset {opset})")
    data, counts, props = _converted(model, run, config, vocab, opset)
    examples, source = _sample_examples(config, vocab, sample, max_sentences)
    say(f"checking the model against Keras on {len(examples)} sentences of {source}")
    parity, state = _verified(model, data, examples, source, output, config["max_length"])
    quantization = None
    if quantize == "int8":
        data, quantization, counts = _quantized(data, examples, source, output, force,
                                                max_change, progress)
    _check_output(output, force, inputs, run)  # it may have appeared during the conversion
    with output_file(output, "-o", binary=True) as f:
        f.write(data)
    return ExportReport(output, len(data), opset, counts, parity, state, props, quantization)


def _check_opset(opset) -> None:
    import lmonnx.train.model  # noqa: F401  (quiet TensorFlow start-up before tf2onnx imports it)
    import tf2onnx.constants

    highest = max(tf2onnx.constants.OPSET_TO_IR_VERSION)
    check_int("--opset", opset, low=MIN_OPSET, high=highest, why="the highest is tf2onnx's newest")
