"""Latency of ``Scorer.score`` (pytest-benchmark): one sentence, and batches of 1, 8 and 64.

The model is a random-weight lmonnx model of the PTB medium-small shape (V = 10000, 2 x 200
LSTM), built without TensorFlow, so the figures isolate runtime + kernel cost.  Run with
``make bench`` or ``pytest benchmarks/bench_scorer.py --benchmark-only``.
"""

import numpy as np
import pytest

from lmonnx import Scorer
from lmonnx._testing import build_random_lm, make_vocab

VOCAB = [f"w{i}" for i in range(10000 - 4)]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ptb_shape.onnx"
    build_random_lm(path, make_vocab(VOCAB), units=200, layers=2, embedding_dim=10, seed=0)
    return Scorer(path, providers="cpu", num_threads=2)


def sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, size=n)  # PTB sentences: mean ~21 words
    return [" ".join(rng.choice(VOCAB, size=k)) for k in lengths]


def test_score_one_sentence(benchmark, scorer):
    sentence = sentences(1)[0]
    perplexity = benchmark(scorer.perplexity, sentence)
    score = scorer.score([sentence])[0]
    assert score.tokens == len(sentence.split()) + 1
    assert perplexity == score.perplexity and 1.0 < perplexity < float("inf")


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_score_batch(benchmark, scorer, batch):
    batch_sentences = sentences(batch, seed=batch)
    results = benchmark(scorer.score, batch_sentences)
    # what was timed is the real work: the batch gives each sentence its score alone
    alone = [scorer.score([s])[0] for s in batch_sentences]
    assert [r.tokens for r in results] == [a.tokens for a in alone]
    assert [r.logprob for r in results] == pytest.approx([a.logprob for a in alone], abs=1e-4)
