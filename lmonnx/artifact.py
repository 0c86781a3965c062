"""The exported artifact's contract: names, metadata keys and their JSON payloads.

One ``.onnx`` file (ARCHITECTURE.md, "The artifact"), format 2 (format 3, the factored
softmax's, below at ``FACTORED_FORMAT``):

  input_ids int32 [batch, time], state_h, state_c float32 [layers, batch, units] (zeros: the
  start of a sentence) -> logits float32 [batch, time, vocab], state_h_out, state_c_out (the
  state after each row's last real, non-padding, position)

Format 1 (stateless) was never released: reading one says "re-export this model".
``metadata_props`` carry, as JSON strings:

  lmonnx.format_version  "2"
  lmonnx.vocab           list of tokens in id order (ids 0..3 are <pad> <unk> <s> </s>)
  lmonnx.config          model shape, tokenizer preset and options, max length
  lmonnx.training        corpus name, epochs, validation perplexity, ...
  lmonnx.quantization    (int8 files only) method, options, perplexity change measured at export

Export and quantize write them into a ModelProto (``write_metadata``, onnx's
``set_model_props``); runtime reads them back (``parse_metadata``) from onnxruntime's
``custom_metadata_map``: no TensorFlow here, and onnx only when writing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmonnx.errors import ArtifactError
from lmonnx.vocab import TokenizerOptions, Vocabulary

FORMAT_VERSION = "2"
"""What ``lmonnx export`` writes for a full-softmax model."""
FACTORED_FORMAT = "3"
"""What it writes for a factored (``--softmax adaptive``) model: the outputs ``head_logits``
float32 [batch, time, c_0 + clusters] and ``hidden`` float32 [batch, time, units] replace
``logits``; the tail clusters' weights are initializers of the file named by
``lmonnx.factored.tail_names``, computed outside the graph for the positions that need them;
the config adds ``softmax: "adaptive"`` and ``cutoffs`` ``[c_0, ..., vocab_size]``."""
READABLE_FORMATS = (FORMAT_VERSION, FACTORED_FORMAT)
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
HEAD_OUTPUT = "head_logits"
HIDDEN_OUTPUT = "hidden"
STATE_INPUTS = ("state_h", "state_c")
STATE_OUTPUTS = ("state_h_out", "state_c_out")

KEY_FORMAT = "lmonnx.format_version"
KEY_VOCAB = "lmonnx.vocab"
KEY_CONFIG = "lmonnx.config"
KEY_TRAINING = "lmonnx.training"
KEY_QUANTIZATION = "lmonnx.quantization"

SHAPE_KEYS = ("vocab_size", "num_lstm_layers", "num_lstm_units")
"""Config entries every model must carry, positive integers (the runtime sizes the state)."""




@dataclass
class ArtifactMetadata:
    """What an lmonnx ``.onnx`` says about itself.

    config keys: vocab_size, max_length, num_lstm_units, num_lstm_layers, embedding_dim,
    dropout, tokenizer (a ``TokenizerOptions.to_dict()``).
    """

    vocab: Vocabulary
    config: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    quantization: dict[str, Any] | None = None


def metadata_props(vocab: Vocabulary, config: Mapping[str, Any],
                   training: Mapping[str, Any], format_version: str = FORMAT_VERSION,
                   ) -> dict[str, str]:
    """The ``metadata_props`` key -> JSON string map of a model (``format_version``: what the
    file claims; tests write other versions to check that they are refused)."""
    config = dict(config)
    config["tokenizer"] = vocab.options.to_dict()
    config["vocab_size"] = len(vocab)
    return {
        KEY_FORMAT: format_version,
        KEY_VOCAB: json.dumps(list(vocab.tokens), ensure_ascii=False),
        KEY_CONFIG: json.dumps(config, sort_keys=True),
        KEY_TRAINING: json.dumps(dict(training), sort_keys=True),
    }


def model_props(proto) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX ModelProto as a dict."""
    return {entry.key: entry.value for entry in proto.metadata_props}


