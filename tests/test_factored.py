"""The factored (adaptive) softmax: exact, normalized probabilities over every word, the
clusters computed only where needed, and the format-3 file end to end.

The entry points' agreement on a factored model (evaluate == score == full_scores == step,
Ray == local, serve == Scorer, int8) is checked by the scoring test modules themselves, whose
model fixtures run on both softmaxes (``lmonnx._testing.SOFTMAXES``).
"""

import json
from contextlib import nullcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmonnx._testing import build_random_lm, make_vocab
from lmonnx.errors import InvalidArgumentError
from lmonnx.factored import TailLayers, check_cutoffs, default_cutoffs, tail_dims
from lmonnx.runtime import ModelSession

WORDS = [f"w{i}" for i in range(120)]  # V = 124


def random_tails(rng, vocab_size, units, cuts, scale=2.0):
    full = check_cutoffs(cuts, vocab_size)
    dims = tail_dims(units, len(full) - 1)
    sizes = [b - a for a, b in zip(full, full[1:])]
    return TailLayers(
        tuple(full),
        tuple(rng.normal(size=(units, d)).astype(np.float32) for d in dims),
        tuple((rng.normal(size=(d, n)) * scale).astype(np.float32) for d, n in zip(dims, sizes)),
        tuple(rng.normal(size=n).astype(np.float32) for n in sizes))


# ---- the arithmetic (numpy, no model) --------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([[6], [10, 30], [5, 6, 40, 41]]),
       st.floats(0.1, 6.0), st.floats(0.0, 1.0))
