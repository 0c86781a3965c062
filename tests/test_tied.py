"""The default recipe: the tied model, the training stream, its settings, the time budget,
held-out validation, and its export (the matrix stored once, parity, int8)."""

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from lmonnx import export  # noqa: E402
from lmonnx.batching import stream_windows  # noqa: E402
from lmonnx.cli import main  # noqa: E402
from lmonnx.errors import InvalidArgumentError  # noqa: E402
from lmonnx.rundir import EpochRecord, History  # noqa: E402
from lmonnx.synth import write_corpus  # noqa: E402
from lmonnx.train.config import RECIPES, TrainConfig  # noqa: E402
from lmonnx.train.steps import StreamStep  # noqa: E402
from lmonnx.train.tied import TiedLanguageModel  # noqa: E402
from lmonnx.train.trainer import (TrainingRun, budget_state, held_out_split,  # noqa: E402
                                  train)

V, UNITS = 30, 8
TINY = dict(tokenizer="whitespace", vocab_size=40, max_length=8, num_lstm_units=12,
            num_lstm_layers=2, batch_size=8, learning_rate=2.0, seed=7)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_corpus(d, seed=1, words=30, train_sentences=400, valid_sentences=60,
                 test_sentences=30)
    return d


def sentences(lengths):
    """(key, inputs, targets) items with distinct ids, so every token can be traced."""
    items, next_id = [], 4
    for key, n in enumerate(lengths):
        ids = np.arange(next_id, next_id + n + 1, dtype=np.int32)
        next_id += n + 1
        items.append((key, ids[:-1], ids[1:]))
    return items


# ---- the stream ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=30), st.integers(1, 7),
       st.integers(1, 9), st.integers(0, 3))
def test_stream_windows_hold_every_token_once_in_shuffled_sentence_order(lengths, columns,
                                                                         window, seed):
    items = sentences(lengths)
    windows = stream_windows(items, columns=columns, window=window,
                             rng=np.random.default_rng(seed))
    order = np.random.default_rng(seed).permutation(len(items))
    rows = np.concatenate([w.inputs for w in windows], axis=1)  # [columns, length]
    targets = np.concatenate([w.targets for w in windows], axis=1)
    stream = rows.reshape(-1)
    expected = np.concatenate([items[i][1] for i in order])
    assert np.array_equal(stream[:len(expected)], expected)
    assert not stream[len(expected):].any()  # padding only after the text
    assert np.array_equal(targets.reshape(-1)[:len(expected)],
                          np.concatenate([items[i][2] for i in order]))
    assert sum(w.tokens for w in windows) == len(expected)
    assert all(w.inputs.shape[1] <= window for w in windows)
    assert rows.shape[0] == min(columns, len(expected))


# ---- the model -------------------------------------------------------------------------------

def test_output_layer_is_the_embedding_matrix():
    model = TiedLanguageModel(V, 10, UNITS, 2)
    model.build()
    lstm = 4 * UNITS * (UNITS + UNITS + 1)
    assert model.count_params() == V * UNITS + 2 * lstm + V  # E once, plus the output bias
    h = np.random.default_rng(0).standard_normal((3, UNITS)).astype(np.float32)
    expected = h @ model.embedding.embeddings.numpy().T + model.output_layer.bias.numpy()
    np.testing.assert_allclose(model.get_logits(h).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_tied_embedding_is_as_wide_as_the_units():
    assert TiedLanguageModel(V, 10, UNITS, 1, embedding_dim=UNITS).embedding_dim == UNITS
    with pytest.raises(ValueError, match="num_lstm_units"):
        TiedLanguageModel(V, 10, UNITS, 1, embedding_dim=5)


def test_dropout_masks_are_locked_across_time():
    model = TiedLanguageModel(V, 10, UNITS, 1, dropout=0.5)
    x = tf.ones((4, 6, UNITS))
    dropped = model.drops[0](x, training=True).numpy()
    assert (dropped == 0).any() and (dropped != 0).any()
    assert (dropped == dropped[:, :1, :]).all()  # one mask per row, the same at every step
    assert (model.drops[0](x, training=False).numpy() == 1).all()


def test_inference_model_equals_the_training_model_and_survives_saving(tmp_path):
    model = TiedLanguageModel(V, 10, UNITS, 2, dropout=0.3)
    model.build()
    ids = np.array([[2, 5, 6, 7, 0, 0], [2, 9, 0, 0, 0, 0]], np.int32)
    outputs, binary = model.run_lstm(ids)
    logits = model.get_logits(outputs).numpy()
    zeros = np.zeros((2, 2, UNITS), np.float32)
    exported, _, _ = model.inference_model()([ids, zeros, zeros])
    real = binary.numpy() > 0
    np.testing.assert_allclose(exported.numpy()[real], logits[real], rtol=1e-5, atol=1e-6)
    model.epoch = 4
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, TiedLanguageModel) and loaded.epoch == 4 and loaded.dropout == 0.3
    np.testing.assert_array_equal(loaded.get_logits(loaded.run_lstm(ids)[0]).numpy(), logits)


