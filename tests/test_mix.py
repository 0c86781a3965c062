"""Mixing lmonnx with KenLM per token (lmonnx.mix), on a random lmonnx model and ARPA files
written here: each branch of the OOV rule against kenlm's own ``full_scores``, the mix against
its formula, the mixed distribution summed over the whole vocabulary, the EM weight against a
grid search, batches against sentence-by-sentence scoring, and the errors."""

import json
import math
import sys
import warnings

import numpy as np
import pytest

kenlm = pytest.importorskip("kenlm")

from lmonnx import Scorer  # noqa: E402 (after the skip: the module needs kenlm)
from lmonnx._testing import build_random_lm, make_vocab  # noqa: E402
from lmonnx.errors import (ArtifactError, CorpusError, LmonnxError,  # noqa: E402
                           MissingDependencyError, PathIsDirectoryError, PathNotFoundError)
from lmonnx.mix import (LN10, MixedScorer, fit_weight, load_kenlm,  # noqa: E402
                        mix_token_logprobs)
from lmonnx.vocab import BOS_ID, PAD_ID  # noqa: E402

WORDS = "the a cat dog sat on mat ran big red hat sun".split()  # V = 16 with the specials
KENLM_ONLY = "zebra"  # in the mixed ARPA, not in lmonnx's vocabulary
LMONNX_ONLY = "mat"  # in lmonnx's vocabulary, not in the mixed ARPA
NEITHER = "qqq"
RNG = np.random.default_rng(11)
LINES = [" ".join(RNG.choice(WORDS + [KENLM_ONLY, NEITHER], size=RNG.integers(1, 12)))
         for _ in range(40)]
HELD_OUT = [" ".join(RNG.choice(WORDS + [KENLM_ONLY], size=RNG.integers(1, 12)))
            for _ in range(30)]


def arpa_text(unigrams: dict, bigrams: dict) -> str:
    """An ARPA 2-gram model: ``unigrams`` {word: (log10 p, log10 backoff)}, ``bigrams``
    {(history, word): log10 p}."""
    lines = ["\\data\\", f"ngram 1={len(unigrams)}", f"ngram 2={len(bigrams)}", "",
             "\\1-grams:"]
    lines += [f"{p:.10f}\t{w}\t{b:.10f}" for w, (p, b) in unigrams.items()]
    lines += ["", "\\2-grams:"]
    lines += [f"{p:.10f}\t{h} {w}" for (h, w), p in bigrams.items()]
    return "\n".join(lines + ["", "\\end\\", ""])


def normalized_bigram_arpa(words, seed: int) -> str:
    """A 2-gram over ``words``, ``</s>`` and ``<unk>`` whose p(. | h) sums to 1 for every h:
    random unigrams, three random bigrams after ``<s>`` and after each of the first two
    words, and each history's backoff weight computed to give the rest of its mass."""
    rng = np.random.default_rng(seed)
    vocab = [*words, "</s>", "<unk>"]
    unigram = dict(zip(vocab, rng.dirichlet(np.ones(len(vocab)))))
    backoff, bigrams = {}, {}
    for history in ["<s>", words[0], words[1]]:
        successors = rng.choice([*words, "</s>"], size=3, replace=False)
        probs = rng.uniform(0.05, 0.25, size=3)
        bigrams.update({(history, w): math.log10(p) for w, p in zip(successors, probs)})
        backoff[history] = (1 - probs.sum()) / (1 - sum(unigram[w] for w in successors))
    unigrams = {"<s>": (-99.0, math.log10(backoff["<s>"]))}
    unigrams.update({w: (math.log10(p), math.log10(backoff.get(w, 1.0)))
                     for w, p in unigram.items()})
    return arpa_text(unigrams, bigrams)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "random.onnx"
    build_random_lm(path, make_vocab(WORDS), units=8, layers=1, seed=5)
    return Scorer(path, providers="cpu", num_threads=1)


@pytest.fixture(scope="module")
def mixed_arpa(tmp_path_factory):
    """KenLM knows every lmonnx word but LMONNX_ONLY, and KENLM_ONLY."""
    path = tmp_path_factory.mktemp("kenlm") / "mixed.arpa"
    kenlm_words = [w for w in WORDS if w != LMONNX_ONLY] + [KENLM_ONLY]
    path.write_text(normalized_bigram_arpa(kenlm_words, seed=1))
    return path