def test_targets_score_as_the_full_distribution_says(seed, cuts, spread, argmax_share):
    """NLL and top-1 hit of each target, computing a cluster only where needed, equal the
    full distribution's (every cluster at every position), which sums to 1."""
    rng = np.random.default_rng(seed)
    tails = random_tails(rng, 60, 8, cuts)
    width = tails.head_size + tails.clusters
    head = (rng.normal(size=(3, 17, width)) * spread).astype(np.float32)
    hidden = rng.normal(size=(3, 17, 8)).astype(np.float32)
    log_probs = tails.log_probs(head, hidden)
    assert np.allclose(np.exp(log_probs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    best = log_probs.argmax(-1)
    targets = np.where(rng.random((3, 17)) < argmax_share, best, rng.integers(1, 60, (3, 17)))
    mask = (rng.random((3, 17)) < 0.85).astype(np.int32)
    nll, hits = tails.target_scores(head, hidden, targets, mask)
    expected = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(nll, expected, atol=2e-5)
    np.testing.assert_array_equal(hits, (best == targets) & (mask > 0))


def test_a_tail_word_beating_the_head_is_a_hit_and_a_tie_goes_to_the_lower_id():
    tails = random_tails(np.random.default_rng(0), 12, 4, [6])
    tails = TailLayers(tails.cutoffs, tails.projections,
                       (np.zeros_like(tails.kernels[0]),), (np.array([9, 0, 0, 0, 0, 0], np.float32),))
    hidden = np.zeros((1, 1, 4), np.float32)
    head = np.array([[[0, 0, 0, 0, 0, 0, 9]]], np.float32)  # the cluster holds ~all the mass
    nll, hits = tails.target_scores(head, hidden, np.array([[6]]))
    assert hits.tolist() == [[True]] and nll[0, 0] < 0.01
    _, hits = tails.target_scores(head, hidden, np.array([[5]]))
    assert hits.tolist() == [[False]]
    # head word 5 and tail word 6 exactly as likely: the first (lower id) is the argmax
    only_first = np.array([0] + [-np.inf] * 5, np.float32)
    tails = TailLayers(tails.cutoffs, tails.projections, tails.kernels, (only_first,))
    head = np.array([[[0, 0, 0, 0, 0, 9, 9]]], np.float32)
    full = tails.log_probs(head, hidden)[0, 0]
    assert full[5] == full[6] and full.argmax() == 5
    assert tails.target_scores(head, hidden, np.array([[5]]))[1].tolist() == [[True]]
    assert tails.target_scores(head, hidden, np.array([[6]]))[1].tolist() == [[False]]


@pytest.mark.parametrize("vocab, expected", [(10000, [2000, 10000]), (100000, [2000, 10000, 50000, 100000]),
                                             (1000, [500, 1000]), (7, [5, 7])])
def test_default_cutoffs_follow_the_vocabulary_size(vocab, expected):
    assert default_cutoffs(vocab) == expected


@pytest.mark.parametrize("cuts", [[], [4], [50, 40], [10, 10], [200], ["10"], [True]])
def test_bad_cutoffs_are_refused(cuts):
    with pytest.raises((InvalidArgumentError, TypeError), match="--cutoffs"):
        check_cutoffs(cuts, 100)


# ---- the format-3 file ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    path = tmp_path_factory.mktemp("factored") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=16, layers=2, seed=4, cutoffs=[20, 60])
    return path


def test_every_position_has_a_normalized_distribution_over_every_word(factored):
    session = ModelSession(factored, providers="cpu")
    assert session.factored and session.tails.cutoffs == (20, 60, 124)
    ids = np.array([[2, 5, 70, 100, 8], [2, 30, 0, 0, 0]], np.int32)
    log_probs, _ = session.run(ids)
    assert log_probs.shape == (2, 5, 124)
    np.testing.assert_allclose(np.exp(log_probs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    targets = np.array([[5, 70, 100, 8, 3], [30, 3, 0, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    nll, hits, _ = session.score_targets(ids, targets, mask)
    expected = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(nll, expected, atol=1e-5)
    np.testing.assert_array_equal(hits, (log_probs.argmax(-1) == targets) & (mask > 0))


def test_a_sentence_scores_the_same_alone_and_in_any_batch(factored):
    """The tails run in onnxruntime, whose numbers for a row do not depend on the other rows
    (numpy's BLAS gave 1e-7 differences between one row and many)."""
    from lmonnx import Scorer

    scorer = Scorer(factored, providers="cpu")
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(40)]
    together = scorer.score(lines)
    for line, score in zip(lines[:8], together):
        assert scorer.score([line])[0].logprob == score.logprob


def test_the_batch_budget_counts_what_scoring_holds_not_every_word(tmp_path):
    """A factored model's scoring holds the head and the hidden state per position, not V
    logits: its default budget (the Scorer's window, the Evaluator's batches) is sized by
    that, and its call cost by the head alone (tails never run on padding)."""
    from lmonnx import Scorer
    from lmonnx.evaluate import Evaluator
    from lmonnx.metrics import default_max_tokens

    words = [f"w{i}" for i in range(3000)]
    full, factored = tmp_path / "full.onnx", tmp_path / "factored.onnx"
    build_random_lm(full, make_vocab(words), units=8, layers=1, seed=1)
    build_random_lm(factored, make_vocab(words), units=8, layers=1, seed=1, cutoffs=[100])
    wide, narrow = ModelSession(full, providers="cpu"), ModelSession(factored, providers="cpu")
    assert (wide.scored_width, narrow.scored_width) == (3004, 100 + 1 + 8)
    assert (wide.output_macs, narrow.output_macs) == (9 * 3004, 9 * 101)
    assert Evaluator(narrow).max_tokens == default_max_tokens(109) > Evaluator(wide).max_tokens
    for path in (full, factored):
        scorer = Scorer(path, providers="cpu")
        assert scorer.window == scorer._evaluator().max_tokens


def test_a_factored_file_without_its_tails_is_refused(factored, tmp_path):
    import onnx

    from lmonnx.artifact import ArtifactError

    proto = onnx.load(str(factored))
    keep = [i for i in proto.graph.initializer if not i.name.startswith("lmonnx_tail_1")]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    with pytest.raises(ArtifactError, match="without its tail cluster 1"):
        ModelSession(tmp_path / "broken.onnx", providers="cpu")


def test_a_factored_config_without_cutoffs_is_refused(factored, tmp_path):
    import onnx

    from lmonnx.artifact import KEY_CONFIG, ArtifactError

    proto = onnx.load(str(factored))
    for entry in proto.metadata_props:
        if entry.key == KEY_CONFIG:
            config = json.loads(entry.value)
            del config["cutoffs"]
            entry.value = json.dumps(config)
    onnx.save(proto, str(tmp_path / "nocut.onnx"))
    with pytest.raises(ArtifactError, match="increasing integer cutoffs"):
        ModelSession(tmp_path / "nocut.onnx", providers="cpu")


# ---- training and export (TensorFlow) --------------------------------------------------------

TINY = dict(tokenizer="whitespace", vocab_size=40, max_length=8, num_lstm_units=12,
            num_lstm_layers=2, batch_size=8, learning_rate=2.0, seed=7)


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from lmonnx.synth import write_corpus
    from lmonnx.train.config import TrainConfig
    from lmonnx.train.trainer import train

    d = tmp_path_factory.mktemp("adaptive")
    write_corpus(d, seed=1, words=30, train_sentences=400, valid_sentences=60,
                 test_sentences=30)
    result = train(TrainConfig(**TINY, epochs=2, holdout=0.1, softmax="adaptive",
                               cutoffs=(10, 20), tail_div=2), d / "train.txt", out_dir=d / "run")
    return d, result


def test_the_adaptive_model_learns_and_its_loss_is_its_distributions(adaptive_run):
    import keras
    import tensorflow as tf

    d, result = adaptive_run
    first, last = result.history
    assert last.valid_perplexity < first.valid_perplexity < 34
    model = keras.saving.load_model(d / "run" / "model.keras")
    assert model.softmax == "adaptive" and model.cutoffs == [10, 20, 34]
    # --tail-div 2: projections 12 / 2 and 12 / 4 wide (the default 4 would give 3 and 1)
    assert [tuple(p.shape) for p in model.output_layer.projections] == [(12, 6), (12, 3)]
    ids = np.array([[2, 5, 12, 30, 7, 0]], np.int32)
    targets = np.array([[5, 12, 30, 7, 3, 0]], np.int32)
    outputs, binary = model.run_lstm(ids)
    log_probs = model.get_logits(outputs).numpy()
    np.testing.assert_allclose(np.exp(log_probs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    expected = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0][0, :5].sum()
    loss = float(model.calculate_loss(outputs, binary, tf.constant(targets)))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_export_writes_format_3_equal_to_keras_per_target(adaptive_run):
    import keras
    import onnx

    from lmonnx.export import export_run
    from lmonnx.quantize import quantize_file

    d, _ = adaptive_run
    report = export_run(d / "run", d / "model.onnx")
    assert report.parity.ok and report.state.ok
    assert report.metadata["lmonnx.format_version"] == "3"
    names = {i.name for i in onnx.load(str(d / "model.onnx")).graph.initializer}
    assert {"lmonnx_tail_0_projection", "lmonnx_tail_1_kernel"} <= names
    model = keras.saving.load_model(d / "run" / "model.keras")
    session = ModelSession(d / "model.onnx", providers="cpu")
    rng = np.random.default_rng(3)
    ids = np.concatenate([[2], rng.integers(4, 34, size=20)]).astype(np.int32)[None]
    targets = np.concatenate([ids[0, 1:], [3]]).astype(np.int32)[None]
    keras_log_probs = model.get_logits(model.run_lstm(ids)[0]).numpy()
    nll, _, _ = session.score_targets(ids, targets, np.ones_like(ids))
    keras_nll = -np.take_along_axis(keras_log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, keras_nll, atol=1e-4)
    onnx_log_probs, _ = session.run(ids)
    np.testing.assert_allclose(np.exp(onnx_log_probs[0, [0, 7, 20]].astype(np.float64)).sum(-1),
                               1.0, atol=1e-5)
    quantize_file(d / "model.onnx", d / "int8.onnx", sample=d / "valid.txt", force=True)
    int8 = ModelSession(d / "int8.onnx", providers="cpu")
    assert int8.factored and int8.quantization
    int8_nll, _, _ = int8.score_targets(ids, targets, np.ones_like(ids))
    assert abs(int8_nll.sum() - nll.sum()) < 0.05 * nll.sum()


@pytest.mark.parametrize("flags, message", [
    (["--cutoffs", "10"], "--cutoffs splits the adaptive softmax's vocabulary"),
    (["--softmax", "adaptive", "--recipe", "course"], "the factored output is the tied recipe's"),
    (["--softmax", "adaptive", "--cutoffs", "10,5"], "--cutoffs 10,5: increasing"),
    (["--softmax", "adaptive", "--cutoffs", "10,x"], "comma-separated integers"),
    (["--softmax", "adaptive", "--cutoffs", "500"], "below the vocabulary's"),
    (["--tail-div", "2"], "--tail-div sets the adaptive softmax's tail widths"),
    (["--softmax", "adaptive", "--tail-div", "0"], "--tail-div"),
    (["--tie-tails"], "--tie-tails ties the adaptive softmax's tail clusters"),
    (["--softmax", "adaptive", "--tie-tails", "--tail-div", "2"], "tied tails (--tie-tails)"),
])
def test_bad_softmax_flags_are_one_line_errors(adaptive_run, flags, message, tmp_path, capsys):
    from lmonnx.cli import main

    d, _ = adaptive_run
    with pytest.raises(SystemExit) if message in ("comma-separated integers", "--tail-div") \
            else nullcontext():
        code = main(["train", str(d / "train.txt"), "--tokenizer", "whitespace", "--epochs", "1",
                     "--out", str(tmp_path / "run"), *flags])
        assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([line for line in err if "Traceback" in line]) == 0
    assert not (tmp_path / "run" / "model.keras").exists()


def test_a_run_directory_from_before_the_softmax_flag_still_loads(tmp_path):
    from lmonnx.train.config import TrainConfig

    stored = TrainConfig().to_dict()
    del stored["softmax"], stored["cutoffs"], stored["tie_tails"]
    config = TrainConfig.from_dict(stored, tmp_path / "config.json")
    assert config.softmax == "full" and config.cutoffs is None and not config.tie_tails


def test_tied_tails_score_words_with_their_embedding_rows_and_export_exactly(tmp_path):
    """--tie-tails: no tail weights but biases; a tail word's logit is its embedding row times
    h plus its bias; the export (identity projection, skipped by the tail sessions) equals
    Keras per target and stays normalized; int8 keeps it."""
    pytest.importorskip("tensorflow")
    import keras
    import onnx

    from lmonnx.export import export_run
    from lmonnx.graph import tail_cluster_model
    from lmonnx.quantize import quantize_file
    from lmonnx.synth import write_corpus
    from lmonnx.train.config import TrainConfig
    from lmonnx.train.trainer import train

    write_corpus(tmp_path, seed=1, words=30, train_sentences=400, valid_sentences=60,
                 test_sentences=30)
    result = train(TrainConfig(**TINY, epochs=2, holdout=0.1, softmax="adaptive",
                               cutoffs=(10, 20), tie_tails=True), tmp_path / "train.txt",
                   out_dir=tmp_path / "run")
    first, last = result.history
    assert last.valid_perplexity < first.valid_perplexity < 34
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    output = model.output_layer
    assert model.tie_tails and output.tie_tails and not output.projections
    assert {w.path.split("/")[-1] for w in output.weights} == {
        "embeddings", "head_bias", "cluster_kernel", "cluster_bias", "tail_0_bias", "tail_1_bias"}
    h = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    table = model.embedding.embeddings.numpy()
    np.testing.assert_allclose(output.tail_logits(1, h).numpy(),
                               h @ table[20:34].T + output.tail_biases[1].numpy(), atol=1e-5)
    (eye, kernel, bias), _ = output.tail_weights()
    assert np.array_equal(eye, np.eye(12)) and np.array_equal(kernel, table[10:20].T)
    tail_graph = onnx.load_from_string(tail_cluster_model(0, eye, kernel, bias)).graph
    assert [n.op_type for n in tail_graph.node] == ["MatMul", "Add"]

    report = export_run(tmp_path / "run", tmp_path / "model.onnx")
    assert report.parity.ok and report.state.ok
    assert json.loads(report.metadata["lmonnx.config"])["tie_tails"] is True
    session = ModelSession(tmp_path / "model.onnx", providers="cpu")
    ids = np.array([[2, 5, 12, 30, 7, 25, 11]], np.int32)
    targets = np.array([[5, 12, 30, 7, 25, 11, 3]], np.int32)
    keras_log_probs = model.get_logits(model.run_lstm(ids)[0]).numpy()
    nll, _, _ = session.score_targets(ids, targets, np.ones_like(ids))
    keras_nll = -np.take_along_axis(keras_log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, keras_nll, atol=1e-4)
    onnx_log_probs, _ = session.run(ids)
    np.testing.assert_allclose(np.exp(onnx_log_probs[0].astype(np.float64)).sum(-1), 1.0,
                               atol=1e-5)
    quantize_file(tmp_path / "model.onnx", tmp_path / "int8.onnx",
                  sample=tmp_path / "valid.txt", force=True)
    int8_nll, _, _ = ModelSession(tmp_path / "int8.onnx", providers="cpu").score_targets(
        ids, targets, np.ones_like(ids))
    assert abs(int8_nll.sum() - nll.sum()) < 0.05 * nll.sum()
