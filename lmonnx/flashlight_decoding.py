"""An lmonnx model as the word language model of flashlight-text's lexicon CTC beam search.

flashlight-text (flashlight/text) is the decoder that torchaudio's ``ctc_decoder`` wrapped
(torchaudio 2.9 dropped it; torchaudio's ``CTCDecoderLM`` was flashlight's ``LM`` renamed).
Its ``LexiconDecoder`` walks a trie of the lexicon's spellings and asks a word-level language
model, through ``flashlight.lib.text.decoder.LM``, for:

    start(start_with_nothing) -> state        the state before the first word (per utterance)
    score(state, word_index) -> (state, score) one word after ``state``
    finish(state) -> (state, score)            the end of the utterance (``</s>``)

States are ``flashlight.lib.text.decoder.LMState`` trie nodes: ``state.child(i)`` is the one
node for "``state`` then word ``i``", so the node identifies a word history, and this module
keys its own record of the history by it (torchaudio's custom-LM tutorial does the same).

:class:`LmonnxFlashlightLM` answers with an lmonnx model::

    decoder = LexiconCTCDecoder(tokens, "kjv.onnx", beam_size=32, lm_weight=2.0)
    words = decoder.decode(log_probs)        # float32 [frames, len(tokens)] log-posteriors

**Units.**  Scores are log10 probabilities, what flashlight's own ``KenLM`` returns
(``BaseScore``), so one ``lm_weight`` means the same for both language models; the decoder
adds ``lm_weight * score + word_score`` per word to the acoustic log-posteriors.

**Batching.**  Scoring word ``w`` after a history needs only the history's next-word
distribution; the LSTM step that feeds ``w`` is needed only when some word is scored after
"history + w", which the beam decides frames later, for few of the children it made.  So a
child's state is left pending until a word is scored after it (``batch_frames=None``: one
onnxruntime call per history the beam extends, never for a child it drops).  With
``batch_frames=W``, that call also computes every pending child made in the last ``W``
frames: the ones the beam is likeliest to extend next, so that one call serves several
hypotheses, at the price of rows for the children it then drops (:class:`LexiconCTCDecoder`
steps the decoder a frame at a time and tells the LM the frame; without frames, every pending
child counts as recent).  ``stats`` counts calls, rows and the histories used, to choose
(``benchmarks/ctc_table.py`` measures both).  Scoring the whole lexicon after ``<s>`` (the
trie's unigram smearing) costs no call at all.  States are per utterance: :meth:`start`
forgets the previous utterance's.

**Words.**  The decoder's words (the lexicon) are looked up exactly among the model's
vocabulary tokens (``case_fold=True``: case-insensitively, the most frequent spelling standing
for all).  A word the model does not know is an error by default (``unknown="error"``: a
decoder that proposes it would score every such word as one ``<unk>``); ``unknown="unk"``
scores it as ``<unk>``, as flashlight's KenLM scores a word outside its vocabulary.

flashlight-text is optional (the ``asr`` extra); without it, using this module raises
:class:`~lmonnx.errors.MissingDependencyError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lmonnx.errors import ArgumentTypeError, InvalidArgumentError, MissingDependencyError
from lmonnx.incremental import LMState
from lmonnx.scorer import open_scorer
from lmonnx.validation import check_bool, check_int, check_real
from lmonnx.vocab import EOS_ID, UNK_ID, decoder_word_ids, unknown_decoder_words

try:
    from flashlight.lib.text.decoder import LM as _FlashlightLM
    from flashlight.lib.text.decoder import (CriterionType, LexiconDecoder,
                                             LexiconDecoderOptions, SmearingMode, Trie)
    from flashlight.lib.text.decoder import LMState as FlashlightLMState
    _FLASHLIGHT_MISSING = False
except ImportError:  # the classes below must still be definable; using them says what to install
    _FlashlightLM = object  # type: ignore[assignment,misc]
    _FLASHLIGHT_MISSING = True

LOG10_E = 1.0 / math.log(10.0)
"""log10 units per nat: lmonnx's natural-log probabilities in flashlight KenLM's unit."""

FLASHLIGHT_INSTALL = "pip install flashlight-text"
DEFAULT_BATCH_FRAMES = 4
"""Pending children of the last 4 frames computed together: the fastest of 0-16 frames on
simulated KJV emissions (``benchmarks/ctc_table.py --batch-frames 0,2,4,8,16``, beam 32,
2x300 model: 0.083 s per utterance against 0.126 computing each history alone)."""


def _require_flashlight() -> None:
    if _FLASHLIGHT_MISSING:
        raise MissingDependencyError("lexicon CTC decoding with an lmonnx model needs "
                                     f"flashlight-text: {FLASHLIGHT_INSTALL}")


def _word_token_ids(words: Sequence[str], tokens: Sequence[str], case_fold: bool,
                    unknown: str) -> np.ndarray:
    """int64 [len(words)]: the model's token id of each decoder word (``<unk>``'s for a word
    the model lacks, under ``unknown="unk"``)."""
    if isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
        raise ArgumentTypeError("words must be a list of non-empty str, one per decoder word")
    lookup = decoder_word_ids(tokens, case_fold)
    unknown_decoder_words(words, lookup, case_fold, unknown)
    return np.array([lookup.get(w.lower() if case_fold else w, UNK_ID) for w in words],
                    dtype=np.int64)


class _History:
    """A word history: its parent history and last token (to compute it) and, once computed,
    its lmonnx state (the LSTM state and the next-word log-distribution)."""

    __slots__ = ("parent", "token_id", "frame", "lm", "used")

    def __init__(self, parent: "_History | None", token_id: int, frame: int,
                 lm: LMState | None = None):
        self.parent, self.token_id, self.frame, self.lm = parent, token_id, frame, lm
        self.used = False


@dataclass
class DecodingStats:
    """Counts since the LM was made: ``calls`` (onnxruntime calls), ``computed`` (histories
    stepped by them), ``used`` (histories a word was scored after), ``scored`` (words
    scored).  ``computed - used`` rows were paid for children the beam dropped."""

    calls: int = 0
    computed: int = 0
    used: int = 0
    scored: int = 0


class LmonnxFlashlightLM(_FlashlightLM):
    """flashlight-text's ``LM`` over an lmonnx model, word-level (see the module's docstring:
    log10 scores, pending states computed in batches).

    ``scorer_or_path``: a :class:`~lmonnx.Scorer` or an ``.onnx`` path (opened with
    ``providers``, ``num_threads``).  ``words``: the decoder's word list; ``score(state, i)``
    scores ``words[i]``.  ``unknown``: ``"error"`` or ``"unk"`` for words the model lacks.
    ``batch_frames``: ``W`` (default :data:`DEFAULT_BATCH_FRAMES`) computes a history's state,
    when a word is first scored after it, with every pending child made in the last ``W``
    frames; None computes it alone.
    :attr:`frame` is the decoder's current frame (:class:`LexiconCTCDecoder` sets it).
    """

    def __init__(self, scorer_or_path, words: Sequence[str], *, unknown: str = "error",
                 case_fold: bool = False, batch_frames: int | None = DEFAULT_BATCH_FRAMES,
                 providers: str = "cpu", num_threads: int | None = None):
        _require_flashlight()
        _FlashlightLM.__init__(self)
        self.scorer, _ = open_scorer(scorer_or_path, providers, num_threads)
        self.words = tuple(words) if not isinstance(words, str) else words
        self.case_fold = check_bool("case_fold", case_fold)
        self.batch_frames = (None if batch_frames is None else
                             check_int("batch_frames", batch_frames, low=0))
        self.frame = 0
        self._token_ids = _word_token_ids(self.words, self.scorer.vocab.tokens,
                                          self.case_fold, unknown)
        self._incremental = self.scorer.incremental
        self._histories: dict = {}
        self._pending: list[_History] = []
        self.stats = DecodingStats()

    # ---- flashlight's interface ---------------------------------------------------------

    def start(self, start_with_nothing: bool = False):
        """A new utterance: the state after ``<s>`` (the previous utterance's are dropped)."""
        self._histories.clear()
        self._pending.clear()
        root = FlashlightLMState()
        self.frame = 0
        begun = _History(None, -1, 0, self._incremental.begin())
        begun.used = True  # computed with the model: no call, not counted
        self._histories[root] = begun
        return root

    def score(self, state, word_index: int):
        """``(state after the word, log10 p(words[word_index] | state's history))``."""
        history = self._histories[state]
        lm = self._lm(history)
        token_id = int(self._token_ids[word_index])
        child = state.child(word_index)
        if child not in self._histories:
            pending = _History(history, token_id, self.frame)
            self._histories[child] = pending
            self._pending.append(pending)
        self.stats.scored += 1
        return child, float(lm.logprobs[token_id]) * LOG10_E

    def finish(self, state):
        """``(state, log10 p(</s> | state's history))``."""
        return state, float(self._lm(self._histories[state]).logprobs[EOS_ID]) * LOG10_E

    # ---- states -----------------------------------------------------------------------------

    def _lm(self, history: _History) -> LMState:
        if not history.used:
            history.used = True
            self.stats.used += 1
        if history.lm is None:
            if self.batch_frames is None:
                self._compute([history])
            else:  # the pending children of the last batch_frames frames, this one with them
                oldest = self.frame - self.batch_frames
                self._pending = [h for h in self._pending if h.lm is None and h.frame >= oldest]
                self._compute([history] + [h for h in self._pending if h is not history])
                self._pending = []
        return history.lm

    def _compute(self, histories: list[_History]) -> None:
        """Step every history from its (computed) parent: one onnxruntime call per
        ``max_rows`` of them."""
        step = self._incremental.max_rows
        for start in range(0, len(histories), step):
            part = histories[start:start + step]
            ids = np.array([h.token_id for h in part], dtype=np.int64)
            _, states = self._incremental.step_ids([h.parent.lm for h in part], ids)
            for history, lm in zip(part, states):
                history.lm = lm
            self.stats.calls += 1
            self.stats.computed += len(part)

    def __repr__(self) -> str:
        return (f"LmonnxFlashlightLM({self.scorer!r}, words={len(self.words)}, "
                f"batch_frames={self.batch_frames})")


def spell(word: str, tokens: Sequence[str], sil_token: str) -> list[int] | None:
    """The token indices of ``word``'s characters then ``sil_token`` (a word ends at a word
    boundary, as torchaudio's lexicons spell words); None when a character has no token."""
    index = {t: i for i, t in enumerate(tokens)}
    spelling = [index.get(char) for char in word] + [index.get(sil_token)]
    return None if None in spelling else spelling


class LexiconCTCDecoder:
    """flashlight-text's ``LexiconDecoder`` over ``tokens`` (the emission columns, characters)
    with an lmonnx word LM, built as torchaudio's ``ctc_decoder`` built it: each word spelled
    by its characters then ``sil_token``; the trie scored by the LM's unigram log10
    probability after ``<s>`` and smeared by max.

    ``words``: the lexicon (default: every vocabulary word the tokens can spell).
    ``unknown``, ``case_fold``, ``batch_frames``: :class:`LmonnxFlashlightLM`'s, when the LM is
    made here from a Scorer or a path.
    ``lm``: an :class:`LmonnxFlashlightLM` (or any flashlight ``LM``, e.g. its ``KenLM``, whose
    word indices are ``words``'), a Scorer or a model path to make one, or None: no LM (the
    lexicon-constrained search alone).  The other arguments are flashlight's
    ``LexiconDecoderOptions``: ``lm_weight`` (per log10 unit), ``word_score`` (per word),
    ``sil_score``, ``unk_score`` (-inf: no unknown words), ``beam_size``, ``beam_size_token``
    (default: every token), ``beam_threshold``.
    """

    def __init__(self, tokens: Sequence[str], lm=None, *, words: Sequence[str] | None = None,
                 blank_token: str = "", sil_token: str = " ", beam_size: int = 32,
                 beam_size_token: int | None = None, beam_threshold: float = 50.0,
                 lm_weight: float = 2.0, word_score: float = 0.0, sil_score: float = 0.0,
                 unk_score: float = -math.inf, case_fold: bool = False,
                 unknown: str = "error", batch_frames: int | None = DEFAULT_BATCH_FRAMES,
                 num_threads: int | None = None):
        _require_flashlight()
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise ArgumentTypeError("tokens must be a list of str, one per emission column")
        self.tokens = list(tokens)
        for name, token in (("blank_token", blank_token), ("sil_token", sil_token)):
            if token not in self.tokens:
                raise InvalidArgumentError(f"{name} {token!r} is not one of the tokens")
        if lm is not None and not isinstance(lm, _FlashlightLM):  # a Scorer or a model path
            scorer, _ = open_scorer(lm, "cpu", num_threads)
            if words is None:
                words = self.spellable(scorer.vocab.tokens, sil_token, case_fold, self.tokens)
            lm = LmonnxFlashlightLM(scorer, words, unknown=unknown, case_fold=case_fold,
                                    batch_frames=batch_frames)
        if words is None:
            if lm is None:
                raise InvalidArgumentError("without a language model, pass words (the lexicon)")
            words = getattr(lm, "words", None)
            if words is None:
                raise InvalidArgumentError("pass words: the lexicon, in the LM's word order")
        self.words = list(words)
        if not self.words:
            raise InvalidArgumentError("the lexicon is empty: no vocabulary word can be spelled "
                                       "with the tokens (or words was empty)")
        self.lm = lm
        spellings = [spell(w.lower() if case_fold else w, self.tokens, sil_token)
                     for w in self.words]
        bad = [w for w, s in zip(self.words, spellings) if s is None]
        if bad:
            raise InvalidArgumentError(f"{len(bad)} lexicon word(s) cannot be spelled with the "
                                       f"tokens, e.g. {bad[0]!r}")
        self.options = LexiconDecoderOptions(
            beam_size=check_int("beam_size", beam_size),
            beam_size_token=check_int("beam_size_token", beam_size_token or len(self.tokens)),
            beam_threshold=check_real("beam_threshold", beam_threshold),
            lm_weight=check_real("lm_weight", lm_weight),
            word_score=check_real("word_score", word_score),
            unk_score=float(unk_score), sil_score=check_real("sil_score", sil_score),
            log_add=False, criterion_type=CriterionType.CTC)
        search_lm = lm if lm is not None else _unigram_free_lm()
        start = search_lm.start(False)
        trie = Trie(len(self.tokens), self.tokens.index(sil_token))
        for index, spelling in enumerate(spellings):
            _, unigram = search_lm.score(start, index)
            trie.insert(spelling, index, unigram)
        trie.smear(SmearingMode.MAX)
        self._trie = trie  # the decoder holds a reference only on the C++ side
        self._decoder = LexiconDecoder(self.options, trie, search_lm,
                                       self.tokens.index(sil_token),
                                       self.tokens.index(blank_token), -1, [], False)
        self._search_lm = search_lm

    @staticmethod
    def spellable(vocabulary: Sequence[str], sil_token: str, case_fold: bool = False,
                  tokens: Sequence[str] | None = None) -> list[str]:
        """The vocabulary's words (specials excluded) whose characters are all tokens."""
        words = list(decoder_word_ids(vocabulary, case_fold))
        if tokens is None:
            return words
        return [w for w in words if spell(w, tokens, sil_token) is not None]

    def decode(self, log_probs: np.ndarray) -> list[str]:
        """The best hypothesis's words for one utterance: ``log_probs`` float32 [frames,
        len(tokens)], per-frame log-posteriors (a CTC model's log-softmax)."""
        emissions = np.ascontiguousarray(log_probs, dtype=np.float32)
        if emissions.ndim != 2 or emissions.shape[1] != len(self.tokens):
            raise InvalidArgumentError(f"log_probs must be [frames, {len(self.tokens)}], "
                                       f"got shape {emissions.shape}")
        if not np.isfinite(emissions).all():
            raise InvalidArgumentError("log_probs must be finite")
        frames, width = emissions.shape
        decoder, lm = self._decoder, self.lm
        if not isinstance(lm, LmonnxFlashlightLM):
            best = decoder.decode(emissions.ctypes.data, frames, width)[0]
        else:  # a frame per step, so that the LM knows which pending children are recent
            decoder.decode_begin()
            row_bytes = emissions.strides[0]
            for frame in range(frames):
                lm.frame = frame
                decoder.decode_step(emissions.ctypes.data + frame * row_bytes, 1, width)
            decoder.decode_end()
            best = decoder.get_all_final_hypothesis()[0]
        return [self.words[i] for i in best.words if i >= 0]


def _unigram_free_lm():
    """flashlight's ``ZeroLM``: every word scores 0 (the no-LM row)."""
    from flashlight.lib.text.decoder import ZeroLM

    return ZeroLM()


__all__ = ["LmonnxFlashlightLM", "LexiconCTCDecoder", "DecodingStats", "LOG10_E", "spell",
           "DEFAULT_BATCH_FRAMES"]
