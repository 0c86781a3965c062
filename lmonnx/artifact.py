"""The exported artifact's contract: names, metadata keys and their JSON payloads.

One ``.onnx`` file (ARCHITECTURE.md, "The artifact"):

  format 1 (stateless)  input_ids int32 [batch, time] -> logits float32 [batch, time, vocab]
  format 2 (stateful)   + state_h, state_c float32 [layers, batch, units] in (zeros: start of
                        a sentence) and state_h_out, state_c_out out: the state after each
                        row's last real (non-padding) position

``metadata_props`` carry, as JSON strings:

  lmonnx.format_version  "1" or "2"
  lmonnx.vocab           list of tokens in id order (ids 0..3 are <pad> <unk> <s> </s>)
  lmonnx.config          model shape, tokenizer preset and options, max length
  lmonnx.training        corpus name, epochs, validation perplexity, ...
  lmonnx.quantization    (int8 files only) method, options, perplexity change measured at export

Export writes these (``metadata_props``); runtime reads them back (``parse_metadata``) from
onnxruntime's ``custom_metadata_map`` or onnx's ``metadata_props``: no TensorFlow here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmonnx.errors import ArtifactError, InvalidArgumentError
from lmonnx.vocab import TokenizerOptions, Vocabulary

FORMAT_VERSION = "2"
"""What ``lmonnx export`` writes."""
READABLE_FORMATS = ("1", "2")
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
STATE_INPUTS = ("state_h", "state_c")
STATE_OUTPUTS = ("state_h_out", "state_c_out")

KEY_FORMAT = "lmonnx.format_version"
KEY_VOCAB = "lmonnx.vocab"
KEY_CONFIG = "lmonnx.config"
KEY_TRAINING = "lmonnx.training"
KEY_QUANTIZATION = "lmonnx.quantization"




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
    """The ``metadata_props`` key -> JSON string map that export writes into the model."""
    if format_version not in READABLE_FORMATS:
        raise InvalidArgumentError(f"unknown lmonnx format version {format_version!r}")
    config = dict(config)
    config["tokenizer"] = vocab.options.to_dict()
    config["vocab_size"] = len(vocab)
    return {
        KEY_FORMAT: format_version,
        KEY_VOCAB: json.dumps(list(vocab.tokens), ensure_ascii=False),
        KEY_CONFIG: json.dumps(config, sort_keys=True),
        KEY_TRAINING: json.dumps(dict(training), sort_keys=True),
    }


def parse_metadata(props: Mapping[str, str], source: str) -> ArtifactMetadata:
    """Read ``metadata_props`` back; ``ArtifactError`` naming ``source`` when they are unusable."""
    if KEY_FORMAT not in props or KEY_VOCAB not in props or KEY_CONFIG not in props:
        raise ArtifactError(
            f"{source} is an ONNX model without lmonnx metadata (no {KEY_VOCAB}/{KEY_CONFIG}); "
            "export it with `lmonnx export`")
    version = props[KEY_FORMAT]
    if version not in READABLE_FORMATS:
        raise ArtifactError(
            f"{source} has lmonnx format version {version!r}; this lmonnx reads "
            f"{' and '.join(READABLE_FORMATS)} (a newer lmonnx wrote it?)")
    try:
        tokens = json.loads(props[KEY_VOCAB])
        config = json.loads(props[KEY_CONFIG])
        training = json.loads(props.get(KEY_TRAINING, "{}"))
        quantization = json.loads(props[KEY_QUANTIZATION]) if KEY_QUANTIZATION in props else None
        options = TokenizerOptions.from_dict(config["tokenizer"])
        vocab = Vocabulary(tokens, options)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{source} has corrupt lmonnx metadata: {exc}") from None
    if config.get("vocab_size") != len(vocab):
        raise ArtifactError(
            f"{source}: config says vocab_size={config.get('vocab_size')} but the vocabulary "
            f"holds {len(vocab)} tokens")
    return ArtifactMetadata(vocab=vocab, config=config, training=training,
                            format_version=version, quantization=quantization)
