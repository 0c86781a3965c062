"""`lmonnx export`: fused LSTM ops and no Loop, names and dynamic axes, metadata, parity with
Keras through the scoring code, atomic writes that never replace an input, one-line user
errors, and the issue's PTB run."""

import json
import math
import shutil
import types
from collections import Counter

import numpy as np
import pytest
from output_checks import bytes_through_fifo, run_to_dev_stdout

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import lmonnx.export as export  # noqa: E402
import lmonnx.graph as lmgraph  # noqa: E402
import lmonnx.verify as verify  # noqa: E402
import lmonnx.train.model  # noqa: E402,F401  (registers LanguageModel with Keras)
from lmonnx.artifact import (INPUT_NAME, OUTPUT_NAME, STATE_INPUTS, STATE_OUTPUTS,  # noqa: E402
                             metadata_props, parse_metadata, write_metadata)
from lmonnx.batching import bucketed_batches, make_pair  # noqa: E402
from lmonnx.cli import main  # noqa: E402
from lmonnx.corpus import read_sentences, to_line  # noqa: E402
from lmonnx.examples import ExampleBuilder  # noqa: E402
from lmonnx.runtime import ModelSession  # noqa: E402
from lmonnx._testing import make_vocab  # noqa: E402
from lmonnx.synth import write_corpus  # noqa: E402
from lmonnx.train.trainer import TrainConfig, train  # noqa: E402
from lmonnx.vocab import Vocabulary  # noqa: E402
from lmonnx.xent import masked_cross_entropy  # noqa: E402


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmonnx: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    write_corpus(d / "synth", seed=2, words=40, train_sentences=300, valid_sentences=50,
                 test_sentences=50)
    config = TrainConfig(recipe="course", tokenizer="whitespace", vocab_size=50, max_length=10,
                         num_lstm_units=16, num_lstm_layers=2, embedding_dim=8, epochs=1,
                         batch_size=32, dropout=0.1)
    train(config, d / "synth" / "train.txt", d / "synth" / "valid.txt", d / "run")
    return d


@pytest.fixture(scope="module")
def exported(run):
    report = export.export_run(run / "run", run / "model.onnx")
    return report


def op_counts(path):
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def logits_parity(run_dir, onnx_path, text, limit=200):
    """Largest |ORT - Keras| logit at real positions, and both masked losses, on ``text``
    (an independent check: raw onnxruntime, the kernel, ids from vocab.encode)."""
    model = keras.saving.load_model(run_dir / "model.keras")
    vocab = Vocabulary.load(run_dir / "vocab.json")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pairs = []
    for line in read_sentences(text):
        pairs.append((line.key, *make_pair(vocab.encode(line.text))))
        if len(pairs) == limit:
            break
    worst, keras_loss, onnx_loss = 0.0, 0.0, 0.0
    for batch in bucketed_batches(pairs, max_tokens=2048, max_batch_size=48):
        k = model(batch.inputs).numpy()
        zeros = np.zeros((model.num_lstm_layers, len(batch), model.num_lstm_units), np.float32)
        o = session.run([OUTPUT_NAME], {INPUT_NAME: batch.inputs, STATE_INPUTS[0]: zeros,
                                        STATE_INPUTS[1]: zeros})[0]
        real = batch.mask > 0
        worst = max(worst, float(np.abs(o[real] - k[real]).max()))
        outputs, binary = model.run_lstm(batch.inputs)
        keras_loss += float(model.calculate_loss(outputs, binary, batch.targets))
        onnx_loss += masked_cross_entropy(o, batch.targets, batch.mask)
    return worst, keras_loss, onnx_loss


def test_graph_is_fused_lstm_without_loop(run, exported):
    counts = op_counts(run / "model.onnx")
    assert counts["LSTM"] == 2
    assert counts["Loop"] == 0 and counts["Scan"] == 0
    assert exported.op_counts == dict(counts)


def test_names_and_dynamic_axes(run, exported):
    graph = onnx.load(str(run / "model.onnx")).graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    assert set(inputs) == {INPUT_NAME, *STATE_INPUTS}
    assert set(outputs) == {OUTPUT_NAME, *STATE_OUTPUTS}
    inp, out = inputs[INPUT_NAME], outputs[OUTPUT_NAME]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "time"]
    dims = out.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "time", 44]
    for value in [*(inputs[n] for n in STATE_INPUTS), *(outputs[n] for n in STATE_OUTPUTS)]:
        dims = value.type.tensor_type.shape.dim  # [layers, batch, units]
        assert [dims[0].dim_value, dims[1].dim_param, dims[2].dim_value] == [2, "batch", 16]
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 1), (3, 17), (5, 2)]:  # both axes dynamic
        ids = np.full(shape, 4, dtype=np.int32)
        zeros = np.zeros((2, shape[0], 16), np.float32)
        logits, h, c = session.run([OUTPUT_NAME, *STATE_OUTPUTS],
                                   {INPUT_NAME: ids, STATE_INPUTS[0]: zeros, STATE_INPUTS[1]: zeros})
        assert logits.shape == (*shape, 44) and h.shape == c.shape == (2, shape[0], 16)


