"""The CUDA loss head, run with the CPU provider against the C kernel: the same per-position
log-probabilities (1e-5 relative) and the same top-1 hits, through every scoring path."""

import numpy as np
import pytest
from lmonnx._testing import build_random_lm, make_vocab

pytest.importorskip("onnx")

from lmonnx import Scorer  # noqa: E402
from lmonnx.batching import pad_batch  # noqa: E402
from lmonnx.evaluate import Evaluator, score_batch  # noqa: E402
from lmonnx.examples import ExampleBuilder  # noqa: E402
from lmonnx.corpus import sentences_of_lines  # noqa: E402
from lmonnx.runtime import ModelSession  # noqa: E402
from lmonnx.xent import token_nll_and_hits  # noqa: E402

WORDS = [f"w{i}" for i in range(300)]
RNG = np.random.default_rng(4)
LINES = [" ".join(RNG.choice(WORDS + ["zebra"], size=RNG.integers(1, 40))) for _ in range(120)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=32, layers=2, seed=9, scale=2.0)
    return path


def test_head_equals_kernel_per_position(model):
    kernel = ModelSession(model, providers="cpu")
    head = ModelSession(model, providers="cpu", loss_head=True)
    assert head.loss_head and not kernel.loss_head
    examples = list(ExampleBuilder(kernel.vocab).build_all(sentences_of_lines(LINES)))
    batch = pad_batch([(e.inputs, e.targets) for e in examples])
    logits = kernel.logits(batch.inputs)
    nll, hits = token_nll_and_hits(logits, batch.targets, batch.mask)
    logprob, hit, _ = head.run_head(batch.inputs, batch.targets)
    real = batch.mask > 0
    np.testing.assert_allclose(-logprob[real].astype(np.float64), nll[real], rtol=1e-5)
    assert np.array_equal(hit[real], hits[real])
    assert hits[real].any() and not hits[real].all()  # the comparison sees both outcomes


def test_head_and_kernel_give_the_same_report(model):
    kernel = Scorer(model, providers="cpu").evaluate(LINES)
    head_session = ModelSession(model, providers="cpu", loss_head=True)
    examples = ExampleBuilder(head_session.vocab).build_all(sentences_of_lines(LINES))
    head = Evaluator(head_session, max_tokens=256).run(examples)  # long lines in windows too
    assert (head.tokens, head.oovs, head.sentences) == (kernel.tokens, kernel.oovs,
                                                        kernel.sentences)
    assert head.nll == pytest.approx(kernel.nll, rel=1e-6)
    assert head.top1_accuracy == kernel.top1_accuracy


def test_a_head_session_refuses_logits_and_the_scorer_keeps_working(model, monkeypatch):
    head = ModelSession(model, providers="cpu", loss_head=True)
    with pytest.raises(ValueError, match="loss head"):
        head.logits(np.array([[2, 5]], np.int32))
    scorer = Scorer(model, providers="cpu")
    expected = scorer.predict_next("w1 w2", k=3)
    scorer._session, scorer._incremental_scorer = head, None  # what a CUDA Scorer holds
    assert scorer.predict_next("w1 w2", k=3) == expected
    session = scorer._incremental.session
    assert session is not head and not session.loss_head


def test_score_batch_masks_padding_with_the_head(model):
    head = ModelSession(model, providers="cpu", loss_head=True)
    kernel = ModelSession(model, providers="cpu")
    examples = list(ExampleBuilder(kernel.vocab).build_all(sentences_of_lines(LINES[:9])))
    batch = pad_batch([(e.inputs, e.targets) for e in examples])
    for a, b in zip(score_batch(head, batch), score_batch(kernel, batch)):
        assert (a.tokens, a.oovs, a.hits) == (b.tokens, b.oovs, b.hits)
        assert a.nll == pytest.approx(b.nll, rel=1e-6)
