"""Runtime, evaluation and Scorer on a TensorFlow-free random LSTM model (lmonnx/_testing.py).

The reference for every number is NumPy on the very logits onnxruntime returns, so these tests
check the accounting, batching and ordering, not the model's quality.
"""

import json
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from lmonnx._testing import SOFTMAXES, build_random_lm, edit_logits, make_vocab, random_cutoffs

from lmonnx import Scorer
from lmonnx.artifact import ArtifactError
from lmonnx.batching import bucketed_batches
from lmonnx.corpus import Line
from lmonnx.evaluate import LOOKAHEAD_BYTES, Evaluator, call_cost_positions
from lmonnx.examples import ExampleBuilder
from lmonnx.metrics import default_max_tokens
from lmonnx.runtime import ModelSession, cuda_unavailable_reason

WORDS = "the a cat dog sat on mat ran to house big small red".split()
RNG = np.random.default_rng(7)
SENTENCES = [" ".join(RNG.choice(WORDS + ["zebra", "<unk>"], size=RNG.integers(0, 25)))
             for _ in range(200)]
SENTENCES = [s for s in SENTENCES if s] + ["the cat sat on the mat"]


@pytest.fixture(scope="module", params=SOFTMAXES)
def model_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "random.onnx"
    build_random_lm(path, make_vocab(WORDS), units=24, layers=2, seed=3,
                    cutoffs=random_cutoffs(request.param, len(WORDS) + 4))
    return path


@pytest.fixture(scope="module")
def scorer(model_path):
    return Scorer(model_path, providers="cpu", num_threads=2)


def reference_sentence(session, text):
    """float64 NumPy log-probabilities of one sentence's targets, from ORT logits run alone."""
    ids = session.vocab.encode(text)
    inputs = np.concatenate([[2], ids]).astype(np.int32)
    targets = np.concatenate([ids, [3]]).astype(np.int64)
    logits = session.logits(inputs[None])[0].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)
    return logp[np.arange(len(targets)), targets], logits.argmax(-1) == targets, targets


def test_sentence_scores_match_numpy_reference(scorer):
    session = scorer._session
    for text, score in zip(SENTENCES[:40], scorer.score(SENTENCES[:40])):
        logp, _, targets = reference_sentence(session, text)
        assert score.tokens == len(targets) == len(text.split()) + 1
        assert score.oovs == int((targets == 1).sum())
        assert score.logprob == pytest.approx(logp.sum(), rel=2e-5, abs=1e-4)
        assert score.perplexity == pytest.approx(math.exp(-logp.sum() / len(targets)), rel=1e-4)


def test_score_alone_equals_score_in_a_batch_of_200(model_path):
    batched = Scorer(model_path, providers="cpu", batch_size=256, max_tokens=100_000)
    alone = Scorer(model_path, providers="cpu", batch_size=1)
    together = batched.score(SENTENCES)
    one_by_one = [alone.score([s])[0] for s in SENTENCES]
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(together, one_by_one)]
    assert max(diffs) < 1e-4


@pytest.mark.parametrize("batch_size,max_tokens", [(1, 8192), (7, 64), (64, 8192), (500, 10**6)],
                         ids=["bs1", "bs7-budget64", "default", "one-batch"])
def test_totals_do_not_depend_on_batching(model_path, batch_size, max_tokens):
    reference = Scorer(model_path, providers="cpu").evaluate(SENTENCES)
    report = Scorer(model_path, providers="cpu", batch_size=batch_size,
                    max_tokens=max_tokens).evaluate(SENTENCES)
    assert report.tokens == reference.tokens and report.oovs == reference.oovs
    assert report.nll == pytest.approx(reference.nll, rel=1e-6)
    assert report.top1_accuracy == pytest.approx(reference.top1_accuracy, abs=1e-12)


