"""`lmonnx evaluate`, `score` and `predict` from the command line (lmonnx.cli.main)."""

import json
import math
import os
import re
import threading

import pytest
from lmonnx._testing import build_random_lm, make_vocab

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
], ids=["batch0", "k0", "temperature-nan", "synth-seed", "max-change"])
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
    assert [r["tokens"] for r in rows] == [4, 3] and all(r["logprob"] < 0 for r in rows)
    assert main(["predict", "the cat", "-k", "3", "--model", str(model), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]


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
    writer = threading.Thread(target=lambda: fifo.write_text("the cat sat\na dog\n"))
    writer.start()
    assert main(["evaluate", str(fifo), "--model", str(model), "--json"]) == 0
    writer.join()
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
