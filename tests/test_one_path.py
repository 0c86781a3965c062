"""Issue regressions on the scoring side: one path for every sentence, whatever the entry point;
a vocabulary that does not match the logits is refused; outputs that are not regular files.

Each test names the bug it pins down.  The model is the TensorFlow-free random LSTM of
lmonnx/_testing.py; the reference for each number is another entry point, not a constant.
"""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from lmonnx._testing import SOFTMAXES, build_random_lm, make_vocab, random_cutoffs

from lmonnx import Scorer
from lmonnx.artifact import KEY_CONFIG, KEY_VOCAB, ArtifactError
from lmonnx.cli import main
from lmonnx.runtime import ModelSession

WORDS = [f"w{i}" for i in range(100)]  # a 104-token vocabulary, as in the bug reports


@pytest.fixture(scope="module", params=SOFTMAXES)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("one_path") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=16, layers=2, seed=5,
                    cutoffs=random_cutoffs(request.param, len(WORDS) + 4))
    return path


@pytest.fixture(scope="module")
def messy_file(tmp_path_factory):
    """BOM, CRLF, blank lines, surrounding spaces, an OOV, an undecodable byte, no final EOL."""
    path = tmp_path_factory.mktemp("messy") / "messy.txt"
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(300)]
    data = ("\ufeff" + lines[0] + "\r\n\r\n  " + "\r\n".join(lines[1:150]) + " \n\n"
            + "\n".join(lines[150:]) + "\n zebra w3 \n").encode()
    path.write_bytes(data + b"w4 \xff w5\nw6 w7")
    return path


def run_cli(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmonnx", *map(str, args)], input=stdin,
                          capture_output=True, timeout=120)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmonnx"), err
    return err[0]


# ---- one path for every sentence (bug 3 and the "Done when" of the house-order issue) -------