def test_stream_step_carries_the_state_across_windows():
    """With no update (rate 0) and no dropout, the windows' summed losses equal one pass over
    the whole rows: the state handed from window to window is the running state."""
    model = TiedLanguageModel(V, 10, UNITS, 2)
    model.build()
    step = StreamStep(model, keras.optimizers.SGD(learning_rate=0.0))
    items = sentences([3, 5, 2, 7, 4, 1, 6])
    items = [(k, x % (V - 4) + 4, y % (V - 4) + 4) for k, x, y in items]
    windows = stream_windows(items, columns=3, window=4, rng=np.random.default_rng(0))
    step.start_epoch()
    stepped = sum(float(step(w, np.float32(1.0))[0]) for w in windows)
    inputs = np.concatenate([w.inputs for w in windows], axis=1)
    targets = np.concatenate([w.targets for w in windows], axis=1)
    outputs, binary, _ = model.run_lstm_carrying(inputs)
    whole = float(model.calculate_loss(outputs, binary, targets))
    assert math.isclose(stepped, whole, rel_tol=1e-5)


# ---- settings --------------------------------------------------------------------------------

def test_each_recipe_fills_the_settings_left_unset():
    tied, course = TrainConfig().resolved(), TrainConfig(recipe="course").resolved()
    assert tied.recipe == "tied" and tied.optimizer == "sgd" and tied.learning_rate == 20.0
    assert tied.embedding_dim == tied.num_lstm_units and tied.dropout == RECIPES["tied"]["dropout"]
    # The course's LanguageModel as lmonnx trained it before recipes existed.
    assert (course.optimizer, course.learning_rate, course.clipnorm, course.batch_size,
            course.epochs, course.dropout, course.embedding_dim) == ("adam", 1e-2, 5.0, 32, 5,
                                                                    0.0, None)
    assert TrainConfig(learning_rate=3.0).resolved().learning_rate == 3.0  # given wins
    # The rate follows the optimizer that runs, not the recipe that was picked.
    assert TrainConfig(optimizer="adam").resolved().learning_rate == 1e-2
    assert TrainConfig(recipe="course", optimizer="sgd").resolved().learning_rate == 20.0


@pytest.mark.parametrize("given, message", [
    (dict(embedding_dim=5), "--embedding-dim 5: the tied recipe"),
    (dict(pack=False), "--no-pack: the tied recipe"),
])
def test_settings_the_tied_recipe_cannot_take(given, message):
    with pytest.raises(InvalidArgumentError, match=message):
        TrainConfig(**given).resolved()


def test_held_out_share_is_random_disjoint_and_reproducible():
    lines = list(range(1000))
    config = TrainConfig(holdout=0.05, seed=3)
    train_lines, held = held_out_split(lines, config)
    assert len(held) == 50 and sorted(train_lines + held) == lines
    assert held != lines[-50:]  # drawn at random, not the tail
    assert held_out_split(lines, config) == (train_lines, held)
    assert held_out_split(lines, TrainConfig(holdout=0.0)) == (lines, None)


