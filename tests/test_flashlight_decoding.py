"""lmonnx as flashlight-text's word language model (lmonnx.flashlight_decoding), on tiny random
models of both softmaxes: scores against Scorer.step / end in log10, trie states, pending
states computed in one batch or one at a time (same decodes), lm_weight 0 as the no-LM search,
flashlight's own KenLM through the same decoder, decoding simulated emissions
(benchmarks/ctc_table.py), the errors, and flashlight-text missing."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import import_extra

import_extra("flashlight.lib.text.decoder", "asr")

from benchmark_modules import load_benchmark  # noqa: E402 (after the skip)
from lmonnx import Scorer  # noqa: E402
from lmonnx._testing import build_random_lm, make_vocab  # noqa: E402
from lmonnx.errors import (ArgumentTypeError, InvalidArgumentError,  # noqa: E402
                           MissingDependencyError)
from lmonnx.flashlight_decoding import (LOG10_E, LexiconCTCDecoder,  # noqa: E402
                                        LmonnxFlashlightLM, spell)
from lmonnx.incremental import END  # noqa: E402
from lmonnx.vocab import UNK_ID  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and dog ran to big red hat sun".split()
SENTENCES = ["the big cat sat on a red mat", "a dog ran to the sun", "the cat and the dog"]


ctc_table = load_benchmark("ctc_table")


@pytest.fixture(scope="module", params=["full", "factored"])
def model_path(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flashlight") / f"{request.param}.onnx"
    build_random_lm(path, make_vocab(WORDS), units=8, seed=4,
                    cutoffs=[10] if request.param == "factored" else None)
    return path


@pytest.fixture(scope="module")
def scorer(model_path) -> Scorer:
    return Scorer(model_path, providers="cpu", num_threads=1)


@pytest.fixture(scope="module")
def log_probs():
    """Log-posteriors of the simulated emissions, a word boundary after the last word."""
    return [np.log(e) for e in ctc_table.emissions_for(SENTENCES, seed=3, p_sub=0.2)]


def test_scores_are_the_models_log10_probabilities(scorer):
    lm = LmonnxFlashlightLM(scorer, WORDS)
    start = lm.start(False)
    after_the, score = lm.score(start, WORDS.index("the"))
    logprob, state = scorer.step(scorer.begin(), "the")
    assert score == pytest.approx(logprob * LOG10_E, rel=1e-6)
    after_cat, score = lm.score(after_the, WORDS.index("cat"))
    logprob, state = scorer.step(state, "cat")
    assert score == pytest.approx(logprob * LOG10_E, rel=1e-6)
    same, end = lm.finish(after_cat)
    assert same is after_cat
    assert end == pytest.approx(scorer.step(state, END)[0] * LOG10_E, rel=1e-6)


def test_a_history_is_one_trie_node(scorer):
    lm = LmonnxFlashlightLM(scorer, WORDS)
    start = lm.start(False)
    first, _ = lm.score(start, 0)
    again, _ = lm.score(start, 0)
    assert first is again  # flashlight compares hypotheses' states by node
    other, _ = lm.score(start, 1)
    assert other is not first
    assert lm.score(first, 2)[1] != lm.score(other, 2)[1]


def test_scoring_the_lexicon_after_the_start_costs_no_call(scorer):
    lm = LmonnxFlashlightLM(scorer, WORDS)
    start = lm.start(False)
    for index in range(len(WORDS)):
        lm.score(start, index)
    assert lm.stats.calls == 0 and lm.stats.scored == len(WORDS)


@pytest.mark.parametrize("batch_frames", [0, 3, 1_000_000])
def test_batched_and_lazy_states_decode_alike(scorer, log_probs, batch_frames):
    lazy = LexiconCTCDecoder(ctc_table.LABELS, LmonnxFlashlightLM(scorer, WORDS, batch_frames=None),
                             beam_size=8, lm_weight=1.5)
    batched = LexiconCTCDecoder(ctc_table.LABELS, LmonnxFlashlightLM(
        scorer, WORDS, batch_frames=batch_frames), beam_size=8, lm_weight=1.5)
    for matrix in log_probs:
        assert batched.decode(matrix) == lazy.decode(matrix)
    one, many = lazy.lm.stats, batched.lm.stats
    assert one.computed == one.used == one.calls  # one call per history a word followed
    assert many.used == one.used and many.scored == one.scored
    assert many.calls <= one.calls and many.computed >= many.used


def test_stepping_frame_by_frame_is_flashlights_whole_decode(scorer, log_probs):
    decoder = LexiconCTCDecoder(ctc_table.LABELS, scorer, beam_size=8, lm_weight=1.5)
    for matrix in log_probs:
        emissions = np.ascontiguousarray(matrix, dtype=np.float32)
        whole = decoder._decoder.decode(emissions.ctypes.data, *emissions.shape)[0]
        assert decoder.decode(matrix) == [decoder.words[i] for i in whole.words if i >= 0]


def test_lm_weight_zero_is_the_no_lm_search(scorer, log_probs):
    silent = LexiconCTCDecoder(ctc_table.LABELS, scorer, beam_size=8, lm_weight=0.0)
    plain = LexiconCTCDecoder(ctc_table.LABELS, None, words=silent.words, beam_size=8)
    for matrix in log_probs:
        assert silent.decode(matrix) == plain.decode(matrix)


def test_decoding_spells_lexicon_words(scorer, log_probs):
    decoder = LexiconCTCDecoder(ctc_table.LABELS, scorer, beam_size=16)
    assert sorted(decoder.words) == sorted(WORDS)
    for matrix in log_probs:
        words = decoder.decode(matrix)
        assert words and set(words) <= set(WORDS)
    clean = ctc_table.emissions_for(["the cat sat on a mat"], seed=1, p_sub=0.0)[0]
    assert decoder.decode(np.log(clean)) == "the cat sat on a mat".split()


def test_flashlights_own_kenlm_runs_in_the_same_decoder(tmp_path, log_probs):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    arpa = tmp_path / "flat.arpa"  # every word equally likely (KenLM needs a bigram section)
    entries = ["<s>", "</s>", "<unk>", *WORDS]
    logprob = math.log10(1 / (len(entries) - 1))
    arpa.write_text(f"\\data\\\nngram 1={len(entries)}\nngram 2=1\n\n\\1-grams:\n"
                    + "".join(f"{-99 if w == '<s>' else logprob:.6f}\t{w}\t0\n" for w in entries)
                    + f"\n\\2-grams:\n{logprob:.6f}\t<s> the\n\n\\end\\\n")
    kenlm = KenLM(str(arpa), Dictionary(WORDS))
    decoder = LexiconCTCDecoder(ctc_table.LABELS, kenlm, words=WORDS, beam_size=8)
    for matrix in log_probs:
        assert set(decoder.decode(matrix)) <= set(WORDS)
    with pytest.raises(InvalidArgumentError, match="pass words"):
        LexiconCTCDecoder(ctc_table.LABELS, kenlm)


def test_unknown_words_are_an_error_or_unk(scorer):
    with pytest.raises(InvalidArgumentError, match="2 decoder word.*'zebra', 'yak'") as caught:
        LmonnxFlashlightLM(scorer, ["the", "zebra", "yak"])
    assert "\n" not in str(caught.value)
    lm = LmonnxFlashlightLM(scorer, ["the", "zebra", "The"], unknown="unk")
    start = lm.start(False)
    unk = scorer.begin().logprob(UNK_ID) * LOG10_E
    assert lm.score(start, 1)[1] == pytest.approx(unk, rel=1e-6)
    assert lm.score(start, 2)[1] == pytest.approx(unk, rel=1e-6)  # case kept: unknown
    folded = LmonnxFlashlightLM(scorer, ["THE"], case_fold=True)
    assert folded.score(folded.start(False), 0)[1] == lm.score(start, 0)[1]


def test_the_default_lexicon_is_the_words_the_tokens_spell(scorer):
    tokens = [t for t in ctc_table.LABELS if t not in ("b", "g")]  # no "big", no "dog"
    decoder = LexiconCTCDecoder(tokens, scorer)
    assert sorted(decoder.words) == sorted(w for w in WORDS if not set(w) & {"b", "g"})
    unk = LexiconCTCDecoder(ctc_table.LABELS, scorer, words=["the", "zebra"], unknown="unk")
    assert unk.lm.score(unk.lm.start(False), 1)[1] == pytest.approx(
        scorer.begin().logprob(UNK_ID) * LOG10_E, rel=1e-6)
    with pytest.raises(InvalidArgumentError, match="'zebra'"):
        LexiconCTCDecoder(ctc_table.LABELS, scorer, words=["the", "zebra"])


def test_spell_ends_words_at_the_boundary():
    assert spell("ab", ["", " ", "a", "b"], " ") == [2, 3, 1]
    assert spell("abc", ["", " ", "a", "b"], " ") is None


@pytest.mark.parametrize("call, error, text", [
    (lambda s: LmonnxFlashlightLM(42, WORDS), ArgumentTypeError, "Scorer or a model path"),
    (lambda s: LmonnxFlashlightLM(s, "the cat"), ArgumentTypeError, "words"),
    (lambda s: LmonnxFlashlightLM(s, WORDS, unknown="skip"), InvalidArgumentError, "unknown"),
    (lambda s: LmonnxFlashlightLM(s, WORDS, batch_frames=-1), InvalidArgumentError,
     "batch_frames"),
    (lambda s: LexiconCTCDecoder("abc", s), ArgumentTypeError, "tokens"),
    (lambda s: LexiconCTCDecoder(ctc_table.LABELS[1:], s), InvalidArgumentError, "blank_token"),
    (lambda s: LexiconCTCDecoder(["", " ", "a"], s, words=["the"]), InvalidArgumentError,
     "cannot be spelled"),
    (lambda s: LexiconCTCDecoder(["", " ", "q"], s), InvalidArgumentError, "lexicon is empty"),
    (lambda s: LexiconCTCDecoder(ctc_table.LABELS, None), InvalidArgumentError, "words"),
    (lambda s: LexiconCTCDecoder(ctc_table.LABELS, s, beam_size=0), InvalidArgumentError,
     "beam_size"),
    (lambda s: LexiconCTCDecoder(ctc_table.LABELS, s).decode(np.zeros((5, 3))),
     InvalidArgumentError, r"\[frames, 29\]"),
    (lambda s: LexiconCTCDecoder(ctc_table.LABELS, s).decode(np.full((5, 29), np.nan)),
     InvalidArgumentError, "finite"),
])
def test_bad_inputs_raise_one_line_errors(scorer, call, error, text):
    with pytest.raises(error, match=text) as caught:
        call(scorer)
    assert "\n" not in str(caught.value)


def test_without_flashlight_using_the_module_names_the_install(monkeypatch, model_path):
    for name in [n for n in sys.modules if n == "flashlight" or n.startswith("flashlight.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "flashlight", None)
    path = REPO / "lmonnx" / "flashlight_decoding.py"
    spec = importlib.util.spec_from_file_location("flashlight_decoding_without_it", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    for call in (lambda: module.LmonnxFlashlightLM(model_path, WORDS),
                 lambda: module.LexiconCTCDecoder(ctc_table.LABELS, model_path)):
        with pytest.raises(MissingDependencyError, match="pip install flashlight-text") as caught:
            call()
        assert "\n" not in str(caught.value)
