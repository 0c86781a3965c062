"""lmonnx as pyctcdecode's word language model (lmonnx.ctc_decoding), on a tiny random model:
scores against Scorer.step / end and against pyctcdecode's own KenLM wrapper fed lmonnx's
probabilities in log10, the cache, partial words, pickling, decoding simulated emissions
(benchmarks/ctc_table.py) alone and in a fork pool, the errors, and pyctcdecode missing."""

import importlib.util
import math
import multiprocessing
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import import_extra

pyctcdecode = import_extra("pyctcdecode", "asr")

from benchmark_modules import load_benchmark  # noqa: E402 (after the skip)
from lmonnx import Scorer  # noqa: E402
from lmonnx._testing import build_random_lm, make_vocab  # noqa: E402
from lmonnx.ctc_decoding import (LN10, UNBOUNDED_ORDER, CTCLMState,  # noqa: E402
                                 LmonnxLanguageModel, build_ctcdecoder, load_ctcdecoder)
from lmonnx.errors import (ArgumentTypeError, ArtifactError,  # noqa: E402
                           InvalidArgumentError, MissingDependencyError, PathExistsError,
                           PathNotFoundError)
from lmonnx.vocab import UNK_ID  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and dog ran to big red hat sun Moses".split()
SENTENCE = "the big cat sat on a red mat and the dog ran"


ctc_table = load_benchmark("ctc_table")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ctc") / "tiny.onnx"
    build_random_lm(path, make_vocab(WORDS), units=8, seed=3)
    return path


@pytest.fixture(scope="module")
def scorer(model_path) -> Scorer:
    return Scorer(model_path, providers="cpu", num_threads=1)


@pytest.fixture(scope="module")
def emissions():
    return ctc_table.simulate_emissions(SENTENCE, np.random.default_rng(5), p_sub=0.15)


def test_score_is_alpha_times_nats_plus_beta(scorer):
    lm = LmonnxLanguageModel(scorer, alpha=0.7, beta=1.3)
    score, state = lm.score(lm.get_start_state(), "the")
    logprob, after_the = scorer.step(scorer.begin(), "the")
    assert score == pytest.approx(0.7 * logprob + 1.3, rel=1e-12)
    score, _ = lm.score(state, "cat", is_last_word=True)
    cat, after_cat = scorer.step(after_the, "cat")
    end, _ = scorer.end(after_cat)
    assert score == pytest.approx(0.7 * (cat + end) + 1.3, rel=1e-12)
    assert np.array_equal(lm.lm_state(state).h, after_the.h)
    assert lm.order == UNBOUNDED_ORDER


def test_unknown_word_is_unk_plus_offset_in_log10_units(scorer):
    lm = LmonnxLanguageModel(scorer, alpha=0.5, beta=0.0, unk_score_offset=-4.0)
    score, state = lm.score(lm.get_start_state(), "zebra")
    unk = scorer.begin().logprob(UNK_ID)
    assert score == pytest.approx(0.5 * (unk - 4.0 * LN10), rel=1e-12)
    assert state.ids == (UNK_ID,) and lm.word_id("zebra") == UNK_ID and not lm.is_known("zebra")
    # a word the model knows but the unigrams leave out: its own probability, plus the offset
    restricted = LmonnxLanguageModel(scorer, alpha=0.5, beta=0.0, unk_score_offset=-4.0,
                                     unigrams=["the", "cat", "zebra"], unknown="unk")
    score, _ = restricted.score(restricted.get_start_state(), "dog")
    dog, _ = scorer.step(scorer.begin(), "dog")
    assert score == pytest.approx(0.5 * (dog - 4.0 * LN10), rel=1e-12)
    assert restricted.is_known("cat") and not restricted.is_known("zebra")


def test_a_unigram_unknown_to_the_model_is_an_error_by_default(scorer, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"2 decoder word\(s\) unknown to the model: "
                       r"'zebra', 'yak'.*unknown='unk'") as caught:
        build_ctcdecoder(ctc_table.LABELS, scorer, unigrams=["the", "zebra", "yak"])
    assert "\n" not in str(caught.value)
    with pytest.raises(InvalidArgumentError, match="unknown must be one of"):
        LmonnxLanguageModel(scorer, unknown="drop")
    assert LmonnxLanguageModel(scorer, unigrams=["THE"], case_fold=True).is_known("the")


