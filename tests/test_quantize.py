"""int8 models: quantization keeps the metadata and records what it cost, refuses a change
over the bound, never writes over its input, and is refused on CUDA in one line."""

import json

import numpy as np
import pytest
from lmonnx._testing import SOFTMAXES, build_random_lm, make_vocab, random_cutoffs
from output_checks import bytes_through_fifo, run_to_dev_stdout

pytest.importorskip("onnx")

import onnx  # noqa: E402

from lmonnx import Scorer  # noqa: E402
from lmonnx import runtime  # noqa: E402
from lmonnx.artifact import KEY_QUANTIZATION  # noqa: E402
from lmonnx.cli import main  # noqa: E402
from lmonnx.errors import ProviderError  # noqa: E402
from lmonnx.runtime import ModelSession  # noqa: E402

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module", params=SOFTMAXES)
def fp32(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "fp32.onnx"
    build_random_lm(path, make_vocab(WORDS), units=32, layers=2, seed=1,
                    cutoffs=random_cutoffs(request.param, len(WORDS) + 4))
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
    assert session.quantization == record
    a = Scorer(fp32, providers="cpu").evaluate(text)
    b = Scorer(int8, providers="cpu").evaluate(text)
    assert record["perplexity_fp32"] == pytest.approx(a.perplexity, rel=1e-9)
    assert record["perplexity_int8"] == pytest.approx(b.perplexity, rel=1e-9)
    assert abs(record["perplexity_change"]) < 0.01 and (a.tokens, a.oovs) == (b.tokens, b.oovs)
    # The int8 model steps like its own full_scores, up to dynamic quantization: activations
    # are quantized per call (uint8, one scale per tensor), so a token's score moves with what
    # shares its call, and by how much depends on the CPU's integer kernels.  The tolerance is
    # what that rounding allows in the output layer, not one CPU's figure: its input h lies in
    # [-1, 1], a grid step of 2/255, half a step of error per activation in each of the two
    # calls compared, times a logit's weights (a column's L1 norm); a log-probability moves
    # by at most twice its logits' largest move (the target's and the log-sum-exp's).
    tolerance = 2 * (2 / 255) * _largest_column_l1(fp32, "dense_w")
    scorer = Scorer(int8, providers="cpu")
    state, stepped = scorer.begin(), []
    for word in ["w1", "w2", "w3"]:
        logprob, state = scorer.step(state, word)
        stepped.append(logprob)
    stepped.append(scorer.end(state)[0])
    full = [t.logprob for t in scorer.full_scores("w1 w2 w3")]
    assert stepped == pytest.approx(full, abs=tolerance)
    assert stepped == pytest.approx([t.logprob for t in Scorer(fp32, providers="cpu")
                                     .full_scores("w1 w2 w3")], abs=tolerance)


def _largest_column_l1(model, name: str) -> float:
    (weights,) = [t for t in onnx.load(str(model)).graph.initializer if t.name == name]
    return float(np.abs(onnx.numpy_helper.to_array(weights)).sum(axis=0).max())


def _int8_with_a_worse_output_bias(monkeypatch):
    """Quantization that certainly raises the perplexity, on any CPU: the real int8 bytes with
    +50 on the padding token's output bias.  Padding is never a target, so every target's
    logit stays and every log-sum-exp grows: each token's NLL rises.  (Real int8 changes
    the perplexity by a fraction of a percent whose sign depends on the CPU's integer
    kernels: it lowered it on one AMD EPYC, so a bound of 0 refused nothing there.)"""
    import lmonnx.quantize as quantize

    real = quantize.quantize_bytes

    def worse(model: bytes, **options) -> bytes:
        proto = onnx.load_from_string(real(model, **options))
        (bias,) = [t for t in proto.graph.initializer if t.name == "dense_b"]
        values = onnx.numpy_helper.to_array(bias).copy()
        values[0] += 50.0
        bias.CopyFrom(onnx.numpy_helper.from_array(values, "dense_b"))
        return proto.SerializeToString()

    monkeypatch.setattr(quantize, "quantize_bytes", worse)


def test_a_change_over_the_bound_is_refused_unless_forced(fp32, text, tmp_path, capsys,
                                                          monkeypatch):
    _int8_with_a_worse_output_bias(monkeypatch)
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(fp32), "-o", str(out), "--sample", str(text),
                 "--max-change", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the 50% allowed; nothing written" in err[0]
    assert not out.exists()
    assert main(["quantize", str(fp32), "-o", str(out), "--sample", str(text),
                 "--max-change", "0.5", "--force"]) == 0
    assert out.exists()


def test_quantize_never_overwrites_its_input_or_requantizes(fp32, int8, tmp_path, capsys):
    before = fp32.read_bytes()
    assert main(["quantize", str(fp32), "-o", str(fp32), "--force"]) == 1
    assert f"-o {fp32} is an input of this command" in capsys.readouterr().err
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


# ---- outputs: one policy (atomic.check_outputs + output_file) ----------------------------------

def test_sample_text_is_never_the_output(fp32, text, tmp_path, capsys):
    """`quantize m.onnx -o c.txt --sample c.txt --force` replaced the corpus with the model."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(text.read_bytes())
    assert main(["quantize", str(fp32), "-o", str(corpus), "--sample", str(corpus),
                 "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmonnx: error: -o {corpus} is an input of this command ({corpus}); "
                   "choose another file"]
    assert corpus.read_bytes() == text.read_bytes()


def test_output_through_a_symlink_replaces_the_target(fp32, text, tmp_path):
    target, link = tmp_path / "target.onnx", tmp_path / "link.onnx"
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert main(["quantize", str(fp32), "-o", str(link), "--sample", str(text), "--force"]) == 0
    assert link.is_symlink() and link.resolve() == target
    assert ModelSession(target, providers="cpu").quantization is not None


def test_output_into_a_fifo_reaches_its_reader(fp32, text, tmp_path):
    fifo = tmp_path / "model.fifo"
    data = bytes_through_fifo(fifo, lambda: main(["quantize", str(fp32), "-o", str(fifo),
                                                  "--sample", str(text)]))
    assert ModelSession(data, providers="cpu", name="fifo").quantization is not None


def test_output_to_dev_stdout_writes_through_it(fp32, text, tmp_path):
    """In a subprocess whose stdout is a file, `-o /dev/stdout` fills that file (the summary
    goes to stderr) and leaves /dev/stdout a link."""
    data, stderr = run_to_dev_stdout(["quantize", fp32, "-o", "/dev/stdout", "--sample", text],
                                     tmp_path)
    assert b"wrote /dev/stdout" in stderr
    assert ModelSession(data, providers="cpu", name="stdout").quantization is not None


def test_unwritable_directory_fails_before_the_work(fp32, text, tmp_path, capsys, monkeypatch):
    """Checked up front, naming the user's path, not a temp file after the quantization."""
    import lmonnx.quantize

    monkeypatch.setattr(lmonnx.quantize, "quantize_bytes", lambda *a, **k: pytest.fail("worked"))
    assert main(["quantize", str(fp32), "-o", "/proc/int8.onnx", "--sample", str(text)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmonnx: error: -o /proc/int8.onnx: cannot create a file in /proc "
                   "(No such file or directory)"]


# ---- the bound ---------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [0.0, -1e-7, -0.2])
def test_no_change_or_an_improvement_passes_a_zero_bound(fp32, text, monkeypatch, change):
    """`--max-change 0` refused a "-0.000%" change: the bound is on what int8 costs."""
    import lmonnx.quantize as quantize

    monkeypatch.setattr(quantize, "_perplexity",
                        lambda model, examples, name: (100.0 * (1 + change if "int8" in name
                                                                else 1.0), 7))
    from lmonnx.examples import ExampleBuilder
    from lmonnx.corpus import read_sentences

    examples = list(ExampleBuilder(ModelSession(fp32, providers="cpu").vocab)
                    .build_all(read_sentences(text)))[:5]
    _, record = quantize.quantize_checked(fp32.read_bytes(), examples, "t", max_change=0.0)
    assert record["perplexity_change"] == pytest.approx(change, abs=1e-12)
    monkeypatch.setattr(quantize, "_perplexity",
                        lambda model, examples, name: (100.0 * (1.001 if "int8" in name
                                                                else 1.0), 7))
    with pytest.raises(quantize.QuantizationError, match=r"\+0\.100% .* more than the 0%"):
        quantize.quantize_checked(fp32.read_bytes(), examples, "t", max_change=0.0)


# ---- the library's manners ---------------------------------------------------------------------

def test_quantize_silences_only_onnxruntimes_quantizer(fp32, monkeypatch, caplog):
    """`logging.disable(WARNING)` silenced every logger of the user's process; now only
    records from onnxruntime.quantization are dropped, and the root logger is left as it was."""
    import logging
    import os

    import onnxruntime.quantization
    import lmonnx.quantize as quantize

    real = onnxruntime.quantization.quantize_dynamic
    ort_dir = os.path.dirname(onnxruntime.quantization.__file__)

    def noisy(*args, **kwargs):
        logging.getLogger("user.app").warning("the user's own warning")
        return real(*args, **kwargs)  # logs "consider pre-processing" on the root logger

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", noisy)
    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    with caplog.at_level(logging.INFO):
        quantize.quantize_bytes(fp32.read_bytes())
    assert [r.getMessage() for r in caplog.records if r.name == "user.app"] == [
        "the user's own warning"]
    assert not [r for r in caplog.records if r.pathname.startswith(ort_dir)]
    assert logging.root.manager.disable == 0
    assert root.handlers == handlers and root.filters == filters