@pytest.fixture(scope="module")
def same_vocab_arpa(tmp_path_factory):
    path = tmp_path_factory.mktemp("kenlm") / "same.arpa"
    path.write_text(normalized_bigram_arpa(WORDS, seed=2))
    return path


@pytest.fixture(scope="module")
def kenlm_model(mixed_arpa):
    return load_kenlm(mixed_arpa)


def kenlm_state_after(model, words):
    state, out = kenlm.State(), kenlm.State()
    model.BeginSentenceWrite(state)
    for word in words:
        model.BaseScore(state, word, out)
        state, out = out, state
    return state


# ---- the OOV rule, token by token, against kenlm's own numbers ----------------------------

@pytest.mark.parametrize("word, lm_oov, kenlm_oov", [
    ("cat", False, False),        # both know it: q = p_kenlm(word)
    (KENLM_ONLY, True, False),    # lmonnx's <unk>, KenLM's word: q = p_kenlm(word)
    (NEITHER, True, True),        # lmonnx's <unk>, KenLM's <unk>: q = KenLM's <unk> mass
    (LMONNX_ONLY, False, True),   # only lmonnx knows it: q = 0
])
def test_each_branch_of_the_oov_rule(scorer, kenlm_model, word, lm_oov, kenlm_oov):
    sentence = f"the {word} sun"
    tokens = MixedScorer(scorer, kenlm_model, 0.3).full_scores(sentence)
    own = list(kenlm_model.full_scores(sentence, bos=True, eos=True))
    assert [t.word for t in tokens] == ["the", word, "sun", "</s>"]
    assert [t.kenlm_oov for t in tokens] == [oov for _, _, oov in own]
    token = tokens[1]
    assert (token.lm_oov, token.kenlm_oov) == (lm_oov, kenlm_oov)
    if kenlm_oov and not lm_oov:
        assert token.kenlm_logprob == -math.inf
        assert token.logprob == pytest.approx(math.log(0.3) + token.lm_logprob, rel=1e-12)
    else:
        assert token.kenlm_logprob == pytest.approx(own[1][0] * LN10, rel=1e-12)
    unk_after_the = kenlm_model.BaseScore(kenlm_state_after(kenlm_model, ["the"]), "<unk>",
                                          kenlm.State()) * LN10
    if lm_oov:  # the word's own probability when KenLM knows it, else KenLM's <unk> mass
        assert (token.kenlm_logprob == pytest.approx(unk_after_the, rel=1e-12)) == kenlm_oov
    # the other tokens (both models know them) are kenlm's, converted, and lmonnx's own
    for t, (log10, _, _) in zip(tokens[::2], own[::2]):
        assert t.kenlm_logprob == pytest.approx(log10 * LN10, rel=1e-12)
    assert [t.lm_logprob for t in tokens] == [t.logprob for t in scorer.full_scores(sentence)]


def test_kenlm_gets_the_words_as_lmonnx_split_them(scorer, kenlm_model):
    """A no-break space splits words for lmonnx (str.split) but not for kenlm (bytes.split):
    KenLM is fed lmonnx's words, so both score the same tokens."""
    tokens = MixedScorer(scorer, kenlm_model, 0.5).full_scores("the\u00a0cat")
    own = list(kenlm_model.full_scores("the cat"))
    assert [t.word for t in tokens] == ["the", "cat", "</s>"]
    assert [t.kenlm_logprob for t in tokens] == pytest.approx([s * LN10 for s, _, _ in own],
                                                              rel=1e-12)


# ---- the mix ----------------------------------------------------------------------------------

def direct_mix(lm, q, weight):
    """log(L p + (1 - L) q) the plain way, in probability space (log 0 = -inf meant)."""
    with np.errstate(divide="ignore"):
        return np.log(weight * np.exp(lm) + (1 - weight) * np.exp(q))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_mix_is_the_formula_and_its_ends_are_each_model(scorer, kenlm_model, weight):
    sentence = f"the {KENLM_ONLY} {NEITHER} {LMONNX_ONLY} cat"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -inf at weight 0 must come without a warning
        tokens = MixedScorer(scorer, kenlm_model, weight).full_scores(sentence)
    lm = np.array([t.lm_logprob for t in tokens])
    q = np.array([t.kenlm_logprob for t in tokens])
    mixed = np.array([t.logprob for t in tokens])
    assert not np.isnan(mixed).any()
    if weight == 1.0:
        np.testing.assert_array_equal(mixed, lm)
    elif weight == 0.0:
        np.testing.assert_array_equal(mixed, q)
        assert mixed[3] == -math.inf  # LMONNX_ONLY: neither model gives it any probability
    else:
        np.testing.assert_allclose(mixed, direct_mix(lm, q, weight), rtol=1e-12)


