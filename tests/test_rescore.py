"""N-best rescoring (lmonnx.rescore, `lmonnx rescore`) on a random lmonnx model: both input
formats, the choice against a hand computation from ``Scorer.score``, ties, duplicates scored
once, WER against jiwer, the grid search against brute force, the one-line errors and the
output policy, and the KenLM mix."""

import json
import math
import re
import sys

import numpy as np
import pytest

from lmonnx import Scorer
from lmonnx._testing import build_random_lm, make_vocab
from lmonnx.cli import main
from lmonnx.errors import InvalidArgumentError
from lmonnx.rescore import (DEFAULT_ALPHAS, DEFAULT_BETAS, Utterance, combined_scores,
                            first_pass, lm_scores, output_lines, read_nbest, rescore, tune,
                            word_error_rate, word_errors)

WORDS = "the a cat dog sat on mat ran big red hat sun".split()
RNG = np.random.default_rng(3)


def _sentence(rng, low=1, high=7):
    return " ".join(rng.choice(WORDS + ["zebra"], size=rng.integers(low, high)))


REFERENCES = [_sentence(RNG, 2, 7) for _ in range(8)]


def _nbest(rng, reference):
    """Four hypotheses near ``reference``: itself, a word dropped, a word swapped, noise."""
    words = reference.split()
    dropped = " ".join(words[:-1])
    swapped = " ".join(words[:1] + [str(rng.choice(WORDS))] + words[2:])
    return [dropped, reference, swapped, _sentence(rng)]


HYPOTHESES = [_nbest(RNG, r) for r in REFERENCES]
HYPOTHESES[2][3] = HYPOTHESES[2][0]  # a text twice in one utterance
HYPOTHESES[5][2] = HYPOTHESES[1][1]  # and in two utterances
HYPOTHESES[6][3] = ""  # an empty hypothesis: scores </s> alone
AM = np.round(RNG.normal(-10, 2, size=(8, 4)), 3)
AM[4, 1] = AM[4, 2] = AM[4].max() + 1  # a first-pass tie


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "random.onnx"
    build_random_lm(path, make_vocab(WORDS), units=8, layers=1, seed=7)
    return path


@pytest.fixture(scope="module")
def scorer(model):
    return Scorer(model, providers="cpu", num_threads=1)


def write_tsv(path, hypotheses=HYPOTHESES, am=AM, newline="\n", bom=False):
    lines = [f"{h}\t{float(a)!r}" for hyps, ams in zip(hypotheses, am) for h, a in zip(hyps, ams)]
    path.write_bytes((("\ufeff" if bom else "") + newline.join(lines) + newline).encode())
    return path


def write_jsonl(path, hypotheses=HYPOTHESES, am=AM):
    lines = [json.dumps({"utterance": f"utt-{u}", "text": h, "am_score": float(a)})
             for u, (hyps, ams) in enumerate(zip(hypotheses, am)) for h, a in zip(hyps, ams)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "nbest.tsv", newline="\r\n", bom=True)


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "nbest.jsonl")


