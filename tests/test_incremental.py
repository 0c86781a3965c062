"""Format 2: the state carried across windows, incremental scoring for decoders, generation.

The model is the TensorFlow-free random LSTM of lmonnx/_testing.py in its stateful form; the
reference for stepped scores is full_scores, i.e. the same graph run over the whole sentence.
"""

import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from lmonnx._testing import SOFTMAXES, build_random_lm, make_vocab, random_cutoffs

from lmonnx import Scorer
from lmonnx.artifact import ArtifactError
from lmonnx.cli import main
from lmonnx.incremental import END

WORDS = [f"w{i}" for i in range(60)]
RNG = np.random.default_rng(11)
SENTENCES = [" ".join(RNG.choice(WORDS + ["zebra"], size=RNG.integers(0, 20))) for _ in range(50)]


@pytest.fixture(scope="module", params=SOFTMAXES)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("stateful") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=24, layers=2, seed=2,
                    cutoffs=random_cutoffs(request.param, len(WORDS) + 4))
    return path


@pytest.fixture(scope="module")
def stateless(tmp_path_factory):
    path = tmp_path_factory.mktemp("stateless") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=24, layers=2, seed=2, stateful=False)
    return path


@pytest.fixture(scope="module")
def scorer(model):
    return Scorer(model, providers="cpu")


def stepped(scorer, sentence):
    state, logprobs = scorer.begin(), []
    for word in sentence.split():
        logprob, state = scorer.step(state, word)
        logprobs.append(logprob)
    logprob, state = scorer.end(state)
    return logprobs + [logprob], state


def test_stepping_a_sentence_gives_full_scores(scorer):
    for sentence in SENTENCES:
        logprobs, state = stepped(scorer, sentence)
        expected = [t.logprob for t in scorer.full_scores(sentence)]
        assert logprobs == pytest.approx(expected, abs=1e-4)
        assert state.ended and state.words == len(sentence.split()) + 1


def test_a_literal_end_token_is_a_word_in_step_as_in_score(scorer):
    """step(state, "</s>") ended the sentence while score() read a literal </s> as <unk>:
    now a string is always a word, and END (or Scorer.end) ends the sentence."""
    sentence = "w1 </s> w2"
    logprobs, state = stepped(scorer, sentence)
    assert logprobs == pytest.approx([t.logprob for t in scorer.full_scores(sentence)], abs=1e-5)
    assert [t.id for t in scorer.full_scores(sentence)] == [5, 1, 6, 3]
    assert state.ended and state.words == 4
    lp, after = scorer.step(scorer.begin(), "</s>")
    assert not after.ended and lp == scorer.begin().logprob(1)
    lp, ended = scorer.step(scorer.begin(), END)
    assert ended.ended and lp == scorer.begin().logprob(3) == scorer.end(scorer.begin())[0]


def test_step_batch_equals_single_steps_with_mixed_histories(scorer):
    histories = ["", "w1", "w1 w2 w3 w4 w5 w6 w7", "zebra w9", "w3 w3"]
    states = []
    for h in histories:
        state = scorer.begin()
        for w in h.split():
            _, state = scorer.step(state, w)
        states.append(state)
    words = ["w4", END, "zebra", "w0", "w59"]
    logprobs, new = scorer.step_batch(states, words)
    for state, word, lp, n in zip(states, words, logprobs, new):
        lp1, n1 = scorer.step(state, word)
        assert lp == lp1
        assert n.ended == (word is END) and n.words == state.words + 1
        if not n.ended:
            np.testing.assert_allclose(n.logprobs, n1.logprobs, atol=1e-5)
            np.testing.assert_allclose(n.h, n1.h, atol=1e-6)
    dist = scorer.next_logprobs(states)
    assert dist.shape == (5, len(scorer.vocab)) and dist.dtype == np.float32
    np.testing.assert_allclose(np.log(np.exp(dist.astype(np.float64)).sum(axis=1)), 0, atol=1e-5)
    ids = [scorer.vocab.token_to_id(w) if w is not END else 3 for w in words]
    assert dist[np.arange(5), ids] == pytest.approx(logprobs, abs=1e-6)


def test_step_batch_is_one_onnxruntime_call(scorer, monkeypatch):
    calls = []
    real = scorer._session.run
    monkeypatch.setattr(scorer._session, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    states = [scorer.begin()] * 64
    scorer.step_batch(states, ["w1"] * 32 + [END] * 32)
    assert len(calls) == 1


def test_step_batch_is_chunked_under_the_batch_budget(model, scorer, monkeypatch):
    """50k states went through one call (2.9 GB of logits and log-softmax at V=10k): now at
    most max_tokens rows per call, with the numbers of one call."""
    chunked = Scorer(model, providers="cpu", max_tokens=16)
    rows = []
    real = chunked._incremental.session.run
    monkeypatch.setattr(chunked._incremental.session, "run",
                        lambda ids, state=None: rows.append(len(ids)) or real(ids, state))
    states = [scorer.step(scorer.begin(), f"w{i % 60}")[1] for i in range(100)]
    words = [f"w{(7 * i) % 60}" if i % 9 else END for i in range(100)]
    logprobs, new = chunked.step_batch(states, words)
    assert rows == [16] * 5 + [8]  # 88 hypotheses go on, 12 end
    one_logprobs, one_new = scorer.step_batch(states, words)
    assert logprobs.tolist() == one_logprobs.tolist()
    for a, b in zip(new, one_new):
        assert a.ended == b.ended and a.words == b.words
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-6)


