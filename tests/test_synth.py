"""The synthetic corpus: exact likelihood, entropy rate, determinism, file handling."""

import itertools
import json
import math

import numpy as np
import pytest

from lmonnx.synth import (DEFAULT_WORDS, MarkovChain, make_chain, sample_splits, write_corpus)
from lmonnx.vocab import TokenizerOptions, Vocabulary

SMALL = dict(train_sentences=300, valid_sentences=50, test_sentences=60)


def _dense(chain):
    """The substochastic transition matrix Q [V, V] (Q[i, j] = T[i, j]), for small chains."""
    q = np.zeros((len(chain), len(chain)))
    for i, (s, p) in enumerate(zip(chain.successors, chain.probs)):
        q[i, s] = p
    return q


def _tiny_chain():
    # 3 words, every transition allowed, high eos so short sentences carry most of the mass
    start = [0.5, 0.3, 0.2]
    succ = [[0, 1, 2], [2, 0], [1]]
    probs = [[0.2, 0.1, 0.2], [0.3, 0.3], [0.6]]
    eos = [0.5, 0.4, 0.4]
    return MarkovChain(start, succ, probs, eos)


def test_log_prob_by_hand():
    c = _tiny_chain()
    assert c.names == ("w0", "w1", "w2")
    assert c.log_prob(["w0"]) == pytest.approx(math.log(0.5 * 0.5))
    assert c.log_prob(["w1", "w2", "w1", "w0"]) == pytest.approx(math.log(0.3 * 0.3 * 0.6 * 0.3 * 0.5))
    assert c.log_prob([1, 2, 1, 0]) == c.log_prob(["w1", "w2", "w1", "w0"])
    assert c.log_prob(["w2", "w0"]) == -math.inf  # w2 -> w0 is not a transition
    assert c.log_prob([]) == -math.inf


def test_sentence_probabilities_sum_to_one():
    """Brute force: all sentences up to length L carry 1 - P(length > L) of the mass."""
    c = _tiny_chain()
    L = 7
    total = sum(math.exp(c.log_prob(s)) for n in range(1, L + 1)
                for s in itertools.product(range(3), repeat=n))
    q = _dense(c)
    p_longer = float(c.start @ np.linalg.matrix_power(q, L) @ np.ones(3))
    assert total == pytest.approx(1.0 - p_longer, abs=1e-12)


