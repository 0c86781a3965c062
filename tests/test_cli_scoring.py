"""`lmonnx evaluate`, `score` and `predict` from the command line (lmonnx.cli.main)."""

import json
import math
import os
import re
import subprocess
import sys
import threading

import pytest
from lmonnx._testing import build_random_lm, edit_logits, make_vocab

from lmonnx import Scorer
from lmonnx.cli import main
from lmonnx.runtime import cuda_unavailable_reason

WORDS = "the a cat dog sat on mat ran".split()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=8, layers=1, seed=1)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat\n\n a dog ran on the mat \nzebra cat\n", encoding="utf-8")
    return path


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmonnx: error: "), err
    return err[0]


def test_evaluate_json_report(model, corpus, capsys):
    assert main(["evaluate", str(corpus), "--model", str(model), "--providers", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sentences"] == 3 and report["words"] == 11 and report["tokens"] == 14
    assert report["oovs"] == 1 and report["provider"] == "CPUExecutionProvider"
    assert report["corpus"] == str(corpus)


def test_evaluate_table_and_two_corpora(model, corpus, capsys):
    assert main(["evaluate", str(corpus), str(corpus), "--model", str(model),
                 "--providers", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("perplexity excl. OOVs") == 2 and "bits per byte" in out


def test_per_sentence_and_per_token_files(model, corpus, tmp_path, capsys):
    sent, tok = tmp_path / "s.jsonl", tmp_path / "t.jsonl"
    assert main(["evaluate", str(corpus), "--model", str(model), "--providers", "cpu", "--json",
                 "--per-sentence", str(sent), "--per-token", str(tok)]) == 0
    report = json.loads(capsys.readouterr().out)
    sentences = [json.loads(line) for line in sent.read_text().splitlines()]
    tokens = [json.loads(line) for line in tok.read_text().splitlines()]
    assert [s["line"] for s in sentences] == [1, 3, 4]  # file line numbers, blank line skipped
    assert sum(s["nll"] for s in sentences) == pytest.approx(report["nll"])
    assert len(tokens) == report["tokens"]
    assert [t["word"] for t in tokens[:4]] == ["the", "cat", "sat", "</s>"]
    assert [t["is_oov"] for t in tokens if t["word"] == "zebra"] == [True]
    assert -sum(t["logprob"] for t in tokens) == pytest.approx(report["nll"])
    # never overwrite what the user has without --force
    assert main(["evaluate", str(corpus), "--model", str(model), "--per-sentence", str(sent)]) == 1
    assert "exists; pass --force" in one_error_line(capsys)


@pytest.mark.parametrize("setup,match", [
    (lambda tmp, model: ["evaluate", str(tmp / "nope.txt"), "--model", str(model)],
     "no such file"),
    (lambda tmp, model: ["evaluate", str(tmp / "empty.txt"), "--model", str(model)],
     "no sentences"),
    (lambda tmp, model: ["evaluate", str(tmp / "bad.txt"), "--model", str(model)],
     r"bad.txt:2: .*UTF-8"),
    (lambda tmp, model: ["evaluate", str(tmp / "ok.txt"), "--model", str(tmp / "missing.onnx")],
     "model not found"),
    (lambda tmp, model: ["evaluate", str(tmp / "ok.txt"), "--model", str(tmp / "ok.txt")],
     "not a readable ONNX model"),
], ids=["missing-corpus", "empty-corpus", "bad-utf8", "missing-model", "not-onnx"])
def test_user_errors_are_one_line(tmp_path, model, capsys, setup, match):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.txt").write_bytes(b"fine line\nbad \xff byte\n")
    (tmp_path / "ok.txt").write_text("the cat\n")
    assert main(setup(tmp_path, model)) == 1
    assert re.search(match, one_error_line(capsys))


@pytest.mark.parametrize("argv,match", [
    (["evaluate", "c.txt", "--batch-size", "0"], r"argument --batch-size: must be an integer >= 1; got 0"),
    (["predict", "the", "-k", "0"], r"argument -k: must be an integer >= 1; got 0"),
    (["generate", "--temperature", "nan"], r"argument --temperature: must be a finite number >= 0"),
    (["synth", "--seed", "-1"], r"argument --seed: must be an integer >= 0; got -1"),
    (["quantize", "m.onnx", "-o", "q.onnx", "--max-change", "-0.1"], r"argument --max-change"),
    # found by a new-user trial of this release: each is said by its subcommand's parser
    (["export", "run", "--opset", "3"], r"lmonnx export: error: argument --opset: must be an integer >= 11"),
    (["evaluate", "c.txt", "--bogus"], r"lmonnx evaluate: error: unrecognized arguments: --bogus \(see lmonnx evaluate --help\)"),
    (["train", "c.txt", "--resume", "--force"], r"lmonnx train: error: argument --force: not allowed with argument --resume"),
    (["synth", "--out", ""], r"lmonnx synth: error: argument --out: an empty path; give a name"),
    (["export", "run", "-o", ""], r"lmonnx export: error: argument -o/--output: an empty path"),
], ids=["batch0", "k0", "temperature-nan", "synth-seed", "max-change", "opset-low",
        "unknown-flag", "resume-force", "synth-out-empty", "export-o-empty"])
def test_bad_flag_values_are_usage_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"lmonnx \w+: error: ", err[0]), err
    assert re.search(match, err[0])


def test_errors_replace_scores_undecodable_lines(tmp_path, model, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat\nbad \xff byte\n")
    assert main(["evaluate", str(bad), "--model", str(model), "--errors", "replace", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sentences"] == 2


def test_score_and_predict(model, capsys):
    assert main(["score", "the cat sat", "a dog", "--model", str(model), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scores = Scorer(model, providers="cpu").score(["the cat sat", "a dog"])
    assert [(r["tokens"], r["logprob"], r["perplexity"]) for r in rows] == [
        (s.tokens, s.logprob, s.perplexity) for s in scores]
    assert main(["predict", "the cat", "-k", "3", "--model", str(model), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)
    expected = Scorer(model, providers="cpu").predict_next("the cat", k=3)
    assert [(t["word"], t["probability"]) for t in top] == expected


def test_bits_per_byte_counts_the_original_bytes(model, tmp_path, capsys):
    path = tmp_path / "spaced.txt"
    path.write_bytes(b" the cat sat \n\n  \na dog\r\n")  # PTB-style spaces, blank lines, CRLF
    assert main(["evaluate", str(path), "--model", str(model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sentence_bytes = len(" the cat sat \n") + len("a dog\n")  # blank lines are not sentences
    assert report["bits_per_byte"] == pytest.approx(report["nll"] / math.log(2) / sentence_bytes)


def test_evaluate_reads_a_pipe(model, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("the cat sat\na dog\n"), daemon=True)
    writer.start()
    assert main(["evaluate", str(fifo), "--model", str(model), "--json"]) == 0
    writer.join(timeout=60)
    assert json.loads(capsys.readouterr().out)["sentences"] == 2


def test_outputs_never_clobber_inputs_or_each_other(model, corpus, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    for args, match in [
        (["--per-sentence", str(out), "--per-token", str(out)], "name the same file"),
        (["--per-sentence", str(corpus), "--force"], "is an input of this command"),
        (["--per-token", str(model), "--force"], "is an input of this command"),
    ]:
        assert main(["evaluate", str(corpus), "--model", str(model), *args]) == 1
        assert re.search(match, one_error_line(capsys))
    assert corpus.read_text(encoding="utf-8").startswith("the cat sat")


def test_a_failed_evaluation_keeps_the_old_output(model, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat\nbad \xff byte\n")
    out = tmp_path / "old.jsonl"
    out.write_text("precious\n")
    assert main(["evaluate", str(bad), "--model", str(model), "--per-sentence", str(out),
                 "--force"]) == 1
    assert "not valid UTF-8" in one_error_line(capsys)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "old.jsonl"]


def test_directory_as_corpus_or_model(model, corpus, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--model", str(model)]) == 1
    assert "is a directory" in one_error_line(capsys)
    assert main(["evaluate", str(corpus), "--model", str(tmp_path)]) == 1
    assert "is a directory" in one_error_line(capsys)


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="CUDA is usable here")
def test_strict_cuda_without_a_gpu_is_one_line(model, corpus, capsys):
    assert main(["evaluate", str(corpus), "--model", str(model), "--providers", "cuda"]) == 1
    assert "CUDA is not usable" in one_error_line(capsys)


@pytest.mark.parametrize("flags", [["--actors", "2"], ["--cpus-per-actor", "0.5"],
                                   ["--gpus-per-actor", "1"]])
def test_ray_sizing_flags_without_ray_are_refused(model, corpus, capsys, flags):
    """A flag that would do nothing is an error, not silently ignored."""
    assert main(["evaluate", str(corpus), "--model", str(model), "--providers", "cpu",
                 *flags]) == 1
    assert f"{flags[0]} sizes the Ray actors: it needs --ray" in one_error_line(capsys)
    assert capsys.readouterr().out == ""


def test_score_refuses_stdin_mixed_with_sentence_arguments(model, capsys):
    assert main(["score", "-", "the cat", "--model", str(model), "--providers", "cpu"]) == 1
    assert "- reads the sentences from stdin: give it alone" in one_error_line(capsys)


def run_cli(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmonnx", *map(str, args)], input=stdin,
                          capture_output=True, timeout=120)


def test_nan_logits_print_nan_and_strict_json(model, corpus, tmp_path, capsys):
    """A NaN model printed perplexity inf, and --json wrote NaN/Infinity (not JSON)."""
    nan_model = tmp_path / "nan.onnx"
    edit_logits(model, nan_model, nan=True)
    per_sentence = tmp_path / "s.jsonl"
    assert main(["evaluate", str(corpus), "--model", str(nan_model), "--json",
                 "--per-sentence", str(per_sentence)]) == 0

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    report = strict(capsys.readouterr().out)
    assert (report["nll"], report["perplexity"], report["perplexity_no_oov"]) == (None,) * 3
    assert [strict(line)["perplexity"] for line in per_sentence.read_text().splitlines()] == [None] * 3
    assert main(["evaluate", str(corpus), "--model", str(nan_model)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^perplexity +nan$", table, re.M) and "inf" not in table
    assert main(["score", "the cat", "--model", str(nan_model), "--json"]) == 0
    assert strict(capsys.readouterr().out)["logprob"] is None
    assert main(["predict", "the", "-k", "10", "--model", str(nan_model), "--json"]) == 0
    listed = [t["word"] for t in strict(capsys.readouterr().out)]
    assert sorted(listed) == sorted(WORDS + ["<unk>", "</s>"])


def test_generate_at_a_tiny_temperature_is_greedy_and_quiet(model):
    tiny = run_cli("generate", "the", "--temperature", "1e-320", "--words", "6", "--seed", "3",
                   "--model", model, "--json")
    greedy = run_cli("generate", "the", "--temperature", "0", "--words", "6", "--model", model,
                     "--json")
    assert tiny.returncode == 0 and tiny.stderr == b""
    assert json.loads(tiny.stdout) == json.loads(greedy.stdout)


def test_dash_reads_the_prefix_from_stdin_for_predict_and_generate(model):
    prefix = " ".join(["the cat sat on the mat"] * 20_000)  # 120k words: too long for argv
    for command in (["predict", "-k", "4"], ["generate", "--temperature", "0", "--words", "3"]):
        piped = run_cli(*command, "-", "--model", model, "--json",
                        stdin=(prefix.replace(" mat ", " mat\n") + "\n").encode())
        assert piped.returncode == 0, piped.stderr
        scorer = Scorer(model, providers="cpu")
        if command[0] == "predict":
            assert [(t["word"], t["probability"]) for t in json.loads(piped.stdout)] == \
                scorer.predict_next(prefix, k=4)
        else:
            out = json.loads(piped.stdout)
            assert out["words"] == scorer.generate(prefix, words=3, temperature=0)
            assert out["prefix"] == prefix


def test_score_gives_one_result_per_sentence_blank_ones_too(model):
    """`score ""` scored </s> while a blank stdin line was skipped: both score </s> now."""
    piped = run_cli("score", "--json", "--model", model, stdin=b"the cat\n\n  \na dog\n")
    assert piped.returncode == 0, piped.stderr
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["tokens"] for r in rows] == [3, 1, 1, 3]
    empty = run_cli("score", "", "--json", "--model", model)
    assert json.loads(empty.stdout) == rows[1] == rows[2]
    assert rows[1]["logprob"] == Scorer(model, providers="cpu").score([""])[0].logprob


def test_an_unreadable_corpus_names_its_path(model, capsys):
    """Reading /proc/self/mem fails with EIO: the error said "[Errno 5] Input/output error"."""
    assert main(["evaluate", "/proc/self/mem", "--model", str(model)]) == 1
    assert one_error_line(capsys) == (
        "lmonnx: error: /proc/self/mem: cannot read it: Input/output error")


# ---- found by a new-user trial of this release -----------------------------------------------

def test_per_token_to_stdout_keeps_the_report_off_stdout(model, corpus):
    """The table was printed into the middle of the JSON-lines stream on stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "lmonnx", "evaluate", str(corpus), "--model", str(model),
         "--providers", "cpu", "--per-token", "/dev/stdout"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["word"] for r in rows[:4]] == ["the", "cat", "sat", "</s>"] and len(rows) == 14
    assert "perplexity" in result.stderr and "corpus" in result.stderr


def test_api_file_errors_are_lmonnx_errors_too(model, corpus, tmp_path):
    from lmonnx import Scorer
    from lmonnx.errors import LmonnxError

    with pytest.raises(LmonnxError, match="model not found") as missing:
        Scorer(tmp_path / "nope.onnx", providers="cpu")
    assert isinstance(missing.value, FileNotFoundError)
    with pytest.raises(LmonnxError, match="is a directory") as directory:
        Scorer(tmp_path, providers="cpu")
    assert isinstance(directory.value, IsADirectoryError)
    existing = tmp_path / "sent.jsonl"
    existing.write_text("mine\n")
    with pytest.raises(LmonnxError, match="exists; pass --force") as exists:
        Scorer(model, providers="cpu").evaluate(corpus, per_sentence=existing)
    assert isinstance(exists.value, FileExistsError) and existing.read_text() == "mine\n"


def test_the_opset_floor_of_the_cli_is_exports():
    export = pytest.importorskip("lmonnx.export")
    assert export.MIN_OPSET == 11  # the CLI's --opset floor (cli._arguments_export)


def test_local_parquet_output_is_refused_not_written_as_json(model, corpus, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    assert main(["evaluate", str(corpus), "--model", str(model), "--per-sentence", str(out)]) == 1
    assert "Parquet is written with --ray only" in one_error_line(capsys) and not out.exists()