def test_states_are_immutable_values(scorer):
    state = scorer.begin()
    with pytest.raises(ValueError):
        state.logprobs[0] = 0.0
    with pytest.raises(AttributeError):
        state.words = 3
    _, later = scorer.step(state, "w1")
    assert scorer.begin() is state and later is not state  # one begin state, made once


def test_oov_words_score_as_unk_and_bad_steps_fail(scorer):
    state = scorer.begin()
    assert scorer.step(state, "never-seen")[0] == scorer.step(state, "<unk>")[0]
    _, ended = scorer.end(state)
    for call, exc, match in [
        (lambda: scorer.step(ended, "w1"), ValueError, "already ended"),
        (lambda: scorer.step(state, "w1 w2"), ValueError, "one word"),
        (lambda: scorer.step(state, 3), TypeError, "must be a str"),
        (lambda: scorer.step("state", "w1"), TypeError, "not an LMState"),
        (lambda: scorer.step_batch([state], ["w1", "w2"]), ValueError, "1 states and 2 words"),
        (lambda: scorer.step_batch([state], "w1"), TypeError, "list of words"),
    ]:
        with pytest.raises(exc, match=match):
            call()


def test_states_from_another_model_are_refused(scorer, tmp_path):
    other = tmp_path / "other.onnx"
    build_random_lm(other, make_vocab(WORDS), units=8, layers=1)
    foreign = Scorer(other, providers="cpu").begin()
    with pytest.raises(ValueError, match="another model"):
        scorer.step(foreign, "w1")


def test_incremental_scoring_is_thread_safe(scorer):
    expected = [stepped(scorer, s)[0] for s in SENTENCES[:16]]
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        return [stepped(scorer, s)[0] for s in SENTENCES[i:16:8]]

    with ThreadPoolExecutor(8) as pool:
        for i, got in enumerate(pool.map(work, range(8))):
            for g, e in zip(got, expected[i:16:8]):
                assert g == pytest.approx(e, abs=1e-6)


def test_format_1_models_are_refused_at_load_in_one_line(stateless):
    with pytest.raises(ArtifactError) as info:
        Scorer(stateless, providers="cpu")
    message = str(info.value)
    assert "\n" not in message and message.endswith("re-export this model")
    assert message.startswith(f"{stateless} is a format-1 (stateless) lmonnx model")


# ---- long lines ------------------------------------------------------------------------------

def test_a_5000_word_line_in_windows_equals_one_pass(model):
    line = " ".join(np.random.default_rng(0).choice(WORDS + ["zebra"], size=5000))
    one_pass = Scorer(model, providers="cpu", max_tokens=10**6).score([line])[0]
    windows = Scorer(model, providers="cpu", max_tokens=337).score([line])[0]  # 15 windows
    assert windows.tokens == one_pass.tokens == 5001
    assert windows.logprob == pytest.approx(one_pass.logprob, rel=1e-6)
    tokens_one = Scorer(model, providers="cpu", max_tokens=10**6).full_scores(line)
    tokens_win = Scorer(model, providers="cpu", max_tokens=337).full_scores(line)
    assert [t.logprob for t in tokens_win] == pytest.approx([t.logprob for t in tokens_one],
                                                            abs=1e-5)


def test_a_long_line_among_short_ones(model, tmp_path):
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=n)) for n in (3, 2000, 7, 1, 900)]
    small = Scorer(model, providers="cpu", max_tokens=256).evaluate(lines)
    big = Scorer(model, providers="cpu", max_tokens=10**6).evaluate(lines)
    assert (small.tokens, small.oovs) == (big.tokens, big.oovs)
    assert small.nll == pytest.approx(big.nll, rel=1e-7)
    assert small.top1_accuracy == big.top1_accuracy