def test_cli_evaluate_scorer_evaluate_and_score_agree_on_a_messy_file(model, messy_file, capsys):
    assert main(["evaluate", str(messy_file), "--model", str(model), "--providers", "cpu",
                 "--errors", "replace", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    scorer = Scorer(model, providers="cpu")
    by_path = scorer.evaluate(messy_file, errors="replace")
    with open(messy_file, "rb") as f:
        by_binary_file = scorer.evaluate(f, errors="replace")
    with open(messy_file, encoding="utf-8", errors="replace") as f:
        by_text_file = scorer.evaluate(f)
    text = messy_file.read_bytes().decode("utf-8", "replace")
    sentences = [line for line in text.split("\n") if line.strip("\ufeff \r\t")]
    scores = scorer.score(sentences)
    summed = (-sum(s.logprob for s in scores), sum(s.tokens for s in scores),
              sum(s.oovs for s in scores))
    for report in (by_path, by_binary_file, by_text_file):
        assert (report.sentences, report.tokens, report.oovs) == (
            cli["sentences"], cli["tokens"], cli["oovs"])
        assert report.nll == pytest.approx(cli["nll"], rel=1e-12)
    for report in (by_path, by_binary_file):  # text mode has lost the CRs and the bad byte
        assert report.bits_per_byte == pytest.approx(cli["bits_per_byte"], rel=1e-12)
    assert summed[1:] == (cli["tokens"], cli["oovs"])
    assert summed[0] == pytest.approx(cli["nll"], rel=1e-6)
    assert cli["sentences"] == 303 and cli["oovs"] >= 1


def test_a_bom_does_not_change_a_score_from_stdin(model):
    """printf '\\xef\\xbb\\xbfw6 w10\\n' | lmonnx score --json gave -17.71 and 1 OOV."""
    with_bom = run_cli("score", "--json", "--model", model, "--providers", "cpu",
                       stdin=b"\xef\xbb\xbfw6 w10\n")
    without = run_cli("score", "--json", "--model", model, "--providers", "cpu",
                      stdin=b"w6 w10\n")
    assert with_bom.returncode == without.returncode == 0, with_bom.stderr
    a, b = json.loads(with_bom.stdout), json.loads(without.stdout)
    assert a == b and a["oovs"] == 0
    scorer = Scorer(model, providers="cpu")
    assert scorer.score(["\ufeffw6 w10"])[0] == scorer.score(["w6 w10"])[0]


def test_a_bom_does_not_change_the_corpus_score(model, tmp_path, capsys):
    """Scorer.evaluate(open(f)) gave NLL 9278.65 where lmonnx evaluate f gave 9269.27."""
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfw6 w10 w11\nw7\n")
    assert main(["evaluate", str(path), "--model", str(model), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    with open(path, encoding="utf-8") as f:  # utf-8, not utf-8-sig: the BOM reaches lmonnx
        api = Scorer(model, providers="cpu").evaluate(f)
    assert (api.nll, api.tokens, api.oovs, api.bits_per_byte) == (
        cli["nll"], cli["tokens"], cli["oovs"], cli["bits_per_byte"])


def test_dash_is_stdin_for_evaluate(model, messy_file):
    piped = run_cli("evaluate", "-", "--json", "--model", model, "--errors", "replace",
                    stdin=messy_file.read_bytes())
    named = run_cli("evaluate", messy_file, "--json", "--model", model, "--errors", "replace")
    assert piped.returncode == named.returncode == 0, piped.stderr
    a, b = json.loads(piped.stdout), json.loads(named.stdout)
    assert a["corpus"] == "<stdin>"
    assert (a["nll"], a["tokens"], a["bits_per_byte"]) == (b["nll"], b["tokens"], b["bits_per_byte"])


def test_score_names_the_line_of_undecodable_stdin(model):
    bad = run_cli("score", "--model", model, stdin=b"w1 w2\nw3 \xff\n")
    assert bad.returncode == 1
    err = bad.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "<stdin>:2: not valid UTF-8" in err[0] and "--errors replace" in err[0]
    assert "surrogates" not in err[0]
    ok = run_cli("score", "--json", "--model", model, "--errors", "replace",
                 stdin=b"w1 w2\nw3 \xff\n")
    assert ok.returncode == 0 and [json.loads(r)["oovs"] for r in ok.stdout.splitlines()] == [0, 1]


# ---- bug 1: a vocabulary that does not match the logits ------------------------------------

def _with_metadata(src, dst, vocab_tokens=None, symbolic_width=False):
    proto = onnx.load(str(src))
    props = {p.key: p for p in proto.metadata_props}
    if vocab_tokens is not None:
        props[KEY_VOCAB].value = json.dumps(vocab_tokens)
        config = json.loads(props[KEY_CONFIG].value)
        config["vocab_size"] = len(vocab_tokens)
        props[KEY_CONFIG].value = json.dumps(config)
    if symbolic_width:
        proto.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "vocab"
    onnx.save(proto, str(dst))
    return dst


def test_a_vocabulary_shorter_than_the_logits_is_refused(model, tmp_path, capsys):
    tokens = json.loads({p.key: p.value for p in onnx.load(str(model)).metadata_props}[KEY_VOCAB])
    short = _with_metadata(model, tmp_path / "short.onnx", tokens[:100])
    with pytest.raises(ArtifactError,
                       match="(logits have|cutoffs end at) 104 entries .* holds 100 tokens"):
        ModelSession(short, providers="cpu")
    assert main(["score", "w1 w2 w97", "--model", str(short)]) == 1
    assert "holds 100 tokens" in one_error_line(capsys)
    assert main(["predict", "w1 w2", "-k", "104", "--model", str(short)]) == 1
    assert "holds 100 tokens" in one_error_line(capsys)


def test_a_symbolic_logits_width_is_checked_too(model, tmp_path):
    tokens = json.loads({p.key: p.value for p in onnx.load(str(model)).metadata_props}[KEY_VOCAB])
    fine = _with_metadata(model, tmp_path / "sym.onnx", symbolic_width=True)
    assert Scorer(fine, providers="cpu").score(["w1 w2"])[0].tokens == 3
    short = _with_metadata(model, tmp_path / "sym_short.onnx", tokens[:100], symbolic_width=True)
    with pytest.raises(ArtifactError, match="holds 100 tokens"):
        # onnxruntime may infer the width at load; if it does not, the first batch checks it
        Scorer(short, providers="cpu").score(["w1 w2 w97"])


# ---- outputs that are not regular files -----------------------------------------------------

def _evaluate_to(model, corpus, out, *extra):
    return main(["evaluate", str(corpus), "--model", str(model), "--per-sentence", str(out),
                 *extra])


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("w1 w2\nw3\n")
    return path


def test_a_symlinked_output_stays_a_symlink(model, small_corpus, tmp_path, capsys):
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert _evaluate_to(model, small_corpus, link) == 1  # an existing file still needs --force
    assert "--force" in one_error_line(capsys)
    assert _evaluate_to(model, small_corpus, link, "--force") == 0
    assert link.is_symlink() and len(target.read_text().splitlines()) == 2


def test_a_fifo_output_is_written_not_replaced(model, small_corpus, tmp_path, capsys):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    assert _evaluate_to(model, small_corpus, fifo) == 0  # no --force: a pipe overwrites nothing
    reader.join(timeout=60)
    assert [json.loads(r)["line"] for r in received[0].splitlines()] == [1, 2]
    assert fifo.exists() and not fifo.is_file()


def test_a_process_substitution_output(model, small_corpus, capsys):
    """`--per-sentence >(cat)` is a /dev/fd/N path: write into it, no temp file beside it."""
    read_fd, write_fd = os.pipe()
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(read_fd).read()),
                              daemon=True)
    reader.start()
    try:
        assert _evaluate_to(model, small_corpus, f"/dev/fd/{write_fd}") == 0
    finally:
        os.close(write_fd)
    reader.join(timeout=60)
    assert len(received[0].splitlines()) == 2


def test_a_directory_output_fails_before_any_work(model, small_corpus, tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    assert _evaluate_to(model, tmp_path / "missing.txt", tmp_path / "outdir") == 1
    assert "--per-sentence" in (line := one_error_line(capsys)) and "is a directory" in line


def test_errors_never_show_the_temp_file(model, small_corpus, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert _evaluate_to(model, small_corpus, locked / "out.jsonl") == 1
        line = one_error_line(capsys)
        assert "locked/out.jsonl" in line and ".tmp" not in line
    finally:
        os.chmod(locked, 0o700)


# ---- API validation -------------------------------------------------------------------------

def test_scorer_checks_its_arguments_at_construction(model):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        Scorer(model, providers="cpu", batch_size=0)
    with pytest.raises(TypeError, match="max_tokens must be an integer >= 1; got '64'"):
        Scorer(model, providers="cpu", max_tokens="64")
    scorer = Scorer(model, providers="cpu", batch_size=np.int64(8), max_tokens=np.int32(512))
    assert len(scorer.predict_next("w1", k=np.int64(3))) == 3
    assert scorer.score([b"w1 w2"]) == scorer.score(["w1 w2"])


def test_usage_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "c.txt", "--batch-size", "many"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert "--batch-size" in line and "--help" in line


def test_the_cuda_note_is_said_once_in_the_report(model, small_corpus):
    result = run_cli("evaluate", small_corpus, "--model", model, "--providers", "auto")
    assert result.returncode == 0
    out, err = result.stdout.decode(), result.stderr.decode()
    provider = [line for line in out.splitlines() if line.startswith("provider")]
    assert len(provider) == 1 and "CUDA" not in err
    assert out.count("CUDA not used") == (0 if "CUDAExecutionProvider" in provider[0] else 1)
