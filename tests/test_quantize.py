"""int8 models: quantization keeps the metadata and records what it cost, refuses a change
over the bound, never writes over its input, and is refused on CUDA in one line."""

import json

import numpy as np
import pytest
from lmonnx._testing import build_random_lm, make_vocab

pytest.importorskip("onnx")

import onnx  # noqa: E402

from lmonnx import Scorer  # noqa: E402
from lmonnx import runtime  # noqa: E402
from lmonnx.artifact import KEY_QUANTIZATION  # noqa: E402
from lmonnx.cli import main  # noqa: E402
from lmonnx.errors import ProviderError  # noqa: E402
from lmonnx.runtime import ModelSession  # noqa: E402

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "fp32.onnx"
    build_random_lm(path, make_vocab(WORDS), units=32, layers=2, seed=1)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant_text") / "sample.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 25)))
                              for _ in range(300)) + "\n")
    return path


@pytest.fixture(scope="module")
def int8(fp32, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant_out") / "int8.onnx"
    assert main(["quantize", str(fp32), "-o", str(out), "--sample", str(text)]) == 0
    return out


def test_int8_graph_metadata_and_record(fp32, int8, text):
    graph_ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= graph_ops and "LSTM" not in graph_ops
    props = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    fp32_props = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    assert {k: props[k] for k in fp32_props} == fp32_props  # vocabulary, config, training kept
    record = json.loads(props[KEY_QUANTIZATION])
    session = ModelSession(int8, providers="cpu")
    assert session.quantization == record and session.stateful
    a = Scorer(fp32, providers="cpu").evaluate(text)
    b = Scorer(int8, providers="cpu").evaluate(text)
    assert record["perplexity_fp32"] == pytest.approx(a.perplexity, rel=1e-9)
    assert record["perplexity_int8"] == pytest.approx(b.perplexity, rel=1e-9)
    assert abs(record["perplexity_change"]) < 0.01 and (a.tokens, a.oovs) == (b.tokens, b.oovs)
    # the int8 model steps like its own full_scores, up to dynamic quantization: activations
    # are scaled per call, so a token's score moves slightly with what shares its call
    scorer = Scorer(int8, providers="cpu")
    state, stepped = scorer.begin(), []
    for word in ["w1", "w2", "w3", "</s>"]:
        logprob, state = scorer.step(state, word)
        stepped.append(logprob)
    full = [t.logprob for t in scorer.full_scores("w1 w2 w3")]
    assert stepped == pytest.approx(full, abs=2e-2)
    assert stepped == pytest.approx([t.logprob for t in Scorer(fp32, providers="cpu")
                                     .full_scores("w1 w2 w3")], abs=2e-2)


def test_a_change_over_the_bound_is_refused_unless_forced(fp32, text, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(fp32), "-o", str(out), "--sample", str(text),
                 "--max-change", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the 0% allowed; nothing written" in err[0]
    assert not out.exists()
    assert main(["quantize", str(fp32), "-o", str(out), "--sample", str(text),
                 "--max-change", "0", "--force"]) == 0
    assert out.exists()


def test_quantize_never_overwrites_its_input_or_requantizes(fp32, int8, tmp_path, capsys):
    before = fp32.read_bytes()
    assert main(["quantize", str(fp32), "-o", str(fp32), "--force"]) == 1
    assert "is the model being quantized" in capsys.readouterr().err
    assert fp32.read_bytes() == before
    assert main(["quantize", str(int8), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "already quantized" in capsys.readouterr().err


def test_without_a_sample_the_model_samples_its_own_sentences(fp32, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(fp32), "-o", str(out)]) == 0
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[KEY_QUANTIZATION])
    assert record["sample"] == "200 sentences sampled from the fp32 model"


def test_int8_on_cuda_fails_in_one_line(int8, monkeypatch, capsys):
    """Pretend CUDA is usable: the session reports CUDA, and the int8 model must refuse it
    (providers=cuda) or fall back to CPU with the reason (auto)."""
    monkeypatch.setattr(runtime, "cuda_unavailable_reason", lambda: None)
    real_open = ModelSession._open

    def fake_open(self, source, providers):
        real_open(self, source, [runtime.CPU])
        if runtime.CUDA in providers:
            self.provider = runtime.CUDA

    monkeypatch.setattr(ModelSession, "_open", fake_open)
    with pytest.raises(ProviderError, match="int8 model runs on CPU only"):
        ModelSession(int8, providers="cuda")
    session = ModelSession(int8, providers="auto")
    assert session.provider == runtime.CPU and not session.loss_head
    assert "int8 model runs on CPU only" in session.provider_note
    assert main(["evaluate", str(int8), "--model", str(int8), "--providers", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1


def test_export_quantize_flag_is_checked():
    from lmonnx.cli import _build_parser

    with pytest.raises(SystemExit):
        _build_parser().parse_args(["export", "run", "--quantize", "int4"])