def test_every_lstm_carries_state_and_lengths(run, exported):
    """sequence_lens, initial_h and initial_c are wired, Y_h and Y_c used: the graph (not
    only the self-check) hands back each row's state after its last real token."""
    graph = onnx.load(str(run / "model.onnx")).graph
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    assert len(lstms) == 2
    for node in lstms:
        assert node.input[4] == lmgraph.LENGTHS and node.input[5] and node.input[6]
    assert exported.state.ok and exported.state.batches >= 2
    assert exported.metadata["lmonnx.format_version"] == "2"


def test_state_round_trip_with_the_trained_model(run, exported):
    """Independent of the export's own check: raw onnxruntime, a padded batch, halves."""
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[2, 5, 6, 7, 8, 9, 10, 11], [2, 12, 13, 0, 0, 0, 0, 0]], np.int32)
    zeros = np.zeros((2, 2, 16), np.float32)

    def run_lm(x, h, c):
        return session.run(None, {INPUT_NAME: x, STATE_INPUTS[0]: h, STATE_INPUTS[1]: c})

    names = [o.name for o in session.get_outputs()]
    whole = dict(zip(names, run_lm(ids, zeros, zeros)))
    first = dict(zip(names, run_lm(ids[:, :3], zeros, zeros)))
    second = dict(zip(names, run_lm(ids[:1, 3:], first[STATE_OUTPUTS[0]][:, :1],
                                    first[STATE_OUTPUTS[1]][:, :1])))
    np.testing.assert_allclose(second[OUTPUT_NAME][0], whole[OUTPUT_NAME][0, 3:], atol=1e-5)
    np.testing.assert_allclose(second[STATE_OUTPUTS[0]][:, 0], whole[STATE_OUTPUTS[0]][:, 0],
                               atol=1e-5)
    # the short row's state is its state after token 3, not after the padding
    np.testing.assert_allclose(whole[STATE_OUTPUTS[0]][:, 1], first[STATE_OUTPUTS[0]][:, 1],
                               atol=1e-6)
    np.testing.assert_allclose(whole[STATE_OUTPUTS[1]][:, 1], first[STATE_OUTPUTS[1]][:, 1],
                               atol=1e-6)


def test_exported_model_steps_like_full_scores(run, exported):
    from lmonnx import Scorer

    scorer = Scorer(run / "model.onnx", providers="cpu")
    for line in list(read_sentences(run / "synth" / "test.txt"))[:20]:
        state, stepped = scorer.begin(), []
        for word in line.text.split():
            logprob, state = scorer.step(state, word)
            stepped.append(logprob)
        logprob, state = scorer.end(state)
        stepped.append(logprob)
        assert stepped == pytest.approx([t.logprob for t in scorer.full_scores(line.text)],
                                        abs=1e-4)