def test_holdout_and_valid_together_are_refused(synth, tmp_path, capsys):
    assert main(["train", str(synth / "train.txt"), "--valid", str(synth / "valid.txt"),
                 "--holdout", "0.1", "--out", str(tmp_path / "run")]) == 1
    assert "--holdout and --valid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tied_recipe_refuses_an_embedding_width_on_the_command_line(synth, tmp_path, capsys):
    assert main(["train", str(synth / "train.txt"), "--embedding-dim", "4",
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipe course" in err[0]


def test_train_help_names_both_recipes_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tied (the default)" in out and "course:" in out
    assert "(default: tied 0.25, course 5.0)" in out  # --clipnorm
    assert "(default: sgd 20.0, adam 0.01, whichever optimizer runs)" in out


# ---- the time budget -------------------------------------------------------------------------

def budget(minutes, seconds):
    """``budget_state`` for epochs that took ``seconds`` each (training + validation)."""
    return budget_state(TrainConfig(max_minutes=minutes), History(learning_rate=1.0, epochs=[
        EpochRecord(epoch=i + 1, train_loss=1.0, train_perplexity=2.7, train_tokens=1,
                    train_seconds=s - 10, tokens_per_second=1.0, learning_rate=1.0,
                    valid_seconds=10) for i, s in enumerate(seconds)]))


@pytest.mark.parametrize("minutes, seconds, expected", [
    (10, [100], (False, False)),             # 500 s left: several epochs fit
    (10, [100, 100, 100, 100], (False, False)),  # 200 s left: two more fit
    (10, [100, 100, 100, 150], (False, True)),  # 150 s left, the last took 150: one more
    (10, [100] * 5, (False, True)),            # 100 s left: exactly one more
    (10, [100] * 5 + [50], (False, True)),     # 50 s left, the last epoch took 50
    (10, [100] * 6, (True, False)),            # nothing left
    (10, [300], (False, False)),               # one epoch (start-up included): no "last" yet
    (10, [100, 100, 150], (False, False)),     # timed by the faster of the last two: 2 fit
    (None, [100] * 60, (False, False)),         # no budget
])
def test_budget_times_the_next_epoch_by_the_last(minutes, seconds, expected):
    assert budget(minutes, seconds) == expected


def test_a_time_budget_stops_the_run_and_a_larger_one_resumes_it(synth, tmp_path, capsys):
    config = TrainConfig(**TINY, epochs=5, max_minutes=1e-4)
    result = train(config, synth / "train.txt", synth / "valid.txt", tmp_path / "run")
    assert len(result.history) == 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["status"] == "complete" and history["stopped_early"] is False
    assert "no further epoch fits in --max-minutes" in capsys.readouterr().err
    # The same budget: spent, nothing trained; a larger one: the run goes on.
    again = train(config, synth / "train.txt", synth / "valid.txt", tmp_path / "run",
                  resume=True)
    assert len(again.history) == 1 and "is spent after epoch 1" in capsys.readouterr().err
    more = train(dataclasses.replace(config, max_minutes=60.0), synth / "train.txt",
                 synth / "valid.txt", tmp_path / "run", resume=True)
    assert len(more.history) == 5
    assert "--max-minutes 60.0 (was 0.0001)" in capsys.readouterr().err


def test_dropout_zero_trains_and_checkpoints(synth, tmp_path):
    """A Dropout of rate 0 has no seed generator: the checkpoint must not look for one."""
    result = train(TrainConfig(**TINY, epochs=1, dropout=0.0), synth / "train.txt",
                   synth / "valid.txt", tmp_path / "run")
    assert len(result.history) == 1 and (tmp_path / "run" / "checkpoint-1.npz").is_file()


def test_the_last_epoch_within_the_budget_trains_at_the_decayed_rate(synth, tmp_path,
                                                                      monkeypatch):
    budgets = iter([(False, False), (False, True), (True, False)])
    monkeypatch.setattr(TrainingRun, "_budget", lambda self: next(budgets))
    result = train(TrainConfig(**TINY, epochs=5, max_minutes=60.0), synth / "train.txt",
                   synth / "valid.txt", tmp_path / "run")
    rates = [r.learning_rate for r in result.history]
    assert len(rates) == 3 and rates[2] == rates[1] / 4


# ---- training and export end to end ---------------------------------------------------------

@pytest.fixture(scope="module")
def tied_run(synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("tied")
    result = train(TrainConfig(**TINY, epochs=2, holdout=0.1), synth / "train.txt",
                   out_dir=d / "run")
    return d, result


def test_default_recipe_trains_the_tied_model_and_learns(tied_run):
    d, result = tied_run
    model = keras.saving.load_model(d / "run" / "model.keras")
    assert isinstance(model, TiedLanguageModel)
    config = json.loads((d / "run" / "config.json").read_text())
    assert config["train"]["recipe"] == "tied" and config["embedding_dim"] == 12
    first, last = result.history
    assert last.valid_perplexity < first.valid_perplexity < config["vocab_size"]
    assert first.valid_tokens > 0  # the held-out share is the validation set


def test_resumed_tied_run_equals_an_uninterrupted_one(synth, tied_run, tmp_path):
    d, full = tied_run
    config = TrainConfig(**TINY, epochs=1, holdout=0.1)
    train(config, synth / "train.txt", out_dir=tmp_path / "run")
    resumed = train(dataclasses.replace(config, epochs=2), synth / "train.txt",
                    out_dir=tmp_path / "run", resume=True)
    assert [(r.train_loss, r.valid_nll) for r in resumed.history] == [
        (r.train_loss, r.valid_nll) for r in full.history]


def synth_text(d):
    return json.loads((d / "run" / "config.json").read_text())["corpus"]


def test_export_holds_the_tied_matrix_once_and_matches_keras(tied_run):
    import onnx

    from lmonnx.quantize import quantize_file

    d, _ = tied_run
    report = export.export_run(d / "run", d / "model.onnx")
    assert report.parity.ok and report.state.ok
    proto = onnx.load(str(d / "model.onnx"))
    vocab = json.loads((d / "run" / "config.json").read_text())["vocab_size"]
    matrices = [tuple(i.dims) for i in proto.graph.initializer if vocab in i.dims]
    assert sorted(matrices) == [(vocab,), (vocab, 12)]  # the bias, and E once
    assert {"Gemm", "Gather"} <= {n.op_type for n in proto.graph.node}
    quantize_file(d / "model.onnx", d / "int8.onnx", sample=synth_text(d), force=True)
    int8 = onnx.load(str(d / "int8.onnx"))
    assert "MatMulInteger" in {n.op_type for n in int8.graph.node}


def test_stream_step_takes_the_plain_loops_steps():
    """``StreamStep`` (logits at real positions, summed loss / tokens) and the plain way
    (logits everywhere, masked mean) take the same SGD steps, dropout included: the weights
    agree to float32 round-off after a dozen windows at the recipe's rate of 20.  (Over
    epochs at that rate round-off grows, which is why benchmarks/train_table.py compares
    means over seeds.)"""
    items = [(k, x % (V - 4) + 4, y % (V - 4) + 4)
             for k, x, y in sentences([3, 5, 2, 7, 4, 1, 6, 9, 8, 3, 5, 2, 6, 7, 1, 4])]
    windows = stream_windows(items, columns=3, window=2, rng=np.random.default_rng(0))

    def fresh():
        keras.utils.set_random_seed(5)
        model = TiedLanguageModel(V, 4, UNITS, 2, dropout=0.3)
        model.build()
        return model, keras.optimizers.SGD(learning_rate=20.0, global_clipnorm=0.25)

    model, optimizer = fresh()
    step = StreamStep(model, optimizer)
    step.start_epoch()
    for w in windows:
        step(w, np.float32(w.tokens))

    plain, plain_optimizer = fresh()
    states = plain.zero_states(3)
    for w in windows:
        with tf.GradientTape() as tape:
            outputs, states = plain.run_stream(w.inputs, states, training=True)
            mask = tf.cast(tf.math.sign(w.inputs), tf.float32)
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=w.targets, logits=plain.get_logits(outputs))
            loss = tf.reduce_sum(nll * mask) / tf.reduce_sum(mask)
        grads = tape.gradient(loss, plain.trainable_variables)
        plain_optimizer.apply_gradients(zip(grads, plain.trainable_variables))
    assert len(windows) >= 10
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