def test_report_accounting_matches_reference(scorer):
    session = scorer._session
    report = scorer.evaluate(SENTENCES + ["", "   "])  # blank lines are not sentences
    total, total_in_vocab, n_in_vocab, hits, tokens, oovs = 0.0, 0.0, 0, 0, 0, 0
    in_vocab_hits = 0
    for text in SENTENCES:
        logp, hit, targets = reference_sentence(session, text)
        total -= logp.sum()
        total_in_vocab -= logp[targets != 1].sum()
        n_in_vocab += int((targets != 1).sum())
        hits += int(hit.sum())
        in_vocab_hits += int(hit[targets != 1].sum())
        tokens += len(targets)
        oovs += int((targets == 1).sum())
    nbytes = sum(len(s.encode()) + 1 for s in SENTENCES)
    assert report.sentences == len(SENTENCES)
    assert report.tokens == tokens and report.words == tokens - len(SENTENCES)
    assert report.oovs == oovs > 0
    assert report.nll == pytest.approx(total, rel=1e-5)
    assert report.mean_nll == pytest.approx(total / tokens, rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert report.perplexity_no_oov == pytest.approx(math.exp(total_in_vocab / n_in_vocab), rel=1e-5)
    assert report.bits_per_token == pytest.approx(total / tokens / math.log(2), rel=1e-5)
    assert report.bits_per_byte == pytest.approx(total / math.log(2) / nbytes, rel=1e-5)
    assert report.top1_accuracy == pytest.approx(hits / tokens)
    assert report.top1_accuracy_no_oov == pytest.approx(in_vocab_hits / n_in_vocab)
    # Length-sorted batches of at most 64, each padded to its longest: the report counts the
    # positions of the cut the evaluator makes, which never pads more than filling each
    # batch to 64 (fewer batches cannot cost less: see CALL_COST_MACS).
    lengths = sorted(len(text.split()) + 1 for text in SENTENCES)
    items = [(i, np.zeros(n, np.int32), np.zeros(n, np.int32)) for i, n in enumerate(lengths)]
    cut = list(bucketed_batches(items, max_tokens=default_max_tokens(len(scorer.vocab)), max_batch_size=64,
                                call_cost=call_cost_positions(session)))
    computed = sum(b.inputs.size for b in cut)
    assert report.padding_fraction == 1.0 - tokens / computed
    greedy = sum(len(g) * g[-1] for g in (lengths[i:i + 64] for i in range(0, len(lengths), 64)))
    assert computed <= greedy
    assert Scorer(session.path, providers="cpu", batch_size=1).evaluate(SENTENCES).padding_fraction == 0.0
    assert report.provider == "CPUExecutionProvider"
    assert set(report.to_dict()) >= {
        "sentences", "tokens", "words", "oovs", "nll", "mean_nll", "perplexity",
        "perplexity_no_oov", "bits_per_token", "bits_per_byte", "top1_accuracy",
        "top1_accuracy_no_oov",
        "padding_fraction", "tokens_per_second", "seconds", "provider"}


def test_full_scores_are_per_token_and_sum_to_the_sentence(scorer):
    text = "the zebra sat"
    tokens = scorer.full_scores(text)
    assert [t.word for t in tokens] == ["the", "zebra", "sat", "</s>"]
    assert [t.is_oov for t in tokens] == [False, True, False, False]
    assert tokens[1].id == 1
    assert sum(t.logprob for t in tokens) == pytest.approx(scorer.score([text])[0].logprob, abs=1e-6)


def test_predict_next_is_the_softmax_at_the_last_position(scorer):
    session = scorer._session
    top = scorer.predict_next("the cat", k=5)
    assert len(top) == 5
    ids = np.concatenate([[2], session.vocab.encode("the cat")]).astype(np.int32)
    logits = session.logits(ids[None])[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()  # the full softmax: padding and <s> keep their (tiny) share
    ranked = probs.copy()
    ranked[[0, 2]] = -1
    best = np.argsort(-ranked)[:5]
    assert [w for w, _ in top] == [session.vocab.id_to_token(int(i)) for i in best]
    # stateful models read the distribution from the state (a float32 log-softmax)
    assert [p for _, p in top] == pytest.approx(probs[best].tolist(), rel=1e-6)
    assert all(w not in ("<pad>", "<s>") for w, _ in scorer.predict_next("the", k=len(WORDS) + 2))
    # the same number scoring gives: P(w | the cat) = exp(logprob of w in "the cat w")
    for word, p in top:
        if word == "</s>":
            logprob = scorer.full_scores("the cat")[-1].logprob
        else:
            logprob = scorer.full_scores(f"the cat {word}")[2].logprob
        assert p == pytest.approx(math.exp(logprob), rel=1e-5)


def test_scorer_is_thread_safe(scorer):
    expected = [s.logprob for s in scorer.score(SENTENCES)]
    chunks = [SENTENCES[i::8] for i in range(8)]
    barrier = threading.Barrier(8)

    def work(chunk):
        barrier.wait()
        return [s.logprob for s in scorer.score(chunk)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, chunks))
    for i, got in enumerate(results):
        assert got == pytest.approx(expected[i::8], abs=1e-4)


def test_results_stream_in_input_order_with_bounded_lookahead(scorer):
    consumed = 0

    def lines():
        nonlocal consumed
        for i in range(100_000):
            consumed += 1
            yield Line(i, WORDS[i % len(WORDS)] + " " + "cat " * (i % 5), 10)

    evaluator = Evaluator(scorer._session, batch_size=64, max_tokens=4096)
    stream = evaluator.scored(ExampleBuilder(scorer.vocab).build_all(lines()))
    keys = [next(stream)[0].key for _ in range(100)]
    assert keys == list(range(100))
    assert consumed < 20_000  # the first results came long before the input was read
    keys += [next(stream)[1].key for _ in range(12_000)]  # across several look-ahead chunks
    assert keys == list(range(12_100))
    assert evaluator.totals.sentences == 12_100  # the evaluator owns the totals of what it yielded


def test_empty_input_is_an_error(scorer):
    with pytest.raises(ValueError, match="no sentences"):
        scorer.evaluate(["", "  "])
    with pytest.raises(ValueError, match="no sentences"):
        Evaluator(scorer._session).run(iter([]))


@pytest.mark.parametrize("call,exc,match", [
    (lambda s: s.score("one sentence"), TypeError, "list of sentences"),
    (lambda s: s.score(b"one sentence"), TypeError, "list of sentences"),
    (lambda s: s.score([3]), TypeError, "must be str .* got int"),
    (lambda s: s.score([None]), TypeError, "got NoneType"),
    (lambda s: s.predict_next("the", k=0), ValueError, "k must be an integer >= 1; got 0"),
    (lambda s: s.predict_next("the", k=2.0), TypeError, "k must be an integer >= 1; got 2.0"),
    (lambda s: s.evaluate(b"the cat"), TypeError, "one bytes"),
    (lambda s: s.evaluate("no/such/file.txt"), ValueError, "no such file"),
    (lambda s: s.score([b"bad \xff"]), ValueError, "not valid UTF-8"),
], ids=["score-str", "score-bytes", "score-int", "score-none", "k0", "k-float",
        "evaluate-bytes", "evaluate-missing-path", "score-bad-utf8"])
def test_api_misuse_raises_clearly(scorer, call, exc, match):
    with pytest.raises(exc, match=match):
        call(scorer)


def test_bad_model_files_raise_one_clear_error(tmp_path, model_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        ModelSession(tmp_path / "missing.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:500])
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        ModelSession(truncated, providers="cpu")
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(model_path))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(ArtifactError, match="without lmonnx metadata"):
        ModelSession(foreign, providers="cpu")
    with pytest.raises(ValueError, match="providers must be one of"):
        ModelSession(model_path, providers="tpu")
    with pytest.raises(ValueError, match="num_threads must be an integer >= 1; got 0"):
        ModelSession(model_path, providers="cpu", num_threads=0)


def test_cuda_is_strict_and_auto_says_why_it_fell_back(model_path, caplog):
    reason = cuda_unavailable_reason()
    if reason is None:
        assert ModelSession(model_path, providers="cuda").provider == "CUDAExecutionProvider"
        return
    with pytest.raises(RuntimeError, match="CUDA is not usable"):
        ModelSession(model_path, providers="cuda")
    with caplog.at_level("DEBUG", logger="lmonnx"):
        session = ModelSession(model_path, providers="auto")
    assert session.provider == "CPUExecutionProvider"
    assert "CUDA not used" in session.provider_note
    # said once, in the report's provider line; a debug record for logs, never a warning
    assert [r.levelname for r in caplog.records if "CUDA not used" in r.getMessage()] == ["DEBUG"]
    report = Scorer(model_path, providers="auto").evaluate(SENTENCES[:3])
    assert report.provider == f"CPUExecutionProvider (CUDA not used: {reason})"


def test_logits_shape_and_dtype(scorer):
    logits = scorer._session.logits(np.array([[2, 4, 5, 0, 0]], dtype=np.int64))
    assert logits.shape == (1, 5, len(WORDS) + 4) and logits.dtype == np.float32


def test_ptb_scoring_smoke(ptb_dir, model_path):
    """Real text with literal <unk>: every PTB test token is counted, none dropped."""
    lines = (ptb_dir / "ptb.test.txt").read_text().splitlines()[:300]
    report = Scorer(model_path, providers="cpu").evaluate(lines)
    words = sum(len(line.split()) for line in lines if line.strip())
    assert report.words == words
    assert report.tokens == words + report.sentences
    assert report.oovs > 0.5 * words  # the random model's vocabulary barely overlaps PTB


def test_writers_give_the_cli_files_to_api_users(scorer, tmp_path):
    """The per-sentence and per-token JSON lines come from the library's writers: their rows
    agree with score() and full_scores() sentence by sentence and token by token."""
    lines = ["", *SENTENCES[:30], "   "]
    sent, tok = tmp_path / "sent.jsonl", tmp_path / "tok.jsonl"
    report = scorer.evaluate(lines, per_sentence=sent, per_token=tok)
    rows = [json.loads(line) for line in sent.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(2, 32))  # 1-based, blank lines counted
    scores = scorer.score(SENTENCES[:30])
    for row, score in zip(rows, scores):
        assert row["nll"] == pytest.approx(-score.logprob, rel=1e-9)
        assert (row["tokens"], row["oovs"]) == (score.tokens, score.oovs)
    assert sum(r["nll"] for r in rows) == pytest.approx(report.nll, rel=1e-12)
    assert sum(r["hits"] for r in rows) == round(report.top1_accuracy * report.tokens)
    tokens = [json.loads(line) for line in tok.read_text().splitlines()]
    assert len(tokens) == report.tokens
    first = [t for t in tokens if t["line"] == 2]
    expected = scorer.full_scores(SENTENCES[0])
    assert [t["word"] for t in first] == [t.word for t in expected]
    assert [t["logprob"] for t in first] == pytest.approx([t.logprob for t in expected], abs=1e-9)
    with pytest.raises(FileExistsError, match="pass --force"):
        scorer.evaluate(lines, per_sentence=sent)
    assert sent.read_text().count("\n") == 30  # untouched


# ---- outputs never replace inputs (bug 3) ----------------------------------------------------

def test_scorer_evaluate_never_writes_over_its_corpus_or_model(scorer, model_path, tmp_path):
    """Scorer.evaluate("in.txt", per_token="in.txt", force=True) destroyed the corpus, and
    per_sentence="model.onnx" the model."""
    corpus = tmp_path / "in.txt"
    corpus.write_text("the cat sat\n")
    model_bytes = model_path.read_bytes()
    for outputs in ({"per_token": corpus}, {"per_sentence": model_path},
                    {"per_sentence": str(corpus), "per_token": tmp_path / "t.jsonl"}):
        with pytest.raises(ValueError, match="is an input of this command"):
            scorer.evaluate(corpus, force=True, **outputs)
    with pytest.raises(ValueError, match="is an input of this command"):
        scorer.evaluate(["the cat"], per_sentence=model_path, force=True)
    assert corpus.read_text() == "the cat sat\n" and model_path.read_bytes() == model_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


# ---- memory of the look-ahead (bug 7) --------------------------------------------------------

def test_the_look_ahead_is_bounded_in_bytes(scorer):
    """20 lines of 300k words were all held (779 MB) before the first result: the look-ahead
    counted lines.  Now it holds at most LOOKAHEAD_BYTES bytes of text (or one longer line)."""
    assert LOOKAHEAD_BYTES == 1 << 20
    held, most = 0, 0
    builder = ExampleBuilder(scorer.vocab)

    def examples():
        nonlocal held, most
        for i in range(30):
            example = builder.build(Line(i + 1, " ".join(["cat"] * 19_999), 80_000))  # 80 kB
            held += example.tokens
            most = max(most, held)
            yield example

    evaluator = Evaluator(scorer._session, max_tokens=4096)
    for example, _ in evaluator.scored(examples()):
        held -= example.tokens
        if example.key == 1:  # 13 lines fill 1 MiB; the 14th, read, starts the next
            assert most == 14 * 20_000
    assert most == 14 * 20_000 and evaluator.totals.sentences == 30


# ---- a model whose logits hold NaN (bug 9) and foreign dtypes --------------------------------

@pytest.fixture(scope="module")
def nan_model(model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "nan.onnx"
    edit_logits(model_path, path, nan=True)
    return path


def test_nan_logits_give_nan_not_inf_and_predict_never_lists_pad_or_bos(nan_model):
    scorer = Scorer(nan_model, providers="cpu")
    report = scorer.evaluate(["the cat", "a dog"])
    assert math.isnan(report.nll) and math.isnan(report.perplexity)
    assert math.isnan(report.perplexity_no_oov) and report.top1_accuracy == 0.0
    assert math.isnan(scorer.score(["the cat"])[0].perplexity)
    listed = [w for w, _ in scorer.predict_next("the cat", k=len(WORDS) + 2)]
    assert sorted(listed) == sorted(WORDS + ["<unk>", "</s>"])
    with pytest.raises(RuntimeError, match="next-word distribution holds NaN"):
        scorer.generate("the", words=3, seed=0)


def test_float16_logits_are_refused_at_load(model_path, tmp_path):
    """fp16 logits reached the kernel ("kernel advice") or were silently used by predict."""
    path = tmp_path / "fp16.onnx"
    edit_logits(model_path, path, float16=True)
    with pytest.raises(ArtifactError, match=r"'(head_)?logits' is tensor\(float16\) of rank 3, an "
                                            r"lmonnx model has tensor\(float\) of rank 3"):
        ModelSession(path, providers="cpu")


# ---- generation at a tiny temperature (bug 8) ------------------------------------------------

def test_a_tiny_temperature_is_greedy_without_warnings(scorer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = scorer.generate("the cat", words=8, temperature=1e-320, seed=1)
    assert tiny == scorer.generate("the cat", words=8, temperature=0)


def _fresh_python(code: str) -> str:
    """stdout of ``code`` in a new interpreter without OMP_WAIT_POLICY in its environment."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_importing_the_scoring_stack_leaves_the_environment_alone():
    """lmonnx.xent set OMP_WAIT_POLICY on import; only the CLI's own process may."""
    assert _fresh_python("import os, lmonnx.xent, lmonnx.scorer, lmonnx.evaluate; "
                         "print(os.environ.get('OMP_WAIT_POLICY'))") == "None\n"


def test_the_cli_sets_the_openmp_wait_policy_before_the_kernel_loads():
    """libgomp reads OMP_WAIT_POLICY once, when the kernel (lmonnx._xent) loads.  The package
    imported the kernel eagerly, so `import lmonnx.cli` had loaded it before the CLI's scoring
    commands could set the variable: the setting never took effect."""
    assert _fresh_python("import sys, lmonnx.cli; print('lmonnx._xent' in sys.modules, "
                         "'onnxruntime' in sys.modules)") == "False False\n"
