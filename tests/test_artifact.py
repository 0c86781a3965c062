"""The artifact's metadata: written with onnx's set_model_props, read back strictly: format 1
and broken configs are refused in one line naming the file (and the key)."""

import json

import pytest
from lmonnx._testing import build_random_lm, make_vocab

onnx = pytest.importorskip("onnx")

from lmonnx.artifact import (KEY_CONFIG, KEY_QUANTIZATION, metadata_props,  # noqa: E402
                             model_props, parse_metadata, write_metadata)
from lmonnx.cli import main  # noqa: E402
from lmonnx.errors import ArtifactError  # noqa: E402

VOCAB = make_vocab(["a", "b", "c"])
SHAPE = dict(vocab_size=7, max_length=35, num_lstm_units=4, num_lstm_layers=1,
             embedding_dim=2, dropout=0.0)


def test_write_metadata_replaces_the_props():
    proto = onnx.ModelProto()
    proto.metadata_props.add(key="stale", value="x")
    props = metadata_props(VOCAB, SHAPE, {"corpus": "c.txt"})
    write_metadata(proto, props, quantization={"method": "m"})
    assert model_props(proto) == {**props, KEY_QUANTIZATION: '{"method": "m"}'}
    meta = parse_metadata(model_props(proto), "m.onnx")
    assert meta.vocab == VOCAB and meta.config["num_lstm_units"] == 4
    assert meta.quantization == {"method": "m"} and meta.training == {"corpus": "c.txt"}


def test_format_1_is_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "old.onnx"
    build_random_lm(path, make_vocab(["a", "b"]), stateful=False)
    assert main(["score", "a b", "--model", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmonnx: error: {path} ")
    assert err[0].endswith("re-export this model")
    with pytest.raises(ArtifactError, match=r"format-1 .*re-export this model$"):
        parse_metadata(metadata_props(VOCAB, SHAPE, {}, format_version="1"), "old.onnx")


@pytest.mark.parametrize("key", ["num_lstm_units", "num_lstm_layers", "max_length", "dropout"])
def test_a_null_in_the_config_names_the_file_and_the_key(key):
    props = metadata_props(VOCAB, {**SHAPE, key: None}, {})
    with pytest.raises(ArtifactError, match=rf"^m\.onnx: {KEY_CONFIG} has null for '{key}'"):
        parse_metadata(props, "m.onnx")


def test_a_null_in_a_model_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    build_random_lm(path, VOCAB)
    proto = onnx.load(str(path))
    props = model_props(proto)
    config = json.loads(props[KEY_CONFIG])
    config["num_lstm_layers"] = None
    write_metadata(proto, {**props, KEY_CONFIG: json.dumps(config)})
    onnx.save(proto, str(path))
    assert main(["score", "a b", "--model", str(path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lmonnx: error: {path}: {KEY_CONFIG} has null for 'num_lstm_layers'; re-export this model"]


@pytest.mark.parametrize("value", ["4", 0, True, 2.5])
def test_a_shape_entry_must_be_a_positive_integer(value):
    props = metadata_props(VOCAB, {**SHAPE, "num_lstm_units": value}, {})
    with pytest.raises(ArtifactError, match="'num_lstm_units' must be a positive integer"):
        parse_metadata(props, "m.onnx")
