"""Latency of incremental scoring (pytest-benchmark): ``Scorer.step`` for one hypothesis and
``step_batch`` for a beam of 64, on a random-weight format-2 model of PTB shape (V = 10000,
2 x 200).  ``benchmarks/beam_table.py`` prints the side-by-side beam-search table."""

import numpy as np
import pytest

from lmonnx import Scorer
from lmonnx._testing import build_random_lm, make_vocab

VOCAB = [f"w{i}" for i in range(10000 - 4)]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ptb_shape_stateful.onnx"
    build_random_lm(path, make_vocab(VOCAB), units=200, layers=2, embedding_dim=10, seed=0)
    return Scorer(path, providers="cpu", num_threads=2)


def test_step_one_hypothesis(benchmark, scorer):
    state = scorer.begin()
    logprob, new = benchmark(scorer.step, state, "w7")
    assert logprob == pytest.approx(float(state.logprobs[scorer.vocab.token_to_id("w7")]))
    assert new.words == 1 and not new.ended


def test_step_batch_beam_64(benchmark, scorer):
    rng = np.random.default_rng(0)
    states = [scorer.begin()]
    for _ in range(3):  # hypotheses of different histories
        _, states = scorer.step_batch(states * 4, list(rng.choice(VOCAB, size=len(states) * 4)))
    states = states[:64]
    words = list(rng.choice(VOCAB, size=64))
    logprobs, new = benchmark(scorer.step_batch, states, words)
    # what was timed is the real work: the batch equals one step per hypothesis
    singles = [scorer.step(s, w) for s, w in zip(states[:4], words[:4])]
    assert logprobs[:4] == pytest.approx([lp for lp, _ in singles], abs=1e-6)
    assert len(new) == 64