def test_empty_last_word_scores_the_end_alone(scorer):
    lm = LmonnxLanguageModel(scorer, alpha=0.5, beta=2.0)
    _, state = lm.score(lm.get_start_state(), "the")
    score, same = lm.score(state, "", is_last_word=True)
    end, _ = scorer.end(scorer.step(scorer.begin(), "the")[1])
    assert same == state and score == pytest.approx(0.5 * end, rel=1e-12)


def test_case_fold_maps_lowercase_words_to_the_model_spelling(scorer):
    exact = LmonnxLanguageModel(scorer)
    folded = LmonnxLanguageModel(scorer, case_fold=True)
    moses = scorer.vocab.token_to_id("Moses")
    assert exact.word_id("moses") == UNK_ID and not exact.is_known("moses")
    assert folded.word_id("moses") == moses and folded.is_known("moses")
    assert folded.score_partial_token("mos") == 0.0 and exact.score_partial_token("mos") < 0


class _KenLMOfLmonnx:
    """A stand-in for ``kenlm.Model`` that answers BaseScore with lmonnx's log10
    probabilities: pyctcdecode's own ``LanguageModel`` over it is the reference."""

    order = 5

    def __init__(self, scorer):
        self.scorer, self.history = scorer, {}

    def __contains__(self, word):
        return word in self.scorer.vocab and word not in ("<pad>", "<unk>", "<s>", "</s>")

    def BeginSentenceWrite(self, state):
        self.history[id(state)] = self.scorer.begin()

    def BaseScore(self, prev, word, out):
        lm = self.history[id(prev)]
        if word == "</s>":
            logprob, lm = self.scorer.end(lm)
        else:
            logprob, lm = self.scorer.step(lm, word)
        self.history[id(out)] = lm
        return logprob / LN10


def test_scores_equal_pyctcdecodes_kenlm_wrapper_fed_lmonnx_log10(scorer):
    pytest.importorskip("kenlm")  # pyctcdecode's wrapper makes kenlm.State objects
    from pyctcdecode.language_model import LanguageModel

    settings = dict(alpha=0.6, beta=1.1, unk_score_offset=-3.0)
    reference = LanguageModel(_KenLMOfLmonnx(scorer), unigrams=WORDS, **settings)
    lm = LmonnxLanguageModel(scorer, **settings)
    ref_state, state, kept = reference.get_start_state(), lm.get_start_state(), []
    for i, word in enumerate(["the", "zebra", "cat", "Moses", "ran"]):
        last = i == 4
        expected, ref_state = reference.score(ref_state, word, is_last_word=last)
        kept.append(ref_state)  # the stand-in keys histories by id(): keep states alive
        got, state = lm.score(state, word, is_last_word=last)
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), word
    for partial in ["th", "zeb", "c", "mose", "Mose", "catsatonthe", "thecatsatonamat"]:
        assert lm.score_partial_token(partial) == reference.score_partial_token(partial)


def test_cache_hits_and_evictions_do_not_change_scores(scorer):
    words = SENTENCE.split()

    def run(lm):
        state, scores = lm.get_start_state(), []
        for i, word in enumerate(words):
            score, state = lm.score(state, word, is_last_word=i == len(words) - 1)
            scores.append(score)
        return scores

    cached = LmonnxLanguageModel(scorer)
    first = run(cached)
    steps = cached.cache_info()["steps"]
    assert run(cached) == first and cached.cache_info()["steps"] == steps  # all hits
    assert cached.cache_info()["hits"] > 0
    assert run(LmonnxLanguageModel(scorer, cache_size=1)) == first  # recomputed each time
    # many words after one state: one step (for the state), each word a lookup
    fresh = LmonnxLanguageModel(scorer)
    _, state = fresh.score(fresh.get_start_state(), "the")
    for word in WORDS:
        fresh.score(state, word)
    assert fresh.cache_info()["steps"] == 1


