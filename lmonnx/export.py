"""``lmonnx export``: a training run -> one self-describing, self-validated ``.onnx`` file.

    RUN_DIR/model.keras --LanguageModel.inference_model()--> Embedding -> LSTM x L -> Dense
        (same weights, no mask: tf2onnx rewrites only unmasked Keras LSTMs into fused ONNX
         ``LSTM`` ops; a masked one becomes a ``Loop``)
      --tf2onnx.convert.from_function--> ModelProto   input_ids int32 [batch, time]
                                                       logits float32 [batch, time, vocab_size]
      + metadata_props (artifact.py): vocabulary, tokenizer, model shape, training record
      --check: fused LSTM ops and no Loop/Scan, onnx.checker--
      --parity on real sentences: onnxruntime vs the trained Keras model (the masked one):
            logits at real positions within LOGIT_ATOL, masked loss (the lmonnx kernel on the
            onnxruntime logits vs Keras ``calculate_loss``) within LOSS_RTOL--
      --write atomically: temp file in the output's directory, then os.replace--> model.onnx

Right padding is what makes dropping the mask exact: a causal LSTM's output at a real position
depends only on earlier (real) positions, and the kernel's mask skips the padded ones.
TensorFlow is imported inside the functions: this module is loaded only by ``lmonnx export``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmonnx.artifact import INPUT_NAME, OUTPUT_NAME, metadata_props
from lmonnx.atomic import write_atomic
from lmonnx.batching import bucketed_batches, make_pair
from lmonnx.corpus import read_sentences
from lmonnx.vocab import Vocabulary

DEFAULT_OPSET = 17
MIN_OPSET = 11
LOGIT_ATOL = 1e-4
"""Largest |ONNX logit - Keras logit| allowed at a real (unpadded) position."""
LOSS_RTOL = 1e-5
"""Largest |ONNX loss - Keras loss| / |Keras loss| allowed for any sample batch."""
SAMPLE_SENTENCES = 256
FORBIDDEN_OPS = ("Loop", "Scan")

__all__ = ["ExportError", "ExportReport", "export_run", "convert", "check_parity",
           "DEFAULT_OPSET", "LOGIT_ATOL", "LOSS_RTOL"]


class ExportError(ValueError):
    """The converted model failed a check (graph form or parity); nothing was written."""


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


@dataclass
class ExportReport:
    """What ``export_run`` wrote and how it checked it."""

    output: Path
    size_bytes: int
    opset: int
    op_counts: dict[str, int]
    parity: ParityReport
    metadata: dict[str, str] = field(repr=False, default_factory=dict)

    def summary(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(),
                                                          key=lambda kv: (-kv[1], kv[0])))
        return "\n".join([
            f"wrote {self.output} ({self.size_bytes / 1e6:.2f} MB, opset {self.opset}, "
            f"{self.op_counts.get('LSTM', 0)} fused LSTM, no Loop)",
            f"ops: {ops}",
            f"parity: {self.parity.describe()}",
        ])


# ---- pieces --------------------------------------------------------------------------------

RUN_FILES = ("config.json", "vocab.json", "model.keras")  # what trainer.py writes


def _check_run_files(run_dir: Path) -> None:
    """``ValueError`` unless ``run_dir`` holds a run with a saved model (no TensorFlow needed)."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not an lmonnx run directory (no such directory); "
                         "create one with `lmonnx train CORPUS --out DIR`")
    if not (run_dir / RUN_FILES[0]).is_file():
        raise ValueError(f"{run_dir} is not an lmonnx run directory (no {RUN_FILES[0]}); "
                         "create one with `lmonnx train CORPUS --out DIR`")
    for name in RUN_FILES[1:]:
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} is not a finished lmonnx run (no {name}; training "
                             "saves it after the first epoch)")


def _load_run(run_dir: Path):
    """(config, vocab, keras model) of a run directory; ``ValueError`` if it is not one."""
    from lmonnx.train.trainer import MODEL_FILE, VOCAB_FILE, load_run_config  # registers the model

    import keras

    config = load_run_config(run_dir)
    vocab = Vocabulary.load(run_dir / VOCAB_FILE)

    model = keras.saving.load_model(run_dir / MODEL_FILE)
    if model.vocab_size != len(vocab):
        raise ValueError(f"{run_dir}: model.keras has {model.vocab_size} outputs but vocab.json "
                         f"holds {len(vocab)} tokens; the run directory is inconsistent")
    return config, vocab, model