def write_metadata(proto, props: Mapping[str, str], *,
                   quantization: Mapping[str, Any] | None = None) -> None:
    """Replace the ``metadata_props`` of the ModelProto ``proto`` with ``props``, plus the
    ``lmonnx.quantization`` record when given."""
    from onnx.helper import set_model_props

    props = dict(props)
    if quantization is not None:
        props[KEY_QUANTIZATION] = json.dumps(dict(quantization), sort_keys=True)
    set_model_props(proto, props)


def format_1_refused(source: str) -> str:
    """Why a format-1 (stateless) model is refused, said by its metadata or its graph."""
    return (f"{source} is a format-1 (stateless) lmonnx model, which this lmonnx no longer "
            "reads: re-export this model")


def _check_format(props: Mapping[str, str], source: str) -> None:
    if KEY_FORMAT not in props or KEY_VOCAB not in props or KEY_CONFIG not in props:
        raise ArtifactError(
            f"{source} is an ONNX model without lmonnx metadata (no {KEY_VOCAB}/{KEY_CONFIG}); "
            "export it with `lmonnx export`")
    version = props[KEY_FORMAT]
    if version == "1":
        raise ArtifactError(format_1_refused(source))
    if version not in READABLE_FORMATS:
        raise ArtifactError(
            f"{source} has lmonnx format version {version!r}; this lmonnx reads "
            f"{' and '.join(READABLE_FORMATS)} (a newer lmonnx wrote it?)")


def _check_config(config, source: str) -> None:
    """``ArtifactError`` naming ``source`` and the key for a config that is not an object, a
    null entry, or a model shape entry that is not a positive integer."""
    if not isinstance(config, dict):
        raise ArtifactError(f"{source}: {KEY_CONFIG} is not a JSON object")
    for key, value in config.items():
        if value is None:
            raise ArtifactError(f"{source}: {KEY_CONFIG} has null for {key!r}; re-export this model")
    for key in SHAPE_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArtifactError(f"{source}: {KEY_CONFIG} {key!r} must be a positive integer, "
                                f"got {value!r}; re-export this model")
    if "tokenizer" not in config:
        raise ArtifactError(f"{source}: {KEY_CONFIG} has no 'tokenizer'; re-export this model")


def _check_factored_config(config, source: str) -> None:
    cutoffs = config.get("cutoffs")
    if (config.get("softmax") != "adaptive" or not isinstance(cutoffs, list) or len(cutoffs) < 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs)
            or any(b <= a for a, b in zip(cutoffs, cutoffs[1:]))):
        raise ArtifactError(f"{source}: a format-{FACTORED_FORMAT} model needs {KEY_CONFIG} "
                            "softmax 'adaptive' and increasing integer cutoffs, got softmax "
                            f"{config.get('softmax')!r}, cutoffs {cutoffs!r}; re-export this "
                            "model")
    if cutoffs[-1] != config["vocab_size"]:
        raise ArtifactError(f"{source}: the cutoffs end at {cutoffs[-1]} entries but its "
                            f"lmonnx.vocab metadata holds {config['vocab_size']} tokens; the "
                            "metadata does not belong to this graph (re-export the model)")


def parse_metadata(props: Mapping[str, str], source: str) -> ArtifactMetadata:
    """Read ``metadata_props`` back; ``ArtifactError`` naming ``source`` when they are unusable."""
    _check_format(props, source)
    try:
        tokens = json.loads(props[KEY_VOCAB])
        config = json.loads(props[KEY_CONFIG])
        training = json.loads(props.get(KEY_TRAINING, "{}"))
        quantization = json.loads(props[KEY_QUANTIZATION]) if KEY_QUANTIZATION in props else None
    except ValueError as exc:
        raise ArtifactError(f"{source} has corrupt lmonnx metadata: {exc}") from None
    _check_config(config, source)
    try:
        vocab = Vocabulary(tokens, TokenizerOptions.from_dict(config["tokenizer"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{source} has corrupt lmonnx metadata: {exc}") from None
    if props[KEY_FORMAT] == FACTORED_FORMAT:
        _check_factored_config(config, source)
    if config["vocab_size"] != len(vocab):
        raise ArtifactError(
            f"{source}: config says vocab_size={config['vocab_size']} but the vocabulary "
            f"holds {len(vocab)} tokens")
    return ArtifactMetadata(vocab=vocab, config=config, training=training,
                            format_version=props[KEY_FORMAT], quantization=quantization)