def test_mix_token_logprobs_is_the_formula_in_probability_space():
    rng = np.random.default_rng(3)
    lm = np.log(rng.uniform(1e-6, 1, size=50))
    q = np.where(rng.random(50) < 0.2, -np.inf, np.log(rng.uniform(1e-6, 1, size=50)))
    for weight in (0.0, 0.3, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mixed = mix_token_logprobs(lm, q, weight)
        np.testing.assert_allclose(mixed, direct_mix(lm, q, weight), rtol=1e-12)


def test_weight_zero_with_a_word_kenlm_lacks_gives_an_infinite_perplexity(scorer, kenlm_model):
    lines = ["the cat sat", f"the {LMONNX_ONLY} sun"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at_zero = MixedScorer(scorer, kenlm_model, 0.0).evaluate(lines)
        at_half = MixedScorer(scorer, kenlm_model, 0.5).evaluate(lines)
    assert at_zero.kenlm_unknown == at_half.kenlm_unknown == 1
    assert at_zero.mixed_perplexity == at_zero.kenlm_perplexity == math.inf
    assert at_half.kenlm_perplexity == math.inf and math.isfinite(at_half.mixed_perplexity)
    assert math.isfinite(at_zero.lm_perplexity) and at_zero.lm_nll == at_half.lm_nll
    assert at_zero.mixed_nll == at_zero.kenlm_nll == math.inf


@pytest.mark.parametrize("history", ["", "the", "cat dog"])
def test_the_mix_sums_to_one_over_the_vocabulary_when_both_share_it(
        scorer, same_vocab_arpa, history):
    """Every token the mix can score after ``history``: the words, ``</s>``, and ``<unk>``
    (a word neither knows: KenLM's <unk> mass).  lmonnx's softmax also gives <pad> and <s>
    some mass (never targets, so never scored): with it, the sum is 1."""
    weight = 0.3
    mixer = MixedScorer(scorer, same_vocab_arpa, weight)
    position = len(history.split())
    tokens = [mixer.full_scores(f"{history} {w}")[position] for w in WORDS + [NEITHER]]
    tokens.append(mixer.full_scores(history)[position])  # </s>
    state = scorer.begin()
    for word in history.split():
        _, state = scorer.step(state, word)
    lm_dist = scorer.next_logprobs([state])[0].astype(np.float64)
    ids = [scorer.vocab.token_to_id(w) for w in WORDS + ["<unk>", "</s>"]]
    np.testing.assert_allclose([t.lm_logprob for t in tokens], lm_dist[ids], atol=1e-5)
    never_scored = np.exp(lm_dist[[PAD_ID, BOS_ID]]).sum()
    assert sum(math.exp(t.kenlm_logprob) for t in tokens) == pytest.approx(1.0, abs=1e-5)
    mixed_total = sum(math.exp(t.logprob) for t in tokens) + weight * never_scored
    assert mixed_total == pytest.approx(1.0, abs=1e-5)


# ---- the EM fit of the weight -----------------------------------------------------------------

def grid_optimum(lm, q) -> float:
    """The weight of highest log-likelihood: a grid of 1e-3, then one of 1e-6 around its best."""
    def best(grid):
        ll = [direct_mix(lm, q, w).sum() for w in grid]
        return grid[int(np.argmax(ll))]

    coarse = best(np.linspace(0, 1, 1001))
    return best(np.clip(np.linspace(coarse - 1e-3, coarse + 1e-3, 2001), 0, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_finds_the_weight_a_grid_search_finds(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    lm = np.log(rng.uniform(1e-4, 1, size=n) ** rng.uniform(0.5, 2))
    q = np.where(rng.random(n) < 0.05, -np.inf, np.log(rng.uniform(1e-4, 1, size=n)))
    weight = fit_weight(lm, q)
    assert 0.0 < weight < 1.0
    assert abs(weight - grid_optimum(lm, q)) < 1e-3


@pytest.mark.parametrize("lm, q, expected", [
    ([-1.0, -2.0], [-math.inf, -math.inf], 1.0),        # KenLM gives nothing: all lmonnx
    ([-math.inf, -math.inf], [-1.0, -3.0], 0.0),        # lmonnx gives nothing: all KenLM
    ([-0.01, -0.02, -0.05], [-9.0, -8.0, -7.0], 1.0),   # lmonnx far better everywhere
    ([-9.0, -8.0], [-0.01, -0.1], 0.0),
    ([-1.0, -math.inf], [-1.0, -math.inf], 0.5),       # a token neither can give is left out
])
def test_em_never_leaves_zero_one(lm, q, expected):
    weight = fit_weight(lm, q, max_iter=2000)
    assert 0.0 <= weight <= 1.0
    assert weight == pytest.approx(expected, abs=2e-3)


def test_em_refuses_tokens_no_model_can_give():
    with pytest.raises(ValueError, match="probability above 0"):
        fit_weight([-math.inf], [-math.inf])
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        fit_weight([-1.0, -2.0], [-1.0])


def test_auto_fits_on_the_held_out_text_and_not_on_the_evaluated_one(scorer, kenlm_model):
    mixer = MixedScorer(scorer, kenlm_model, "auto", fit_on=HELD_OUT)
    tokens = [t for line in HELD_OUT for t in mixer.full_scores(line)]
    expected = fit_weight([t.lm_logprob for t in tokens], [t.kenlm_logprob for t in tokens])
    assert mixer.weight == expected and 0.0 < expected < 1.0
    report = mixer.evaluate(LINES)
    assert report.weight == mixer.weight
    fitted_on_test = MixedScorer(scorer, kenlm_model, "auto", fit_on=LINES).weight
    assert fitted_on_test != mixer.weight


# ---- batches, streaming, reports ---------------------------------------------------------------

def test_batches_give_the_numbers_of_sentence_by_sentence_scoring(
        scorer, kenlm_model, tmp_path, monkeypatch):
    mixer = MixedScorer(scorer, kenlm_model, 0.4)
    calls = []
    score_examples = scorer.score_examples
    monkeypatch.setattr(scorer, "score_examples",
                        lambda examples, **kw: calls.append(len(examples))
                        or score_examples(examples, **kw))
    report = mixer.evaluate(LINES)
    assert calls == [len(LINES)]  # one look-ahead: one batched call, not one per sentence
    monkeypatch.undo()
    per_sentence = [mixer.full_scores(line) for line in LINES]
    assert report.sentences == len(LINES)
    assert report.tokens == sum(len(s) for s in per_sentence)
    assert report.lm_nll == scorer.evaluate(LINES).nll
    for field, attr in [("lm_nll", "lm_logprob"), ("kenlm_nll", "kenlm_logprob"),
                        ("mixed_nll", "logprob")]:
        expected = -sum(sum(getattr(t, attr) for t in s) for s in per_sentence)
        assert getattr(report, field) == pytest.approx(expected, rel=1e-12)
    assert report.mixed_perplexity == pytest.approx(math.exp(report.mixed_nll / report.tokens))
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES) + "\n")
    from_path = mixer.evaluate(path)
    assert from_path.corpus == str(path)
    assert {**from_path.to_dict(), "corpus": "<lines>"} == report.to_dict()


def test_no_sentences_is_an_error(scorer, kenlm_model):
    with pytest.raises(CorpusError, match="no sentences"):
        MixedScorer(scorer, kenlm_model, 0.5).evaluate(["", "  "])
    with pytest.raises(CorpusError, match="fit_on"):
        MixedScorer(scorer, kenlm_model, "auto", fit_on=[])


# ---- errors -----------------------------------------------------------------------------------

def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and isinstance(exc_info.value, LmonnxError)
    return message


def test_a_bad_arpa_file_is_a_one_line_error_naming_it_and_kenlms_reason(tmp_path):
    bad = tmp_path / "bad.arpa"
    bad.write_text("garbage\nmore garbage\n")
    with pytest.raises(ArtifactError) as info:
        load_kenlm(bad)
    assert isinstance(info.value, ValueError)
    message = one_line(info)
    assert str(bad) in message and "garbage" in message


def test_kenlms_own_console_output_does_not_precede_the_error(tmp_path, mixed_arpa, capfd):
    bad = tmp_path / "bad.arpa"
    bad.write_text("garbage\n")
    with pytest.raises(ArtifactError):
        load_kenlm(bad)
    load_kenlm(mixed_arpa)  # an ARPA that loads: KenLM's progress bar is not shown either
    assert capfd.readouterr().err == ""


def test_a_missing_path_or_a_directory_is_a_one_line_error(tmp_path, scorer):
    with pytest.raises(PathNotFoundError) as info:
        MixedScorer(scorer, tmp_path / "none.arpa")
    assert str(tmp_path / "none.arpa") in one_line(info)
    with pytest.raises(PathIsDirectoryError) as info:
        load_kenlm(tmp_path)
    assert str(tmp_path) in one_line(info)


def test_without_kenlm_the_error_says_how_to_install_it(monkeypatch, mixed_arpa):
    monkeypatch.setitem(sys.modules, "kenlm", None)  # `import kenlm` raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        load_kenlm(mixed_arpa)
    assert "pip install kenlm" in one_line(info)


@pytest.mark.parametrize("weight, error", [
    (-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    ("half", ValueError), ("AUTO", ValueError),
    (None, TypeError), ([0.5], TypeError), (True, TypeError),
])
def test_mix_weight_is_a_number_in_zero_one_or_auto(scorer, kenlm_model, weight, error):
    with pytest.raises(error, match="mix_weight"):
        MixedScorer(scorer, kenlm_model, weight)


def test_auto_needs_fit_on_and_fit_on_needs_auto(scorer, kenlm_model):
    with pytest.raises(ValueError, match="fit_on"):
        MixedScorer(scorer, kenlm_model, "auto")
    with pytest.raises(ValueError, match="fit_on"):
        MixedScorer(scorer, kenlm_model, 0.5, fit_on=HELD_OUT)
    assert MixedScorer(scorer, kenlm_model, np.float32(0.25)).weight == 0.25
    with pytest.raises(TypeError, match="kenlm_model"):
        MixedScorer(scorer, 3)


# ---- lmonnx evaluate --mix ---------------------------------------------------------------

def test_evaluate_mix_prints_the_three_perplexities(scorer, mixed_arpa, tmp_path, capsys):
    from lmonnx.cli import main
    from lmonnx.strict_json import json_text

    corpus, held_out = tmp_path / "test.txt", tmp_path / "held.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ran\n")
    held_out.write_text("\n".join(HELD_OUT) + "\n")
    model = str(scorer._session.source) if not isinstance(scorer._session.source, bytes) else None
    assert model is not None
    assert main(["evaluate", str(corpus), "--model", model, "--providers", "cpu",
                 "--mix", str(mixed_arpa), "--mix-weight", "0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = MixedScorer(scorer, load_kenlm(mixed_arpa), 0.3).evaluate(corpus)
    assert report == pytest.approx(json.loads(json_text(expected.to_dict())))  # inf: null
    assert report["kenlm_perplexity"] is None and report["kenlm_unknown"] > 0  # "mat": q = 0
    assert main(["evaluate", str(corpus), "--model", model, "--providers", "cpu",
                 "--mix", str(mixed_arpa), "--mix-weight", "auto", "--mix-fit",
                 str(held_out)]) == 0
    out = capsys.readouterr().out
    fitted = MixedScorer(scorer, load_kenlm(mixed_arpa), "auto", fit_on=held_out).weight
    assert f"L = {fitted:.4f} (fitted on {held_out})" in out and "mixed perplexity" in out


@pytest.mark.parametrize("flags, message", [
    (["--mix-weight", "0.5"], "--mix-weight weighs the KenLM mix: it needs --mix KENLM"),
    (["--mix", "ARPA", "--mix-weight", "1.5"], "--mix-weight takes a number in [0, 1] or auto"),
    (["--mix", "ARPA", "--mix-weight", "nan"], "--mix-weight takes a number in [0, 1] or auto"),
    (["--mix", "ARPA", "--mix-weight", "auto"], "give both"),
    (["--mix", "ARPA", "--per-token", "out.jsonl"], "--per-token is not available with --mix"),
    (["--mix", "BAD"], "BAD"),
])
def test_evaluate_mix_refuses_bad_flags_in_one_line(scorer, mixed_arpa, tmp_path, capsys,
                                                     flags, message):
    from lmonnx.cli import main

    corpus = tmp_path / "test.txt"
    corpus.write_text("the cat\n")
    bad = tmp_path / "bad.arpa"
    bad.write_text("this is not an ARPA file\n")
    flags = [{"ARPA": str(mixed_arpa), "BAD": str(bad),
              "out.jsonl": str(tmp_path / "out.jsonl")}.get(f, f) for f in flags]
    message = message.replace("BAD", str(bad))
    assert main(["evaluate", str(corpus), "--model", str(scorer._session.source),
                 "--providers", "cpu", *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.jsonl").exists()