def test_simulated_emissions_are_seeded_posteriors():
    first = ctc_table.simulate_emissions(SENTENCE, np.random.default_rng(1))
    again = ctc_table.simulate_emissions(SENTENCE, np.random.default_rng(1))
    other = ctc_table.simulate_emissions(SENTENCE, np.random.default_rng(2))
    assert np.array_equal(first, again) and not np.array_equal(first[:10], other[:10])
    assert first.shape[1] == len(ctc_table.LABELS) and first.shape[0] > len(SENTENCE)
    assert np.allclose(first.sum(axis=1), 1.0, atol=1e-5)
    clean = ctc_table.simulate_emissions(SENTENCE, np.random.default_rng(1), p_sub=0.0)
    assert pyctcdecode.build_ctcdecoder(ctc_table.LABELS).decode(clean) == SENTENCE
    assert ctc_table.clean_sentence("God's  <unk> Word!") is None
    assert ctc_table.clean_sentence("God's Word, 3 times!") == "god's word times"


def test_decode_returns_text_and_alpha_zero_is_the_no_lm_search(model_path, emissions):
    decoder = build_ctcdecoder(ctc_table.LABELS, model_path, num_threads=1)
    text = decoder.decode(emissions, beam_width=16)
    assert isinstance(text, str) and text.strip()
    silent = build_ctcdecoder(ctc_table.LABELS, model_path, alpha=0.0, beta=0.0,
                              unk_score_offset=0.0, num_threads=1)
    plain = pyctcdecode.build_ctcdecoder(ctc_table.LABELS)
    with_lm = silent.decode_beams(emissions, beam_width=16)
    without = plain.decode_beams(emissions, beam_width=16)
    assert [b[0] for b in with_lm] == [b[0] for b in without]
    assert [b[3] for b in with_lm] == [b[3] for b in without]  # the CTC (logit) scores


def test_pickle_round_trip_reopens_the_model(model_path, scorer, emissions):
    lm = LmonnxLanguageModel(scorer, alpha=0.3, beta=0.2, unk_score_offset=-2.0,
                             unigrams=["the", "cat"], case_fold=True, cache_size=7, order=3)
    copy = pickle.loads(pickle.dumps(lm))
    assert copy.scorer is not scorer and copy.cache_info()["max_size"] == 7
    assert (copy.alpha, copy.beta, copy.unk_score_offset, copy.order) == (0.3, 0.2, -2.0, 3)
    for word in ["the", "dog", "zebra", "moses"]:
        assert copy.score(copy.get_start_state(), word) == lm.score(lm.get_start_state(), word)
    labels = pyctcdecode.Alphabet.build_alphabet(ctc_table.LABELS)
    decode = [pyctcdecode.BeamSearchDecoderCTC(labels, m).decode(emissions, beam_width=8)
              for m in (lm, copy)]
    assert decode[0] == decode[1]
    with pytest.raises(ArgumentTypeError, match="opened from bytes"):
        pickle.dumps(LmonnxLanguageModel(Scorer(model_path.read_bytes(), providers="cpu")))


def test_a_saved_decoder_loads_back_and_decodes_alike(model_path, emissions, tmp_path):
    decoder = build_ctcdecoder(ctc_table.LABELS, model_path, alpha=0.4, beta=0.9,
                               unk_score_offset=-3.0, unigrams=["the", "cat", "Moses"],
                               case_fold=True, cache_size=9, order=4, num_threads=1)
    decoder.save_to_dir(str(tmp_path))
    loaded = load_ctcdecoder(tmp_path, num_threads=1)
    lm, again = decoder._language_model, loaded._language_model
    assert (again.alpha, again.beta, again.unk_score_offset, again.case_fold, again.order) == \
        (0.4, 0.9, -3.0, True, 4)
    assert again.cache_info()["max_size"] == 9 and again.is_known("moses")
    assert not again.is_known("dog") and lm.is_known("the") and again.is_known("the")
    assert (tmp_path / "language_model" / "model.onnx").read_bytes() == model_path.read_bytes()
    assert loaded.decode(emissions, beam_width=8) == decoder.decode(emissions, beam_width=8)
    with pytest.raises(PathExistsError, match="new directory") as caught:
        lm.save_to_dir(tmp_path / "language_model")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("damage, error, text", [
    (lambda d: (d / "alphabet.json").unlink(), PathNotFoundError, "alphabet.json"),
    (lambda d: (d / "language_model" / "lmonnx_language_model.json").unlink(),
     PathNotFoundError, "lmonnx_language_model.json"),
    (lambda d: (d / "language_model" / "lmonnx_language_model.json").write_text("{"),
     ArtifactError, "not lmonnx's settings"),
    (lambda d: (d / "language_model" / "lmonnx_language_model.json").write_text('{"x": 1}'),
     ArtifactError, "unexpected settings"),
])
def test_a_damaged_saved_decoder_is_one_line_error(model_path, tmp_path, damage, error, text):
    build_ctcdecoder(ctc_table.LABELS, model_path).save_to_dir(str(tmp_path))
    damage(tmp_path)
    with pytest.raises(error, match=text) as caught:
        load_ctcdecoder(tmp_path)
    assert "\n" not in str(caught.value)