@pytest.fixture
def refs(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("\n".join(REFERENCES) + "\n")
    return path


def run(capsys, *args):
    """``lmonnx rescore *args``: (status, stdout, stderr)."""
    status = main(["rescore", *map(str, args), "--providers", "cpu", "--threads", "1"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def hand_best(scorer, alpha, beta):
    """The best index per utterance from Scorer.score, one sentence per call, in Python floats."""
    best = []
    for hyps, ams in zip(HYPOTHESES, AM):
        scores = [float(a) + alpha * scorer.score([h])[0].logprob + beta * len(h.split())
                  for h, a in zip(hyps, ams)]
        best.append(scores.index(max(scores)))  # the first of equal maxima
    return best


# ---- reading ------------------------------------------------------------------------------------

def test_tsv_and_jsonl_read_alike(tsv, jsonl):
    from_tsv, from_jsonl = read_nbest(tsv, beam_size=4), read_nbest(jsonl)
    assert [u.id for u in from_tsv] == [str(i) for i in range(1, 9)]
    assert [u.id for u in from_jsonl] == [f"utt-{i}" for i in range(8)]
    for a, b, hyps, ams in zip(from_tsv, from_jsonl, HYPOTHESES, AM):
        assert a.hypotheses == b.hypotheses == tuple(hyps)
        assert a.am_scores.dtype == np.float64
        assert np.array_equal(a.am_scores, ams) and np.array_equal(b.am_scores, ams)


def test_cli_gives_equal_results_on_both_formats(model, tsv, jsonl, capsys):
    status, out_tsv, _ = run(capsys, tsv, "--beam-size", 4, "--model", model)
    assert status == 0
    status, out_jsonl, _ = run(capsys, jsonl, "--model", model)
    assert status == 0
    records = [json.loads(line) for line in out_jsonl.splitlines()]
    assert out_tsv.splitlines() == [r["text"] for r in records]
    assert [r["utterance"] for r in records] == [f"utt-{i}" for i in range(8)]
    assert set(records[0]) == {"utterance", "text", "am_score", "lm_logprob", "score", "rank"}


def test_an_empty_hypothesis_scores_end_of_sentence_alone(scorer, tmp_path):
    (utterance,) = read_nbest(write_tsv(tmp_path / "e.tsv", [["", "the cat"]], [[-1.0, -2.0]]),
                              beam_size=2)
    assert utterance.hypotheses == ("", "the cat")
    lm = lm_scores(scorer, [utterance])[0]
    assert lm[0] == scorer.score([""])[0].logprob and scorer.score([""])[0].tokens == 1


# ---- the choice -------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, beta", [(0.5, 0.0), (1.3, -0.7), (2.0, 1.5)])
def test_best_is_the_hand_computation(scorer, model, jsonl, capsys, alpha, beta):
    utterances = read_nbest(jsonl)
    lm = lm_scores(scorer, utterances)
    for row, hyps in zip(lm, HYPOTHESES):  # the batched scores are each sentence's own
        assert row.tolist() == pytest.approx([scorer.score([h])[0].logprob for h in hyps],
                                             rel=1e-9)
    expected = hand_best(scorer, alpha, beta)
    assert rescore(utterances, lm, alpha, beta) == expected
    status, out, _ = run(capsys, jsonl, "--model", model, "--alpha", alpha, "--beta", beta)
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [r["rank"] for r in records] == expected
    for r, hyps, ams, row in zip(records, HYPOTHESES, AM, lm):
        assert r["text"] == hyps[r["rank"]] and r["am_score"] == ams[r["rank"]]
        assert r["lm_logprob"] == row[r["rank"]]
        assert r["score"] == pytest.approx(
            r["am_score"] + alpha * r["lm_logprob"] + beta * len(r["text"].split()), rel=1e-12)


def test_alpha_and_beta_zero_pick_the_highest_am_score(model, tsv, capsys):
    status, out, _ = run(capsys, tsv, "--beam-size", 4, "--model", model, "--alpha", 0)
    highest = [int(np.argmax(ams)) for ams in AM]  # argmax: the first of equal maxima
    assert status == 0 and out.splitlines() == [h[i] for h, i in zip(HYPOTHESES, highest)]
    assert first_pass(read_nbest(tsv, beam_size=4)) == highest
    assert highest[4] == 1  # the tie went to the earlier of hypotheses 1 and 2


def test_ties_go_to_the_earlier_hypothesis(scorer):
    # the same text twice: equal scores whatever alpha and beta
    twice = Utterance("u", ("a dog", "the cat", "a dog"), [-3.0, -9.0, -3.0])
    # different texts, equal new scores: am 0 and 2, lm -1 and -2 at alpha 2
    equal = Utterance("v", ("x", "y"), [0.0, 2.0])
    lm = lm_scores(scorer, [twice]) + [np.array([-1.0, -2.0])]
    for alpha, beta in [(0.0, 0.0), (0.7, -1.0), (2.0, 0.0)]:
        assert rescore([twice, equal], lm, alpha, beta)[0] == 0
    assert combined_scores([equal], lm[1:], 2.0, 0.0)[0].tolist() == [-2.0, -2.0]
    assert rescore([equal], lm[1:], 2.0, 0.0) == [0]


def test_all_writes_every_hypothesis_with_its_score(scorer, model, jsonl, tsv, tmp_path,
                                                    capsys):
    utterances = read_nbest(jsonl)
    lm = lm_scores(scorer, utterances)
    scores = combined_scores(utterances, lm, 0.8, -0.5)
    best = rescore(utterances, lm, 0.8, -0.5)
    status, out, _ = run(capsys, jsonl, "--model", model, "--alpha", 0.8, "--beta", -0.5,
                         "--all")
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and len(records) == 32
    assert [r["score"] for r in records] == [s for row in scores for s in row.tolist()]
    assert [r["rank"] for r in records] == [i for _ in range(8) for i in range(4)]
    assert [i for i, r in enumerate(records) if r["best"]] == [4 * u + b for u, b in
                                                               enumerate(best)]
    # TSV: text<TAB>score, NeMo's shape: it reads back as an n-best list
    out_path = tmp_path / "all.tsv"
    status, _, _ = run(capsys, tsv, "--beam-size", 4, "--model", model, "--alpha", 0.8,
                       "--beta", -0.5, "--all", "-o", out_path)
    again = read_nbest(out_path, beam_size=4)
    assert status == 0 and [u.hypotheses for u in again] == [u.hypotheses for u in utterances]
    assert [u.am_scores.tolist() for u in again] == [row.tolist() for row in scores]


def test_identical_texts_are_scored_once(scorer, jsonl):
    class Counting:
        def __init__(self):
            self.calls = []

        def score(self, texts):
            self.calls.append(list(texts))
            return scorer.score(texts)

    utterances = read_nbest(jsonl)
    distinct = {h for hyps in HYPOTHESES for h in hyps}
    assert len(distinct) < 32
    counting = Counting()
    lm = lm_scores(counting, utterances)
    assert len(counting.calls) == 1 and sorted(counting.calls[0]) == sorted(distinct)
    counting = Counting()  # in chunks of whole utterances: still each text once
    assert [row.tolist() for row in lm_scores(counting, utterances, chunk_hypotheses=6)] == \
        [row.tolist() for row in lm]
    flat = [t for call in counting.calls for t in call]
    assert len(counting.calls) == 8 and sorted(flat) == sorted(distinct)


# ---- word error rates and tuning ------------------------------------------------------------

def test_wer_matches_a_hand_computed_case():
    pytest.importorskip("jiwer")
    # 1 deletion + 1 insertion over 6 reference words
    assert word_error_rate(["the cat sat", "a dog ran"], ["the cat", "a big dog ran"]) == 2 / 6
    utterances = [Utterance("1", ("the cat sat", "the cat", "the mat sat on", ""),
                            [0.0, 0.0, 0.0, 0.0])]
    errors, reference_words = word_errors(utterances, ["the cat sat"])
    assert errors[0].tolist() == [0, 1, 2, 3] and reference_words == 3


def test_references_print_both_wers(model, tsv, refs, tmp_path, capsys):
    jiwer = pytest.importorskip("jiwer")
    out_path = tmp_path / "best.txt"
    status, out, err = run(capsys, tsv, "--beam-size", 4, "--model", model, "--references",
                           refs, "-o", out_path, "--json")
    summary = json.loads(out)
    first = [h[int(np.argmax(a))] for h, a in zip(HYPOTHESES, AM)]
    assert status == 0 and err == ""
    assert summary["first_pass_wer"] == jiwer.wer(REFERENCES, first)
    assert summary["wer"] == jiwer.wer(REFERENCES, out_path.read_text().splitlines())
    assert (summary["alpha"], summary["beta"], summary["utterances"]) == (0.5, 0.0, 8)
    status, out, err = run(capsys, tsv, "--beam-size", 4, "--model", model, "--references",
                           refs)  # the output on stdout, the WERs on stderr
    assert f"{summary['first_pass_wer'] * 100:.2f}%" in err.splitlines()[0]
    assert len(out.splitlines()) == 8


def test_tune_finds_the_grid_minimum(scorer, jsonl):
    jiwer = pytest.importorskip("jiwer")
    utterances = read_nbest(jsonl)
    lm = lm_scores(scorer, utterances)
    result = tune(utterances, lm, REFERENCES)
    assert len(result.rows) == len(DEFAULT_ALPHAS) * len(DEFAULT_BETAS) == 21 * 9
    brute = {}
    for alpha in DEFAULT_ALPHAS:  # each row's WER is jiwer's of that setting's choice
        for beta in DEFAULT_BETAS:
            chosen = rescore(utterances, lm, alpha, beta)
            brute[alpha, beta] = jiwer.wer(REFERENCES, [u.hypotheses[i] for u, i in
                                                        zip(utterances, chosen)])
    assert {(r.alpha, r.beta): r.wer for r in result.rows} == brute
    assert result.best.wer == min(brute.values()) <= result.first_pass_wer
    assert result.first_pass_wer == brute[0.0, 0.0]
    tied = [r for r in result.rows if r.errors == result.best.errors]
    assert (result.best.alpha, abs(result.best.beta)) == min((r.alpha, abs(r.beta))
                                                             for r in tied)
    assert result.best.wer < result.first_pass_wer  # the model's words beat noise here


def test_tune_on_the_command_line_prints_its_table_and_reproduces(scorer, model, jsonl, refs,
                                                                  tmp_path, capsys):
    pytest.importorskip("jiwer")
    result = tune(read_nbest(jsonl), lm_scores(scorer, read_nbest(jsonl)), REFERENCES)
    runs = []
    for name in ("a.jsonl", "b.jsonl"):
        status, out, err = run(capsys, jsonl, "--model", model, "--references", refs,
                               "--tune", "-o", tmp_path / name)
        assert status == 0 and err == ""
        runs.append(out)
    assert runs[0] == runs[1]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    table = [line.split() for line in runs[0].splitlines()
             if re.match(r"^\s+[\d.]+\s+-?[\d.]+\s+[\d.]+%", line)]
    assert len(table) == 10
    for cells, row in zip(table, result.rows):
        assert (float(cells[0]), float(cells[1])) == (row.alpha, row.beta)
        assert cells[2] == f"{row.wer * 100:.2f}%"
        assert cells[3] == f"{result.first_pass_wer * 100:.2f}%"
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    utterances = read_nbest(jsonl)
    lm = lm_scores(scorer, utterances)
    assert [r["rank"] for r in records] == rescore(utterances, lm, result.best.alpha,
                                                   result.best.beta)
    assert f"rescored WER   {result.best.wer * 100:.2f}%" in runs[0]
    # the output on stdout: the table goes to stderr
    status, out, err = run(capsys, jsonl, "--model", model, "--references", refs, "--tune")
    assert status == 0 and err == runs[0]
    assert out.encode() == (tmp_path / "a.jsonl").read_bytes()


def test_missing_jiwer_is_one_line(model, tsv, refs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jiwer", None)  # import jiwer now raises ImportError
    out_path = tmp_path / "out.txt"
    status, _, err = run(capsys, tsv, "--beam-size", 4, "--model", model, "--references",
                         refs, "-o", out_path)
    assert status == 1 and not out_path.exists()
    assert err.count("\n") == 1 and "pip install 'lmonnx[asr]'" in err


# ---- errors and the output policy ---------------------------------------------------------

GOOD_TSV = "the cat\t-1.5\n"
GOOD_JSON = '{"utterance": "u1", "text": "the cat", "am_score": -1.5}\n'


@pytest.mark.parametrize("name, content, extra, line, match", [
    ("n.tsv", GOOD_TSV + "the cat -2.0\n", ["--beam-size", 1], 2, "no tab"),
    ("n.tsv", GOOD_TSV + "the\tcat\t-2.0\n", ["--beam-size", 1], 2, "2 tabs"),
    ("n.tsv", GOOD_TSV + "the cat\tloud\n", ["--beam-size", 1], 2, "not a number"),
    ("n.tsv", GOOD_TSV * 2 + "the cat\tnan\n", ["--beam-size", 1], 3, "not a finite"),
    ("n.tsv", GOOD_TSV + "the cat\t-inf\n", ["--beam-size", 1], 2, "not a finite"),
    ("n.tsv", GOOD_TSV + "\n", ["--beam-size", 1], 2, "no tab"),
    ("n.tsv", GOOD_TSV + "the \xff cat\t-1\n", ["--beam-size", 1], 2, "UTF-8"),
    ("n.jsonl", GOOD_JSON + '{"utterance": "u1", "text": \n', [], 2, "not valid JSON"),
    ("n.jsonl", GOOD_JSON + '{"utterance": "u1", "am_score": 1}\n', [], 2, 'no "text"'),
    ("n.jsonl", GOOD_JSON + '{"utterance": "u1", "text": 5, "am_score": 1}\n', [], 2,
     '"text" must be a string, got a number'),
    ("n.jsonl", GOOD_JSON + '{"utterance": 7, "text": "a", "am_score": 1}\n', [], 2,
     '"utterance" must be a string'),
    ("n.jsonl", GOOD_JSON + '{"utterance": "u1", "text": "a", "am_score": "1"}\n', [], 2,
     '"am_score" must be a number, got a string'),
    ("n.jsonl", GOOD_JSON + '{"utterance": "u1", "text": "a", "am_score": true}\n', [], 2,
     "got a boolean"),
    ("n.jsonl", GOOD_JSON + '{"utterance": "u1", "text": "a", "am_score": NaN}\n', [], 2,
     "not a finite"),
    ("n.jsonl", GOOD_JSON + '["u1", "a", 1]\n', [], 2, "expected a JSON object"),
    ("n.jsonl", GOOD_JSON + GOOD_JSON.replace("u1", "u2") + "\n" + GOOD_JSON, [], 4,
     "'u1' again after another utterance"),
])
def test_a_malformed_line_is_one_error_naming_it(model, tmp_path, capsys, name, content,
                                                 extra, line, match):
    nbest = tmp_path / name
    nbest.write_bytes(content.encode("latin-1"))
    out_path = tmp_path / "out.txt"
    status, out, err = run(capsys, nbest, *extra, "--model", model, "-o", out_path)
    assert status == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"lmonnx: error: {nbest}:{line}: ") and match in err, err
    assert not out_path.exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("lines, extra, match", [
    (7, ["--beam-size", 2], "7 lines is not a multiple of the beam size 2"),
    (4, [], "needs its beam size"),
    (4, ["--beam-size", 2, "--tune"], "--tune chooses alpha and beta by WER"),
    (4, ["--beam-size", 2, "--references", "REFS"], "3 references for 2 utterances"),
    (4, ["--beam-size", 2, "--alpha-grid", "0,1"], "needs --tune"),
    (4, ["--beam-size", 2, "--mix-weight", "0.3"], "needs --mix"),
])
def test_other_errors_are_one_line_and_write_nothing(model, tmp_path, capsys, lines, extra,
                                                     match):
    nbest = tmp_path / "n.tsv"
    nbest.write_text(GOOD_TSV * lines)
    refs = tmp_path / "refs.txt"
    refs.write_text("the cat\n" * 3)
    out_path = tmp_path / "out.txt"
    extra = [str(refs) if e == "REFS" else e for e in extra]
    status, out, err = run(capsys, nbest, *extra, "--model", model, "-o", out_path)
    assert status == 1 and out == "" and err.count("\n") == 1 and match in err, err
    assert not out_path.exists()


def test_an_existing_output_needs_force(model, tsv, tmp_path, capsys):
    out_path = tmp_path / "best.txt"
    out_path.write_text("mine\n")
    status, _, err = run(capsys, tsv, "--beam-size", 4, "--model", model, "-o", out_path)
    assert status == 1 and "exists; pass --force" in err and out_path.read_text() == "mine\n"
    status, _, _ = run(capsys, tsv, "--beam-size", 4, "--model", model, "-o", out_path,
                       "--force")
    assert status == 0 and len(out_path.read_text().splitlines()) == 8
    status, _, err = run(capsys, tsv, "--beam-size", 4, "--model", model, "-o", tsv, "--force")
    assert status == 1 and "is an input of this command" in err


def test_stdin_needs_the_format(model, tsv, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tsv.read_bytes())))
    status, out, _ = run(capsys, "-", "--format", "tsv", "--beam-size", 4, "--model", model)
    status_file, out_file, _ = run(capsys, tsv, "--beam-size", 4, "--model", model)
    assert status == status_file == 0 and out == out_file
    status, out, err = run(capsys, "-", "--beam-size", 4, "--model", model)
    assert status == 1 and "needs its format: --format tsv|jsonl" in err


def test_api_arguments_are_checked(scorer, jsonl):
    utterances = read_nbest(jsonl)
    lm = lm_scores(scorer, utterances)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        rescore(utterances, lm, -1.0, 0.0)
    with pytest.raises(InvalidArgumentError, match="one array per utterance"):
        rescore(utterances, lm[:-1], 0.5, 0.0)
    with pytest.raises(InvalidArgumentError, match="beam size"):
        read_nbest(jsonl, beam_size=4)
    with pytest.raises(InvalidArgumentError, match="cannot tell"):
        read_nbest(jsonl.with_suffix(".txt"))
    assert list(output_lines(utterances[:1], lm[:1], 0.5, 0.0, format="tsv")) == \
        [utterances[0].hypotheses[rescore(utterances[:1], lm[:1])[0]]]


# ---- the KenLM mix ---------------------------------------------------------------------------

def small_arpa(words, seed):
    """An ARPA 2-gram model over ``words``, ``</s>`` and ``<unk>``: random unigrams (backoff
    weights 0) and one bigram, ``<s> the`` (kenlm wants a bigram at least)."""
    vocab = [*words, "</s>", "<unk>"]
    probs = np.random.default_rng(seed).dirichlet(np.ones(len(vocab)))
    lines = ["\\data\\", f"ngram 1={len(vocab) + 1}", "ngram 2=1", "", "\\1-grams:",
             "-99\t<s>\t0"]
    lines += [f"{math.log10(p):.10f}\t{w}\t0" for w, p in zip(vocab, probs)]
    lines += ["", "\\2-grams:", "-0.2\t<s> the", "", "\\end\\", ""]
    return "\n".join(lines)


def test_mix_with_kenlm(scorer, model, jsonl, tmp_path, capsys):
    pytest.importorskip("kenlm")
    from lmonnx.mix import MixedScorer

    arpa = tmp_path / "uni.arpa"
    arpa.write_text(small_arpa([w for w in WORDS if w != "mat"], seed=4))
    mixed = MixedScorer(scorer, arpa, 0.3)
    utterances = read_nbest(jsonl)
    lm = lm_scores(mixed, utterances)
    for row, hyps in zip(lm, HYPOTHESES):
        assert row.tolist() == pytest.approx(
            [sum(t.logprob for t in mixed.full_scores(h)) for h in hyps], rel=1e-9)
    assert not np.allclose(np.concatenate(lm), np.concatenate(lm_scores(scorer, utterances)))
    status, out, _ = run(capsys, jsonl, "--model", model, "--mix", arpa, "--mix-weight", 0.3,
                         "--alpha", 1.0)
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [r["rank"] for r in records] == rescore(utterances, lm, 1.0, 0.0)
    assert [r["lm_logprob"] for r in records] == [row[r["rank"]] for r, row in zip(records, lm)]