def test_log_prob_matches_dense_computation():
    c = make_chain(3, words=50)
    q = _dense(c)
    np.testing.assert_allclose(q.sum(axis=1) + c.eos, 1.0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = c.sample_ids(rng)
        dense = math.log(c.start[s[0]]) + sum(math.log(q[a, b]) for a, b in zip(s, s[1:])) \
            + math.log(c.eos[s[-1]])
        assert c.log_prob(s) == pytest.approx(dense, rel=1e-12)
        assert c.log_prob([c.names[i] for i in s]) == c.log_prob(s)


def test_empirical_nll_matches_entropy_rate():
    c = make_chain(0)
    rng = np.random.default_rng(123)
    sentences = [c.sample_ids(rng) for _ in range(20_000)]
    tokens = sum(len(s) + 1 for s in sentences)
    nll = -math.fsum(c.log_prob(s) for s in sentences)
    assert nll / tokens == pytest.approx(c.entropy_rate(), rel=0.01)
    assert tokens / len(sentences) == pytest.approx(c.expected_tokens(), rel=0.02)


def test_default_chain_regime():
    c = make_chain(0)
    assert len(c) == DEFAULT_WORDS
    assert 10 < math.exp(c.entropy_rate()) < 40  # learnable, not trivial
    assert 8 < c.expected_tokens() < 14
    assert c.expected_visits().min() * 15_000 > 10  # every word frequent in a default train split


def test_chain_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovChain([1.0, 0.0], [[1], [0]], [[0.5], [0.5]], [0.4, 0.5])
    with pytest.raises(ValueError, match="distinct"):
        MarkovChain([1.0, 0.0], [[1, 1], [0]], [[0.25, 0.25], [0.5]], [0.5, 0.5])
    with pytest.raises(ValueError, match="words"):
        MarkovChain.random(1)


def _read(d, name):
    return (d / f"{name}.txt").read_text(encoding="utf-8")


def test_write_corpus_summary_and_files(tmp_path):
    summary = write_corpus(tmp_path / "synth", seed=5, words=40, **SMALL)
    d = tmp_path / "synth"
    # Every figure in truth.json is recomputed from the text files and an independently
    # rebuilt chain, so a wrong count or likelihood in the writer fails here.
    truth = json.loads((d / "truth.json").read_text())
    assert truth == summary  # and the returned summary is what the file says
    assert truth["seed"] == 5 and truth["words"] == 40
    assert truth["sentences"] == {"train": 300, "valid": 50, "test": 60}
    chain = make_chain(5, words=40)
    assert truth["entropy_rate_nats"] == pytest.approx(chain.entropy_rate())
    for split in ("train", "valid", "test"):
        lines = _read(d, split).splitlines()
        assert len(lines) == truth["sentences"][split]
        assert all(line and line == " ".join(line.split()) for line in lines)
        tokens = sum(len(line.split()) + 1 for line in lines)
        assert tokens == truth["tokens"][split]
        nll = -math.fsum(chain.log_prob(line.split()) for line in lines)
        assert truth["nll"][split] == pytest.approx(nll, rel=1e-12)
        assert truth["true_perplexity"][split] == pytest.approx(math.exp(nll / tokens), rel=1e-12)


def test_determinism_by_seed(tmp_path):
    a = write_corpus(tmp_path / "a", seed=1, words=30, **SMALL)
    b = write_corpus(tmp_path / "b", seed=1, words=30, **SMALL)
    c = write_corpus(tmp_path / "c", seed=2, words=30, **SMALL)
    assert a == b and a != c
    for split in ("train", "valid", "test"):
        assert _read(tmp_path / "a", split) == _read(tmp_path / "b", split)
        assert _read(tmp_path / "a", split) != _read(tmp_path / "c", split)


def test_test_text_independent_of_train_size():
    _, small = sample_splits(0, 30, train=10, test=20)
    _, big = sample_splits(0, 30, train=500, test=20)
    assert small["test"] == big["test"] and small["train"] == big["train"][:10]


def test_refuses_to_overwrite(tmp_path):
    write_corpus(tmp_path, words=20, **SMALL)
    before = _read(tmp_path, "train")
    with pytest.raises(FileExistsError, match="--force") as ei:
        write_corpus(tmp_path, seed=9, words=20, **SMALL)
    assert "\n" not in str(ei.value)
    assert _read(tmp_path, "train") == before
    write_corpus(tmp_path, seed=9, words=20, force=True, **SMALL)
    assert _read(tmp_path, "train") != before


@pytest.mark.parametrize("truth", [None, "{}", "not json", '{"format": "lmonnx-synth/1"}'])
def test_force_never_replaces_a_users_own_corpus(tmp_path, truth):
    """--force replaces what synth wrote (its truth.json says so), never a user's train.txt."""
    (tmp_path / "train.txt").write_text("my own corpus\n", encoding="utf-8")
    if truth is not None:
        (tmp_path / "truth.json").write_text(truth, encoding="utf-8")
    if truth and "lmonnx-synth" in truth:
        write_corpus(tmp_path, words=20, force=True, **SMALL)
        assert _read(tmp_path, "train") != "my own corpus\n"
        return
    with pytest.raises(FileExistsError, match="no lmonnx synth truth.json") as ei:
        write_corpus(tmp_path, words=20, force=True, **SMALL)
    assert "\n" not in str(ei.value)
    assert (tmp_path / "train.txt").read_text(encoding="utf-8") == "my own corpus\n"
    assert not (tmp_path / "valid.txt").exists()


@pytest.mark.parametrize("kwargs", [dict(words=1), dict(train_sentences=0), dict(test_sentences=-3)])
def test_rejects_bad_sizes(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_corpus(tmp_path, **{**SMALL, **kwargs})


def test_default_corpus_fits_a_vocabulary(tmp_path):
    summary = write_corpus(tmp_path)
    assert 5 < summary["true_perplexity"]["test"] < 40
    vocab = Vocabulary.fit(_read(tmp_path, "train").splitlines(), 10_000,
                           TokenizerOptions.from_preset("keras"))
    assert len(vocab) == DEFAULT_WORDS + 4  # every word type occurs in train
    ids = np.concatenate([vocab.encode(line) for line in _read(tmp_path, "test").splitlines()])
    assert (ids >= 4).all()  # no OOV in the test text


def test_cli_synth(tmp_path, capsys):
    from lmonnx.cli import main

    out = tmp_path / "s"
    argv = ["synth", "--out", str(out), "--words", "20", "--train-sentences", "30",
            "--valid-sentences", "5", "--test-sentences", "5"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sentences"]["train"] == 30
    assert main(argv) != 0
    assert "--force" in capsys.readouterr().err


def _numpy_chain_successors(seed, words, lo=12, hi=32, zipf=0.6):
    """The successor draws as NumPy's ``choice`` makes them (the code before the sparse
    draw): the reference the sparse draw must equal index for index."""
    chain_seq = np.random.SeedSequence(seed).spawn(4)[0]
    rng = np.random.default_rng(chain_seq)
    rank_w = 1.0 / np.arange(1, words + 1) ** zipf
    rng.uniform(0.04, 0.16, size=words)
    out = []
    for i in range(words):
        k = int(min(rng.integers(lo, hi + 1), words))
        w = rank_w.copy()
        w[(i + 1) % words] = 0.0
        others = rng.choice(words, size=k - 1, replace=False, p=w / w.sum())
        out.append(rng.permutation(np.append(others, (i + 1) % words)))
    return out


@pytest.mark.parametrize("seed,words", [(0, 100), (1, 30), (3, 2), (0, 1500)])
def test_sparse_draw_gives_numpys_chain(seed, words):
    """Same seed, same corpus as before the sparse rewrite (the oracle's and the demo's
    figures were measured on it)."""
    chain = make_chain(seed, words)
    expected = _numpy_chain_successors(seed, words)
    assert all(np.array_equal(a, b) for a, b in zip(chain.successors, expected))


def test_expected_visits_equal_the_dense_solve():
    c = make_chain(4, words=60)
    dense = np.linalg.solve((np.eye(60) - _dense(c)).T, c.start)
    np.testing.assert_allclose(c.expected_visits(), dense, rtol=1e-12)


def test_large_vocabulary_never_builds_a_dense_matrix(tmp_path):
    """`synth --words 40000` died building a dense 40000 x 40000 matrix (12.8 GB); 3000 words
    took 3 such 72 MB arrays.  Sparse: the whole corpus, chain and entropy rate included,
    stays under half of one dense 3000 x 3000 float64 array."""
    import tracemalloc

    tracemalloc.start()
    try:
        summary = write_corpus(tmp_path / "s", words=3000, train_sentences=3,
                               valid_sentences=3, test_sentences=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3000 * 3000 * 8 / 2, peak
    assert summary["words"] == 3000 and math.isfinite(summary["entropy_rate_nats"])


def test_seed_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match="seed must be an integer >= 0; got -1"):
        write_corpus(tmp_path / "s", seed=-1, **SMALL)