def test_failed_state_check_writes_nothing(run, tmp_path, monkeypatch):
    bad = verify.StateReport(batches=1, max_halves_loss_rel_diff=1.0, max_row_state_abs_diff=0.0)
    monkeypatch.setattr(export, "check_state", lambda *a, **k: bad)
    with pytest.raises(export.ExportError, match="state check"):
        export.export_run(run / "run", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_metadata(run, exported):
    model = onnx.load(str(run / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    meta = parse_metadata(props, "model.onnx")
    assert meta.vocab == Vocabulary.load(run / "run" / "vocab.json")
    assert meta.config["vocab_size"] == 44 and meta.config["num_lstm_layers"] == 2
    assert meta.config["num_lstm_units"] == 16 and meta.config["embedding_dim"] == 8
    assert meta.config["max_length"] == 10 and meta.config["tokenizer"]["preset"] == "whitespace"
    history = json.loads((run / "run" / "history.json").read_text())
    assert meta.training["corpus"] == "train.txt" and meta.training["epochs"] == 1
    assert meta.training["valid"] == "valid.txt" and meta.training["epochs_trained"] == 1
    assert meta.training["best_epoch"] == history["best_epoch"] == 1
    assert meta.training["valid_perplexity"] == history["epochs"][0]["valid_perplexity"]
    # onnxruntime sees the same map (what the runtime reads).
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == props


def test_parity_report_and_independent_check(run, exported):
    p = exported.parity
    assert p.ok and p.source == "valid.txt" and p.sentences == 50 and p.batches >= 2
    assert p.max_logit_abs_diff <= verify.LOGIT_ATOL
    assert p.max_batch_loss_rel_diff <= verify.LOSS_RTOL
    worst, keras_loss, onnx_loss = logits_parity(run / "run", run / "model.onnx",
                                                 run / "synth" / "test.txt")
    assert worst <= 1e-4
    assert onnx_loss == pytest.approx(keras_loss, rel=1e-5)


@pytest.mark.parametrize("layers", [1, 3])
def test_convert_any_depth_to_fused_lstm(layers):
    from lmonnx.train import LanguageModel

    keras.utils.set_random_seed(layers)
    vocab = make_vocab([f"w{i}" for i in range(26)])
    model = LanguageModel(len(vocab), 8, 8, layers, embedding_dim=4)
    proto = export.convert(model)
    assert lmgraph.check_graph(proto, layers)["LSTM"] == layers
    shape = dict(vocab_size=30, max_length=8, num_lstm_units=8, num_lstm_layers=layers,
                 embedding_dim=4, dropout=0.0)
    write_metadata(proto, metadata_props(vocab, shape, {}))
    session = ModelSession(proto.SerializeToString(), providers="cpu", name="converted")
    rng = np.random.default_rng(layers)
    lines = [to_line(i, " ".join(f"w{j}" for j in rng.integers(0, 26, size=n)))
             for i, n in enumerate([1, 5, 12, 3])]
    examples = list(ExampleBuilder(vocab).build_all(lines))
    parity = export.check_parity(model, session, examples, "random words")
    assert parity.ok, parity.describe()
    assert parity.sentences == 4 and parity.tokens == 1 + 5 + 12 + 3 + 4


def test_cli_refuses_existing_output_then_force(run, exported, capsys):
    target = run / "again.onnx"
    target.write_bytes(b"keep me")
    assert main(["export", str(run / "run"), "-o", str(target)]) == 1
    assert "--force" in one_error_line(capsys)
    assert target.read_bytes() == b"keep me"
    assert main(["export", str(run / "run"), "-o", str(target), "--force"]) == 0
    out = capsys.readouterr().out
    assert "2 fused LSTM with state, no Loop" in out and "parity:" in out and "ops:" in out
    assert "state: a row alone in two halves" in out
    assert op_counts(target)["LSTM"] == 2


@pytest.mark.parametrize("make", ["missing", "empty", "no-model"])
def test_cli_run_dir_that_is_not_a_run(run, tmp_path, capsys, make):
    run_dir = tmp_path / "run"
    if make != "missing":
        run_dir.mkdir()
    if make == "no-model":
        (run_dir / "config.json").write_text((run / "run" / "config.json").read_text())
    assert main(["export", str(run_dir), "-o", str(tmp_path / "m.onnx")]) == 1
    line = one_error_line(capsys)
    assert "is not" in line and "lmonnx run" in line
    assert not (tmp_path / "m.onnx").exists()


def test_cli_bad_opset_and_missing_output_dir(run, tmp_path, capsys):
    assert main(["export", str(run / "run"), "-o", str(tmp_path / "m.onnx"),
                 "--opset", "99"]) == 1
    assert "--opset" in one_error_line(capsys)
    assert main(["export", str(run / "run"), "-o", str(tmp_path / "no" / "m.onnx")]) == 1
    assert "does not exist" in one_error_line(capsys)


def test_max_change_without_quantize_is_refused(run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run / "run"), "-o", str(out), "--max-change", "0.05"]) == 1
    assert "--max-change bounds what int8 may cost: it needs --quantize int8" in \
        one_error_line(capsys)
    assert not out.exists()


def test_failed_parity_writes_nothing(run, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "LOGIT_ATOL", -1.0)
    with pytest.raises(export.ExportError, match=r"parity check.*max \|logit diff\|"):
        export.export_run(run / "run", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


def test_parity_loss_is_what_evaluation_computes(run, tmp_path, monkeypatch):
    """Export validates through the scoring code users run: the ONNX loss is the sum of
    lmonnx.evaluate.score_batch's NLL (a 1% error there must fail the export)."""
    import lmonnx.evaluate

    real = lmonnx.evaluate.score_batch
    calls = []

    def off_by_one_percent(session, batch, **kwargs):
        calls.append(type(session).__name__)
        return [types.SimpleNamespace(nll=r.nll * 1.01) for r in real(session, batch, **kwargs)]

    monkeypatch.setattr(lmonnx.evaluate, "score_batch", off_by_one_percent)
    with pytest.raises(export.ExportError, match="loss rel diff"):
        export.export_run(run / "run", tmp_path / "m.onnx")
    assert calls and set(calls) == {"ModelSession"}
    assert list(tmp_path.iterdir()) == []


INPUTS = {
    "the Keras model": "run/model.keras",
    "config": "run/config.json",
    "history": "run/history.json",
    "vocabulary": "run/vocab.json",
    "manifest": "run/lmonnx-run.json",
    "checkpoint": "run/checkpoint-1.npz",
    "a future checkpoint": "run/checkpoint-7.npz",
    "validation corpus": "synth/valid.txt",
    "training corpus": "synth/train.txt",
    "symlink to the model": "link.onnx",
}


@pytest.mark.parametrize("target", list(INPUTS.values()), ids=list(INPUTS))
def test_export_never_replaces_its_inputs(run, capsys, target):
    """`export run -o run/model.keras --force` used to replace the Keras model with the ONNX
    file.  Every input is refused up front, with or without --force, in one line."""
    link = run / "link.onnx"
    if not link.is_symlink():
        link.symlink_to(run / "run" / "model.keras")
    output = run / target
    before = {p: p.read_bytes() for p in (run / "run").iterdir()}
    for force in ([], ["--force"]):
        assert main(["export", str(run / "run"), "-o", str(output), *force]) == 1
        line = one_error_line(capsys)
        assert f"-o {output}" in line and "choose another" in line, line
    assert {p: p.read_bytes() for p in (run / "run").iterdir()} == before
    assert not (run / "run" / "checkpoint-7.npz").exists()


def test_export_refuses_a_directory_even_with_force(run, tmp_path, capsys):
    (tmp_path / "model.onnx").mkdir()
    assert main(["export", str(run / "run"), "-o", str(tmp_path / "model.onnx"), "--force"]) == 1
    assert "is a directory" in one_error_line(capsys)
    assert (tmp_path / "model.onnx").is_dir()


def test_truncated_keras_model_is_named_as_unreadable(run, tmp_path, capsys):
    """Keras says "File not found" for a truncated .keras that exists."""
    damaged = tmp_path / "run"
    shutil.copytree(run / "run", damaged)
    data = (damaged / "model.keras").read_bytes()
    (damaged / "model.keras").write_bytes(data[: len(data) // 2])
    assert main(["export", str(damaged), "-o", str(tmp_path / "m.onnx")]) == 1
    line = one_error_line(capsys)
    assert str(damaged / "model.keras") in line and "truncated" in line
    assert "not found" not in line
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_ptb_done_when(ptb_dir, tmp_path, capsys):
    """The issue's acceptance run: 2000 PTB validation lines, 1 epoch, then export."""
    lines = (ptb_dir / "ptb.valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    corpus = tmp_path / "ptb2000.txt"
    corpus.write_text("".join(lines[:2000]), encoding="utf-8")
    run_dir, onnx_path = tmp_path / "run", tmp_path / "ptb.onnx"
    assert main(["train", str(corpus), "--tokenizer", "whitespace", "--vocab-size", "3000",
                 "--max-length", "35", "--units", "64", "--layers", "2", "--epochs", "1",
                 "--batch-size", "32", "--out", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "-o", str(onnx_path)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    counts = op_counts(onnx_path)
    assert counts["LSTM"] == 2 and counts["Loop"] == 0 and counts["Scan"] == 0
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    meta = parse_metadata(props, str(onnx_path))
    assert len(meta.vocab) == meta.config["vocab_size"] == 3000
    assert meta.vocab.token_to_id("<unk>") == 1 and meta.config["tokenizer"]["preset"] == "whitespace"
    assert meta.training["corpus"] == "ptb2000.txt" and meta.training["epochs"] == 1
    worst, keras_loss, onnx_loss = logits_parity(run_dir, onnx_path, ptb_dir / "ptb.test.txt",
                                                 limit=500)
    print(f"PTB test parity: max |logit diff| {worst:.2e}, loss rel diff "
          f"{abs(onnx_loss - keras_loss) / keras_loss:.2e}")
    assert worst <= 1e-4
    assert onnx_loss == pytest.approx(keras_loss, rel=1e-5)
    assert math.isfinite(onnx_loss)


# ---- outputs: one policy (atomic.check_outputs + output_file) --------------------------------

def assert_an_export_of_the_run(data: bytes, run):
    """``data`` is this run's model (tf2onnx's node names differ from export to export)."""
    written, reference = onnx.load_from_string(data), onnx.load(str(run / "model.onnx"))
    assert written.metadata_props == reference.metadata_props
    assert lmgraph.op_counts(written) == lmgraph.op_counts(reference)


def test_export_through_a_symlink_replaces_the_target(run, exported, tmp_path):
    target, link = tmp_path / "target.onnx", tmp_path / "link.onnx"
    target.write_bytes(b"old")
    link.symlink_to(target)
    export.export_run(run / "run", link, force=True)
    assert link.is_symlink() and link.resolve() == target
    assert_an_export_of_the_run(target.read_bytes(), run)


def test_export_into_a_fifo_reaches_its_reader(run, exported, tmp_path):
    fifo = tmp_path / "model.fifo"
    assert_an_export_of_the_run(bytes_through_fifo(fifo, lambda: export.export_run(
        run / "run", fifo)), run)


def test_export_to_dev_stdout_writes_through_it(run, exported, tmp_path):
    """In a subprocess whose stdout is a file, the file gets the model and the summary goes
    to stderr; /dev/stdout stays a link."""
    data, stderr = run_to_dev_stdout(["export", run / "run", "-o", "/dev/stdout"], tmp_path)
    assert b"wrote /dev/stdout" in stderr
    assert_an_export_of_the_run(data, run)


def test_unwritable_directory_fails_before_the_work(run, capsys, monkeypatch):
    monkeypatch.setattr(export, "_load_run", lambda run: pytest.fail("loaded the model"))
    assert main(["export", str(run / "run"), "-o", "/proc/m.onnx"]) == 1
    assert one_error_line(capsys) == ("lmonnx: error: -o /proc/m.onnx: cannot create a file "
                                      "in /proc (No such file or directory)")


# ---- the sample: windows, as training cuts them ----------------------------------------------

def test_a_long_sample_line_is_checked_in_windows(run, exported, tmp_path, monkeypatch):
    """A validation line was run through eager Keras whole (20k words: 77 s).  Now Keras
    never sees more than max_length (10) positions per row, and the sample is bounded."""
    from lmonnx.train import LanguageModel

    rng = np.random.default_rng(0)
    line = " ".join(f"w{i}" for i in rng.integers(0, 40, size=10_000))
    sample = tmp_path / "long.txt"
    sample.write_text(line + "\nw1 w2\n", encoding="utf-8")
    widths = []
    real = LanguageModel.run_lstm

    def recording(self, inputs, *args, **kwargs):
        widths.append(int(inputs.shape[1]))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "run_lstm", recording)
    report = export.export_run(run / "run", tmp_path / "m.onnx", sample=sample)
    assert widths and max(widths) == 10
    windows = math.ceil(verify.SAMPLE_TOKENS / 10)  # the window that reaches the bound completes
    assert report.parity.windows == windows and report.parity.tokens == 10 * windows
    assert report.parity.sentences == 1 and report.state.ok


def test_sample_windows_cut_and_bound():
    vocab = make_vocab(["a", "b"])
    examples = list(ExampleBuilder(vocab).build_all(
        [to_line(0, "a b a b a"), to_line(1, "b"), to_line(2, "a a a")]))
    items = verify.sample_windows(examples, 4, max_tokens=9)
    assert [(key, list(x)) for key, x, _ in items] == [
        ((0, 0), [2, 4, 5, 4]), ((0, 1), [5, 4]), ((1, 0), [2, 5]), ((2, 0), [2, 4, 4, 4])]


@pytest.mark.parametrize("value,reference,expected", [
    (1.0, 1.0, 0.0), (0.0, 0.0, 0.0), (1.0, 0.0, math.inf), (1.5, -1.0, 2.5),
    (math.nan, 1.0, math.inf), (1.0, math.nan, math.inf), (math.inf, 1.0, math.inf)])
def test_relative_difference(value, reference, expected):
    assert verify.relative_difference(value, reference) == expected


def test_progress_names_each_stage(run, exported, tmp_path):
    stages = []
    export.export_run(run / "run", tmp_path / "m.onnx", progress=stages.append)
    assert [s.split(" ")[0] for s in stages] == ["loading", "converting", "checking"]
    assert stages[0] == f"loading {run / 'run' / 'model.keras'}"