def test_long_line_memory_is_bounded_by_the_budget(tmp_path):
    """200k words at V=3000: in one pass the logits alone would be 2.4 GB; in windows the
    whole process stays far below that (the README gives the 1M-word figure)."""
    code = textwrap.dedent(f"""
        import numpy as np
        from lmonnx._testing import build_random_lm, make_vocab
        from lmonnx import Scorer
        words = [f"w{{i}}" for i in range(2996)]
        build_random_lm({str(tmp_path / 'v3k.onnx')!r}, make_vocab(words), units=32, layers=2)
        line = " ".join(np.random.default_rng(0).choice(words, size=200_000))
        score = Scorer({str(tmp_path / 'v3k.onnx')!r}, providers="cpu").score([line])[0]
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(score.tokens, int(hwm.split()[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    tokens, peak_mib = map(int, out.stdout.split())
    assert tokens == 200_001 and peak_mib < 1024


def test_a_long_prefix_runs_in_windows_for_predict_and_generate(model):
    prefix = " ".join(np.random.default_rng(3).choice(WORDS, size=3000))
    small = Scorer(model, providers="cpu", max_tokens=256)  # 12 windows
    big = Scorer(model, providers="cpu", max_tokens=10**6)
    a, b = small.predict_next(prefix, k=5), big.predict_next(prefix, k=5)
    assert [w for w, _ in a] == [w for w, _ in b]
    assert [p for _, p in a] == pytest.approx([p for _, p in b], rel=1e-4)
    assert small.generate(prefix, words=5, temperature=0) == big.generate(prefix, words=5,
                                                                          temperature=0)
    state = small.begin()
    assert "words=0" in repr(state) and len(repr(state)) < 100
    with pytest.raises(TypeError, match="list of states"):
        small.next_logprobs(state)


# ---- generation ------------------------------------------------------------------------------

def test_generation_is_reproducible_and_greedy_at_temperature_0(scorer):
    a = scorer.generate("w1 w2", words=15, seed=7)
    assert a == scorer.generate("w1 w2", words=15, seed=7)
    assert 1 <= len(a) <= 15 and all(w in scorer.vocab for w in a)
    assert "<pad>" not in a and "<s>" not in a
    greedy = scorer.generate("w1 w2", words=10, temperature=0)
    assert greedy == scorer.generate("w1 w2", words=10, top_k=1, seed=123)
    state = scorer.begin()
    for w in ["w1", "w2"]:
        _, state = scorer.step(state, w)
    for w in greedy:  # each greedy word is the argmax (pad and <s> excluded) of its state
        scores = state.logprobs.copy()
        scores[[0, 2]] = -np.inf
        assert scorer.vocab.id_to_token(int(np.argmax(scores))) == w
        if w == "</s>":
            break
        _, state = scorer.step(state, w)


def test_a_generate_prefix_is_cleaned_as_predict_cleans_it(scorer):
    """generate and predict read a prefix as a sentence (to_line): a BOM and surrounding
    whitespace are not words (generate once tokenized the BOM as a word of its own)."""
    clean = scorer.generate("w1 w2", words=8, temperature=0)
    assert scorer.generate("\ufeffw1 w2 \n", words=8, temperature=0) == clean
    assert scorer.predict_next("\ufeffw1 w2 \n", k=3) == scorer.predict_next("w1 w2", k=3)
    with pytest.raises(TypeError, match="prefix"):
        scorer.generate(b"w1", words=2)


def test_step_batch_ends_only_the_hypotheses_given_end(scorer):
    state = scorer.begin()
    logprobs, new = scorer.step_batch([state, state, state], ["w1", END, "w2"])
    assert [s.ended for s in new] == [False, True, False]
    assert [s.words for s in new] == [1, 1, 1]
    assert logprobs[1] == pytest.approx(state.logprob(3))


@pytest.mark.parametrize("kwargs,exc", [
    (dict(words=0), ValueError), (dict(temperature=-1.0), ValueError),
    (dict(temperature=float("nan")), ValueError), (dict(top_k=0), ValueError),
    (dict(seed=-3), ValueError), (dict(words=2.5), TypeError),
], ids=["words0", "negative-temperature", "nan-temperature", "top-k0", "negative-seed",
        "float-words"])
def test_generation_arguments_are_checked(scorer, kwargs, exc):
    with pytest.raises(exc):
        scorer.generate("w1", **kwargs)


def test_generate_from_the_command_line(model, capsys):
    args = ["generate", "w1 w2", "--words", "12", "--seed", "5", "--model", str(model), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert first["words"] == Scorer(model, providers="cpu").generate("w1 w2", words=12, seed=5)
    assert main(["generate", "w1", "--temperature", "0", "--words", "3", "--model", str(model)]) == 0
    assert capsys.readouterr().out.startswith("w1 ")


def test_stepping_200_ptb_sentences_gives_full_scores(ptb_dir, tmp_path):
    """Real text with literal <unk> and OOVs: 200 PTB test sentences, word by word."""
    from collections import Counter

    counts = Counter(w for line in (ptb_dir / "ptb.valid.txt").read_text().split("\n")
                     for w in line.split())
    words = [w for w, _ in counts.most_common(2000) if w != "<unk>"]
    path = tmp_path / "ptb_vocab.onnx"
    build_random_lm(path, make_vocab(words), units=32, layers=2, seed=8)
    scorer = Scorer(path, providers="cpu")
    sentences = [s for s in (ptb_dir / "ptb.test.txt").read_text().split("\n") if s.strip()][:200]
    worst, oovs = 0.0, 0
    for sentence in sentences:
        logprobs, _ = stepped(scorer, sentence)
        full = scorer.full_scores(sentence)
        oovs += sum(t.is_oov for t in full)
        worst = max(worst, max(abs(a - t.logprob) for a, t in zip(logprobs, full)))
    assert worst < 1e-4 and oovs > 100