def test_decode_batch_in_a_fork_pool(model_path, emissions):
    decoder = build_ctcdecoder(ctc_table.LABELS, model_path, num_threads=1)
    other = ctc_table.simulate_emissions("a cat ran to the sun", np.random.default_rng(9))
    alone = [decoder.decode(e, beam_width=8) for e in (emissions, other)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert decoder.decode_batch(pool, [emissions, other], beam_width=8) == alone


def test_reset_params_through_the_decoder(model_path):
    decoder = build_ctcdecoder(ctc_table.LABELS, model_path)
    decoder.reset_params(alpha=0.25, beta=-1.0, unk_score_offset=-5.0, lm_score_boundary=True)
    lm = decoder._language_model
    assert (lm.alpha, lm.beta, lm.unk_score_offset) == (0.25, -1.0, -5.0)
    with pytest.raises(InvalidArgumentError, match="score_boundary=False"):
        decoder.reset_params(lm_score_boundary=False)
    with pytest.raises(InvalidArgumentError, match="unknown parameter"):
        lm.reset_params(gamma=1.0)


@pytest.mark.parametrize("call, error, text", [
    (lambda p: LmonnxLanguageModel(42), ArgumentTypeError, "Scorer or a model path"),
    (lambda p: LmonnxLanguageModel(p, alpha="high"), ArgumentTypeError, "alpha"),
    (lambda p: LmonnxLanguageModel(p, beta=math.nan), InvalidArgumentError, "beta"),
    (lambda p: LmonnxLanguageModel(p, cache_size=0), InvalidArgumentError, "cache_size"),
    (lambda p: LmonnxLanguageModel(p, unigrams="the cat"), ArgumentTypeError, "unigrams"),
    (lambda p: LmonnxLanguageModel(p).score(None, "the"), ArgumentTypeError, "CTCLMState"),
    (lambda p: LmonnxLanguageModel(p.parent / "missing.onnx"), PathNotFoundError, "missing"),
    (lambda p: build_ctcdecoder("ab", p), ArgumentTypeError, "labels"),
])
def test_bad_inputs_raise_one_line_errors(model_path, call, error, text):
    with pytest.raises(error, match=text) as caught:
        call(model_path)
    assert "\n" not in str(caught.value)


def test_negative_alpha_is_accepted_as_pyctcdecode_does(scorer):
    lm = LmonnxLanguageModel(scorer, alpha=-0.5, beta=0.0)
    logprob, _ = scorer.step(scorer.begin(), "the")
    assert lm.score(CTCLMState(), "the")[0] == pytest.approx(-0.5 * logprob)


def test_without_pyctcdecode_using_the_module_names_the_install(monkeypatch, model_path):
    for name in [n for n in sys.modules if n == "pyctcdecode" or n.startswith("pyctcdecode.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    path = REPO / "lmonnx" / "ctc_decoding.py"
    spec = importlib.util.spec_from_file_location("ctc_decoding_without_pyctcdecode", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)  # importing works; using it says what to install
    for call in (lambda: module.LmonnxLanguageModel(model_path),
                 lambda: module.build_ctcdecoder(ctc_table.LABELS, model_path)):
        with pytest.raises(MissingDependencyError, match="pip install") as caught:
            call()
        assert "\n" not in str(caught.value)