def convert(model, opset: int = DEFAULT_OPSET):
    """tf2onnx ModelProto of ``model.inference_model()``, with input ``input_ids`` int32
    [batch, time] and output ``logits`` float32 [batch, time, vocab_size]."""
    import tensorflow as tf
    import tf2onnx

    inference = model.inference_model()
    spec = (tf.TensorSpec((None, None), tf.int32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def lm(input_ids):
        return {OUTPUT_NAME: inference(input_ids, training=False)}

    proto, _ = tf2onnx.convert.from_function(lm, input_signature=spec, opset=opset)
    _name_dynamic_axes(proto)
    return proto


def _name_dynamic_axes(proto) -> None:
    """tf2onnx calls the dynamic axes ``unk__N``; call them ``batch`` and ``time``."""
    graph = proto.graph
    (inp,), (out,) = graph.input, graph.output
    if inp.name != INPUT_NAME or out.name != OUTPUT_NAME:
        raise ExportError(f"tf2onnx named the graph's input/output {inp.name!r}/{out.name!r}, "
                          f"not {INPUT_NAME!r}/{OUTPUT_NAME!r}")
    rename = {}
    for value in (inp, out):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", "time")):
            if dim.HasField("dim_value"):
                raise ExportError(f"{value.name} axis {name} is fixed at {dim.dim_value}, "
                                  "expected a dynamic axis")
            rename[dim.dim_param] = name
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
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the converted model fails onnx.checker: "
                          f"{str(exc).splitlines()[0]}") from None
    return dict(counts)


def _sample_pairs(config: dict, vocab: Vocabulary, sample, limit: int):
    """Up to ``limit`` whole sentences as (key, inputs, targets), and where they came from."""
    errors = config.get("errors", "strict")
    candidates = [Path(sample)] if sample is not None else [
        Path(p) for p in (config.get("valid"), config.get("corpus")) if p]
    for path in candidates:
        if sample is None and not path.is_file():
            continue
        pairs = []
        for lineno, line in read_sentences(path, errors):
            pairs.append((lineno, *make_pair(vocab.encode(line))))
            if len(pairs) >= limit:
                break
        if pairs:
            return pairs, path.name
        if sample is not None:
            raise ValueError(f"{path}: no sentences to check the export on")
    # The corpora moved away: random word ids still exercise every weight of the graph.
    rng = np.random.default_rng(0)
    pairs = [(i, *make_pair(rng.integers(4, len(vocab), size=rng.integers(1, 40))))
             for i in range(min(limit, 64))]
    return pairs, "random word ids (the run's corpora were not found)"


def check_parity(model, session, pairs, source: str, *, max_tokens: int = 4096,
                 max_batch_size: int = 32) -> ParityReport:
    """Compare onnxruntime ``session`` with the Keras ``model`` on bucketed batches of
    ``pairs``: logits at real positions, and the masked loss computed by Keras
    ``calculate_loss`` against the lmonnx kernel on the onnxruntime logits."""
    from lmonnx.xent import masked_cross_entropy

    max_diff, loss_k, loss_o, worst_rel, tokens, n_batches, sentences = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for batch in bucketed_batches(pairs, max_tokens=max_tokens, max_batch_size=max_batch_size):
        lstm_outputs, binary = model.run_lstm(batch.inputs, training=False)
        keras_logits = model.get_logits(lstm_outputs).numpy()
        keras_loss = float(model.calculate_loss(lstm_outputs, binary, batch.targets))
        onnx_logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch.inputs})[0]
        if onnx_logits.shape != keras_logits.shape:
            raise ExportError(f"onnxruntime logits have shape {onnx_logits.shape}, Keras "
                              f"{keras_logits.shape}")
        real = batch.mask > 0
        diff = np.abs(onnx_logits[real] - keras_logits[real])
        max_diff = max(max_diff, float(diff.max()) if not np.isnan(diff).any() else math.inf)
        onnx_loss = masked_cross_entropy(onnx_logits, batch.targets, batch.mask, reduction="sum")
        rel = (abs(onnx_loss - keras_loss) / abs(keras_loss) if keras_loss
               else (0.0 if onnx_loss == 0.0 else math.inf))
        worst_rel = max(worst_rel, rel if math.isfinite(rel) else math.inf)
        loss_k += keras_loss
        loss_o += onnx_loss
        tokens += batch.tokens
        sentences += len(batch)
        n_batches += 1
    return ParityReport(source, sentences, tokens, n_batches, max_diff, loss_k, loss_o, worst_rel)


