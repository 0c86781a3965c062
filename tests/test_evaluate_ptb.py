"""Issue 4's acceptance on real text: a model trained on 2000 PTB validation lines, exported,
then `lmonnx evaluate` on 1000 PTB test sentences against TensorFlow's `calculate_loss`."""

import json

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

import lmonnx.train.model  # noqa: E402,F401  (registers LanguageModel with Keras)
import lmonnx.train.tied  # noqa: E402,F401  (registers TiedLanguageModel, the default)
from lmonnx import Scorer  # noqa: E402
from lmonnx.batching import make_pair, pad_batch  # noqa: E402
from lmonnx.cli import main  # noqa: E402
from lmonnx.vocab import Vocabulary  # noqa: E402


@pytest.fixture(scope="module")
def ptb_model(ptb_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ptb_eval")
    lines = (ptb_dir / "ptb.valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "train.txt").write_text("".join(lines[:2000]), encoding="utf-8")
    test_lines = (ptb_dir / "ptb.test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "test1000.txt").write_text("".join(test_lines[:1000]), encoding="utf-8")
    assert main(["train", str(d / "train.txt"), "--tokenizer", "whitespace", "--vocab-size",
                 "3000", "--max-length", "35", "--units", "64", "--layers", "2", "--epochs",
                 "1", "--batch-size", "32", "--out", str(d / "run")]) == 0
    assert main(["export", str(d / "run"), "-o", str(d / "model.onnx")]) == 0
    return d


def evaluate_json(capsys, *args):
    capsys.readouterr()
    assert main(["evaluate", *map(str, args), "--json", "--providers", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_evaluate_matches_tensorflow_calculate_loss(ptb_model, capsys):
    d = ptb_model
    default = evaluate_json(capsys, d / "test1000.txt", "--model", d / "model.onnx")
    one = evaluate_json(capsys, d / "test1000.txt", "--model", d / "model.onnx",
                        "--batch-size", "1")

    model = keras.saving.load_model(d / "run" / "model.keras")
    vocab = Vocabulary.load(d / "run" / "vocab.json")
    pairs = [make_pair(vocab.encode(line))
             for line in (d / "test1000.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    tf_nll, tf_tokens = 0.0, 0
    for i in range(0, len(pairs), 64):  # corpus order, padded to the longest: the plain way
        batch = pad_batch(pairs[i:i + 64])
        outputs, binary = model.run_lstm(batch.inputs, training=False)
        tf_nll += float(model.calculate_loss(outputs, binary, batch.targets))
        tf_tokens += int(batch.mask.sum())

    print(f"1000 PTB test sentences: lmonnx NLL {default['nll']:.6f} over {default['tokens']} "
          f"tokens, TensorFlow {tf_nll:.6f} over {tf_tokens}; rel diff "
          f"{abs(default['nll'] - tf_nll) / tf_nll:.2e}; batch-size 1 vs default rel diff "
          f"{abs(one['nll'] - default['nll']) / default['nll']:.2e}")
    assert default["sentences"] == 1000
    assert default["tokens"] == tf_tokens == one["tokens"]
    assert default["nll"] == pytest.approx(tf_nll, rel=1e-5)
    assert one["nll"] == pytest.approx(default["nll"], rel=1e-6)
    assert one["oovs"] == default["oovs"] > 0


@pytest.mark.slow
def test_sentence_alone_equals_its_score_in_a_batch_of_200(ptb_model, ptb_dir):
    lines = (ptb_dir / "ptb.test.txt").read_text(encoding="utf-8").splitlines()[1000:1200]
    together = Scorer(ptb_model / "model.onnx", providers="cpu", batch_size=200,
                      max_tokens=10**6).score(lines)
    alone = Scorer(ptb_model / "model.onnx", providers="cpu", batch_size=1)
    worst = max(abs(alone.score([line])[0].logprob - t.logprob) for line, t in zip(lines, together))
    print(f"200 PTB sentences: worst |alone - in batch of 200| = {worst:.2e} nats")
    assert worst < 1e-4