def _training_record(run_dir: Path, config: dict) -> dict:
    from lmonnx.train.trainer import HISTORY_FILE

    record = {"corpus": Path(config["corpus"]).name if config.get("corpus") else None,
              "valid": Path(config["valid"]).name if config.get("valid") else None}
    train = config.get("train", {})
    for key in ("epochs", "batch_size", "learning_rate", "clipnorm", "dropout", "seed"):
        if key in train:
            record[key] = train[key]
    history_path = run_dir / HISTORY_FILE
    if history_path.is_file():
        import json

        history = json.loads(history_path.read_text(encoding="utf-8"))
        epochs = history.get("epochs", [])
        record["epochs_trained"] = len(epochs)
        best = history.get("best_epoch")
        if best:
            b = epochs[best - 1]
            record.update(best_epoch=best, train_loss=b.get("train_loss"),
                          valid_perplexity=b.get("valid_perplexity"),
                          valid_tokens=b.get("valid_tokens"))
    return record


def _check_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise ValueError(f"-o {output} is a directory; give a file name such as {output}/model.onnx")
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists; pass --force to overwrite it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist")


# ---- the command ---------------------------------------------------------------------------

def export_run(run_dir, output, opset: int | None = None, force: bool = False, *,
               sample=None, max_sentences: int = SAMPLE_SENTENCES,
               verbose: bool = True) -> ExportReport:
    """Convert the run in ``run_dir`` to ``output`` (.onnx), check it, write it atomically.

    ``sample``: a text file whose first ``max_sentences`` sentences check parity (default:
    the run's validation corpus, else its training corpus).  Raises ``ValueError`` for a
    ``run_dir`` that is not a run, ``FileExistsError`` for an existing ``output`` without
    ``force``, and ``ExportError`` (a ``ValueError``) when a check fails; nothing is written then.
    """
    run_dir, output = Path(run_dir), Path(output)
    opset = DEFAULT_OPSET if opset is None else opset
    _check_output(output, force)  # the cheap checks first, before TensorFlow starts
    _check_run_files(run_dir)
    _check_opset(opset)
    config, vocab, model = _load_run(run_dir)

    proto = convert(model, opset)
    op_counts = _check_graph(proto, model.num_lstm_layers)
    props = metadata_props(vocab, {k: config[k] for k in (
        "vocab_size", "max_length", "num_lstm_units", "num_lstm_layers", "embedding_dim",
        "dropout")}, _training_record(run_dir, config))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "lmonnx stacked-LSTM word language model (input_ids -> logits)"
    data = proto.SerializeToString()

    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    pairs, source = _sample_pairs(config, vocab, sample, max_sentences)
    parity = check_parity(model, session, pairs, source)
    if not parity.ok:
        raise ExportError(f"export failed its parity check, nothing written: {parity.describe()}")

    _check_output(output, force)  # it may have appeared during the conversion
    write_atomic(output, data)
    report = ExportReport(output, len(data), opset, op_counts, parity, props)
    if verbose:
        print(report.summary())
    return report


def _check_opset(opset) -> None:
    import lmonnx.train  # noqa: F401  (quiet TensorFlow start-up before tf2onnx imports it)
    import tf2onnx.constants

    highest = max(tf2onnx.constants.OPSET_TO_IR_VERSION)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ValueError(f"--opset must be an integer from {MIN_OPSET} to {highest} "
                         f"(tf2onnx's newest); got {opset!r}")
