"""An lmonnx model as the word language model of pyctcdecode's CTC beam search.

pyctcdecode (kensho-technologies/pyctcdecode, interface of version 0.5.0) decodes a CTC
emission matrix [frames, labels] with a beam search that asks a word-level language model,
through ``pyctcdecode.language_model.AbstractLanguageModel``, for:

    order                          the n-gram order (its prune_history keeps one beam per
                                   distinct last order-1 words)
    get_start_state()              the state before the first word
    score(prev_state, word, is_last_word=False) -> (score, new_state)
    score_partial_token(partial)   a penalty for a word still being spelled

:class:`LmonnxLanguageModel` answers them with a :class:`~lmonnx.Scorer`::

    decoder = build_ctcdecoder(labels, "kjv.onnx", alpha=0.5, beta=1.5)
    text = decoder.decode(emissions)              # emissions: float [frames, len(labels)]

**Units.**  pyctcdecode's KenLM ``LanguageModel`` adds, per word, ``alpha * ln(10) * (log10
p(word | history) + unk_score_offset * [word unknown] + log10 p(</s> | history, word) *
[last word]) + beta`` to the beam's score: KenLM's log10 probabilities turned into natural logs
(pyctcdecode's ``LOG_BASE_CHANGE_FACTOR`` is ln 10), because the acoustic scores it adds them
to are natural-log CTC posteriors.  lmonnx's log-probabilities are natural logs already, so
:meth:`LmonnxLanguageModel.score` returns the same quantity::

    alpha * (ln p(word | history) + unk_score_offset * ln(10) * [word unknown]
             + ln p(</s> | history, word) * [last word]) + beta

``unk_score_offset`` keeps pyctcdecode's meaning and unit (log10, default -10, i.e. -23.03
nats before alpha), so one setting means the same for both models.  ``score_partial_token``
returns exactly what pyctcdecode's does (``unk_score_offset``, raw, not scaled by alpha nor
ln 10, for a partial word that starts no known word; scaled up by ``len / 6`` past 6
characters; else 0).

**Words.**  A decoder word is looked up exactly among the model's vocabulary tokens
(``case_fold=True``: case-insensitively, each lowercase form standing for the model's most
frequent spelling, its lowest id).  A word the model does not know scores as the model's
``<unk>`` plus ``unk_score_offset``, as a word outside KenLM's vocabulary scores as KenLM's
``<unk>`` plus the offset.  ``unigrams`` (optional: the decoder's vocabulary) restricts the
known words further, as pyctcdecode's ``unigrams`` do for KenLM: a word outside them gets the
offset too.  A unigram the model does not know is an error (``unknown="error"``, the default:
pyctcdecode would drop it from the known words with at most a warning, and the decoder would
then penalize it as unknown); ``unknown="unk"`` drops it so.  The empty
word, which pyctcdecode passes at the end of a beam that ended on a space, is no word here:
it scores ``</s>`` alone, without ``beta`` (KenLM would score it as an unknown word).

**Cost.**  A state is the tuple of token ids after ``<s>``; its lmonnx
:class:`~lmonnx.incremental.LMState` (LSTM state and next-word log-distribution) is computed
only when a word is scored after it, and kept in an LRU cache keyed by the id tuple, shared
by every beam and utterance.  So scoring ``n`` words after one prefix costs one onnxruntime
call in all (the prefix's step), and each word is a lookup; a prefix that no beam extends
costs nothing.  An LSTM conditions on the whole prefix, so ``order`` is reported as
:data:`UNBOUNDED_ORDER` by default: pyctcdecode's history pruning (on in ``decode()``) then
merges only beams with identical word histories.

**Processes.**  pyctcdecode keeps the language model in a class-level dict, so a fork pool
(``decode_batch(pool, ...)``) inherits it and never pickles it; spawn pools are refused by
pyctcdecode (it decodes sequentially).  Pickling (to ship the model elsewhere) carries the
model path and the settings, and the copy reopens the model.

**Saving.**  ``decoder.save_to_dir(path)`` (pyctcdecode's) writes the alphabet and, through
:meth:`LmonnxLanguageModel.save_to_dir`, a copy of the model with the LM's settings;
:func:`load_ctcdecoder` reads the directory back (pyctcdecode's ``load_from_dir`` knows only
KenLM).

pyctcdecode is optional; without it, using this module raises
:class:`~lmonnx.errors.MissingDependencyError`.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

from lmonnx.atomic import write_atomic
from lmonnx.errors import (ArgumentTypeError, ArtifactError, InvalidArgumentError,
                           MissingDependencyError, PathExistsError, PathNotFoundError)
from lmonnx.incremental import LMState
from lmonnx.scorer import open_scorer
from lmonnx.validation import check_bool, check_choice, check_int, check_real
from lmonnx.vocab import (EOS_ID, UNK_ID, UNKNOWN_WORD_POLICIES, decoder_word_ids,
                          unknown_decoder_words)

try:
    from pyctcdecode.alphabet import Alphabet, verify_alphabet_coverage
    from pyctcdecode.constants import (AVG_TOKEN_LEN, DEFAULT_ALPHA, DEFAULT_BETA,
                                       DEFAULT_UNK_LOGP_OFFSET)
    from pyctcdecode.decoder import BeamSearchDecoderCTC
    from pyctcdecode.language_model import AbstractLanguageModel
    _PYCTCDECODE_MISSING = False
except ImportError:  # the class below must still be definable; using it says what to install
    AbstractLanguageModel = object  # type: ignore[assignment,misc]
    AVG_TOKEN_LEN, DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_UNK_LOGP_OFFSET = 6, 0.5, 1.5, -10.0
    _PYCTCDECODE_MISSING = True

LN10 = math.log(10.0)
"""nats per log10 unit: pyctcdecode's ``LOG_BASE_CHANGE_FACTOR``."""

UNBOUNDED_ORDER = 1_000_000
"""The ``order`` reported for an LSTM (it conditions on the whole prefix): longer than any
utterance, so pyctcdecode's history pruning never merges beams whose histories differ."""

DEFAULT_CACHE_SIZE = 1024
"""LMStates kept (``4 * (2 * layers * units + V)`` bytes each: ~41 MB at V = 10k)."""

SAVED_MODEL = "model.onnx"
SAVED_SETTINGS = "lmonnx_language_model.json"
"""What :meth:`LmonnxLanguageModel.save_to_dir` writes (into pyctcdecode's
``language_model/`` directory of a saved decoder)."""
_SAVED_KEYS = {"alpha", "beta", "unk_score_offset", "unigrams", "unknown", "case_fold",
               "cache_size", "order"}

PYCTCDECODE_INSTALL = "pip install --no-deps pyctcdecode pygtrie"
# pyctcdecode 0.5.0 (the latest) declares numpy<2, which lmonnx's numpy>=2 excludes, so pip's
# resolver refuses it as a dependency; it runs on NumPy 2 (tests/test_ctc_decoding.py).


def _require_pyctcdecode() -> None:
    if _PYCTCDECODE_MISSING:
        raise MissingDependencyError(
            f"CTC decoding with an lmonnx model needs pyctcdecode: {PYCTCDECODE_INSTALL}")


@dataclass(frozen=True)
class CTCLMState:
    """pyctcdecode's LM state: ``ids``, the model's token ids of the words after ``<s>``
    (an unknown word is ``<unk>``).  ``LmonnxLanguageModel.lm_state(state)`` gives its
    lmonnx :class:`~lmonnx.incremental.LMState`."""

    ids: tuple[int, ...] = ()


class _StateCache:
    """LRU of LMStates keyed by id tuples; thread-safe (a ThreadPool passes pyctcdecode's
    checks and shares the model).  ``hits`` counts states found, ``steps`` onnxruntime
    steps taken."""

    def __init__(self, size: int):
        self.size = size
        self._states: OrderedDict[tuple, LMState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.steps = 0

    def get(self, ids: tuple, count: bool = False) -> LMState | None:
        with self._lock:
            state = self._states.get(ids)
            if state is not None:
                self._states.move_to_end(ids)
                self.hits += count
            return state

    def put(self, ids: tuple, state: LMState) -> None:
        with self._lock:
            self._states[ids] = state
            self._states.move_to_end(ids)
            self.steps += 1
            while len(self._states) > self.size:
                self._states.popitem(last=False)

    def __len__(self) -> int:
        return len(self._states)


def _check_unigrams(unigrams) -> tuple[str, ...] | None:
    if unigrams is None:
        return None
    if isinstance(unigrams, str) or not all(isinstance(u, str) for u in unigrams):
        raise ArgumentTypeError("unigrams must be a collection of str words, not a str")
    return tuple(unigrams)


def _known_words(word_ids: dict[str, int], unigrams, case_fold: bool,
                 unknown: str = "error") -> frozenset[str]:
    """The words scored without the unknown-word offset: the model's, or those of
    ``unigrams`` it knows (pyctcdecode keeps the unigrams KenLM knows); a unigram it does not
    know raises under ``unknown="error"``."""
    if unigrams is None:
        return frozenset(word_ids)
    unknown_decoder_words(unigrams, word_ids, case_fold, unknown)
    words = (u.lower() if case_fold else u for u in unigrams)
    return frozenset(w for w in words if w in word_ids)


def _prefixes(words: Collection[str]) -> frozenset[str]:
    """Every non-empty prefix of every word: pyctcdecode's unigram trie's ``has_node``."""
    return frozenset(w[:i] for w in words for i in range(1, len(w) + 1))


class LmonnxLanguageModel(AbstractLanguageModel):
    """pyctcdecode's ``AbstractLanguageModel`` over an lmonnx model (see the module's
    docstring for the score's units: nats, as pyctcdecode's KenLM wrapper returns).

    ``scorer_or_path``: a :class:`~lmonnx.Scorer` or the path of an ``.onnx`` model (opened
    with ``providers`` and ``num_threads``; CPU by default, since a decoder runs one
    hypothesis per onnxruntime call).  ``alpha``, ``beta``, ``unk_score_offset`` (log10
    units): pyctcdecode's, with its defaults.  ``unigrams``: the known words (default: the
    model's vocabulary).  ``unknown``: ``"error"`` (a unigram the model lacks raises) or
    ``"unk"`` (it is scored as ``<unk>`` plus the offset).  ``case_fold``: match decoder
    words to the model's tokens case-insensitively.  ``cache_size``: LMStates kept.
    ``order``: reported to pyctcdecode's history pruning (default: unbounded).
    """

    def __init__(self, scorer_or_path, *, alpha: float = DEFAULT_ALPHA,
                 beta: float = DEFAULT_BETA, unk_score_offset: float = DEFAULT_UNK_LOGP_OFFSET,
                 unigrams: Collection[str] | None = None, unknown: str = "error",
                 case_fold: bool = False, cache_size: int = DEFAULT_CACHE_SIZE,
                 order: int = UNBOUNDED_ORDER, providers: str = "cpu",
                 num_threads: int | None = None):
        _require_pyctcdecode()
        self.unknown = check_choice("unknown", unknown, UNKNOWN_WORD_POLICIES)
        self.alpha = check_real("alpha", alpha)
        self.beta = check_real("beta", beta)
        self.unk_score_offset = check_real("unk_score_offset", unk_score_offset)
        self.case_fold = check_bool("case_fold", case_fold)
        self._order = check_int("order", order)
        self._cache = _StateCache(check_int("cache_size", cache_size))
        self.scorer, self._reopen_settings = open_scorer(scorer_or_path, providers, num_threads)
        self._unigrams = _check_unigrams(unigrams)
        self._word_ids = decoder_word_ids(self.scorer.vocab.tokens, self.case_fold)
        self._known = _known_words(self._word_ids, self._unigrams, self.case_fold, unknown)
        self._known_prefixes = _prefixes(self._known)
        self._incremental = self.scorer.incremental
        self._begin = self._incremental.begin()

    # ---- pyctcdecode's interface --------------------------------------------------------

    @property
    def order(self) -> int:
        return self._order

    def get_start_state(self) -> CTCLMState:
        """The state after ``<s>`` (pyctcdecode's ``score_boundary=True``: always)."""
        return CTCLMState()

    def score_partial_token(self, partial_token: str) -> float:
        """pyctcdecode's partial-word penalty, raw (not scaled by alpha): ``unk_score_offset``
        if no known word starts with ``partial_token``, times ``len / 6`` past 6 characters;
        else 0."""
        penalty = 0.0 if partial_token in self._known_prefixes else self.unk_score_offset
        if len(partial_token) > AVG_TOKEN_LEN:
            penalty = penalty * len(partial_token) / AVG_TOKEN_LEN
        return penalty

    def score(self, prev_state: CTCLMState, word: str,
              is_last_word: bool = False) -> tuple[float, CTCLMState]:
        """``(alpha * (ln p(word | prev) [+ unk_score_offset * ln 10] [+ ln p(</s> | prev,
        word)]) + beta, the state after word)``: natural-log units, pyctcdecode's.  The new
        state is not computed until a word is scored after it."""
        if not isinstance(prev_state, CTCLMState):
            raise ArgumentTypeError(f"prev_state must be a CTCLMState from get_start_state() "
                                    f"or score(), got {type(prev_state).__name__}")
        if not word:  # the end of a beam that ended on a space: </s> alone, no word bonus
            end = self.lm_state(prev_state).logprob(EOS_ID) if is_last_word else 0.0
            return self.alpha * end, prev_state
        key = word.lower() if self.case_fold else word
        token_id = self._word_ids.get(key, UNK_ID)
        logprob = self.lm_state(prev_state).logprob(token_id)
        if key not in self._known:
            logprob += self.unk_score_offset * LN10
        new_state = CTCLMState(prev_state.ids + (token_id,))
        if is_last_word:  # the state returned stays open, as pyctcdecode's KenLM one does
            logprob += self.lm_state(new_state).logprob(EOS_ID)
        return self.alpha * logprob + self.beta, new_state

    def reset_params(self, **params) -> None:
        """Change ``alpha``, ``beta`` or ``unk_score_offset`` (what
        ``BeamSearchDecoderCTC.reset_params`` passes); cached states stay valid.
        ``score_boundary`` may only be True: an lmonnx model always starts at ``<s>``."""
        for name, value in params.items():
            if name in ("alpha", "beta", "unk_score_offset"):
                setattr(self, name, check_real(name, value))
            elif name == "score_boundary":
                if check_bool(name, value) is not True:
                    raise InvalidArgumentError("score_boundary=False is not supported: an "
                                               "lmonnx model always starts after <s>")
            else:
                raise InvalidArgumentError(f"unknown parameter {name!r}; expected alpha, beta, "
                                           "unk_score_offset or score_boundary")

    # ---- states ---------------------------------------------------------------------------

    def lm_state(self, state: CTCLMState) -> LMState:
        """The lmonnx state after ``<s>`` and ``state.ids``: from the cache, else stepped
        from its longest cached prefix (one onnxruntime call per missing word)."""
        ids = state.ids
        if not ids:
            return self._begin
        cached = self._cache.get(ids, count=True)
        if cached is not None:
            return cached
        known = len(ids) - 1
        while known > 0 and self._cache.get(ids[:known]) is None:
            known -= 1
        lm = self._cache.get(ids[:known]) if known else self._begin
        for end in range(known + 1, len(ids) + 1):
            _, (lm,) = self._incremental.step_ids([lm], np.array(ids[end - 1:end], np.int64))
            self._cache.put(ids[:end], lm)
        return lm

    def cache_info(self) -> dict:
        """``hits`` (states found), ``steps`` (onnxruntime calls), ``size``, ``max_size``."""
        return dict(hits=self._cache.hits, steps=self._cache.steps, size=len(self._cache),
                    max_size=self._cache.size)

    def word_id(self, word: str) -> int:
        """The token id ``word`` is scored as (``<unk>``'s for a word the model lacks)."""
        return self._word_ids.get(word.lower() if self.case_fold else word, UNK_ID)

    def is_known(self, word: str) -> bool:
        """False when ``word`` gets ``unk_score_offset`` (unknown to the model, or outside
        ``unigrams``)."""
        return (word.lower() if self.case_fold else word) in self._known

    # ---- saving with the decoder (pyctcdecode's save_to_dir) ---------------------------------

    def save_to_dir(self, filepath) -> None:
        """Write the model (:data:`SAVED_MODEL`, a copy of the file) and the settings
        (:data:`SAVED_SETTINGS`, JSON) into the directory ``filepath``: what pyctcdecode's
        ``BeamSearchDecoderCTC.save_to_dir`` calls; :func:`load_ctcdecoder` reads it back."""
        settings = self.__getstate__()  # refuses a Scorer opened from bytes
        directory = Path(filepath)
        for name in (SAVED_MODEL, SAVED_SETTINGS):
            if (directory / name).exists():
                raise PathExistsError(f"{directory / name} exists; save into a new directory")
        shutil.copyfile(settings.pop("path"), directory / SAVED_MODEL)
        for name in ("providers", "num_threads"):  # the machine's choice, not the model's
            settings.pop(name)
        settings["unigrams"] = None if self._unigrams is None else list(self._unigrams)
        write_atomic(directory / SAVED_SETTINGS, json.dumps(settings, indent=1) + "\n")

    @classmethod
    def load_from_dir(cls, filepath, *, providers: str = "cpu",
                      num_threads: int | None = None) -> "LmonnxLanguageModel":
        """The language model :meth:`save_to_dir` wrote into ``filepath``."""
        directory = Path(filepath)
        settings_path = directory / SAVED_SETTINGS
        if not settings_path.is_file():
            raise PathNotFoundError(f"{settings_path} not found: not a directory that "
                                    "LmonnxLanguageModel.save_to_dir wrote")
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{settings_path}: not lmonnx's settings JSON ({exc})") from None
        if not isinstance(settings, dict) or set(settings) - _SAVED_KEYS:
            raise ArtifactError(f"{settings_path}: unexpected settings; expected the keys "
                                f"{sorted(_SAVED_KEYS)}")
        return cls(directory / SAVED_MODEL, providers=providers, num_threads=num_threads,
                   **settings)

    # ---- pickling: the path and the settings; the copy reopens the model -----------------

    def __getstate__(self) -> dict:
        if self._reopen_settings is None:
            raise ArgumentTypeError("cannot pickle or save an LmonnxLanguageModel whose Scorer was "
                                    "opened from bytes: open the model from a file")
        return dict(self._reopen_settings, alpha=self.alpha, beta=self.beta,
                    unk_score_offset=self.unk_score_offset, unigrams=self._unigrams,
                    unknown=self.unknown, case_fold=self.case_fold,
                    cache_size=self._cache.size, order=self._order)

    def __setstate__(self, settings: dict) -> None:
        settings = dict(settings)
        self.__init__(settings.pop("path"), **settings)

    def __repr__(self) -> str:
        return (f"LmonnxLanguageModel({self.scorer!r}, alpha={self.alpha}, beta={self.beta}, "
                f"unk_score_offset={self.unk_score_offset}, known_words={len(self._known)})")


def load_ctcdecoder(filepath, *, providers: str = "cpu", num_threads: int | None = None):
    """The decoder that ``build_ctcdecoder(...).save_to_dir(filepath)`` saved: pyctcdecode's
    alphabet file and an :class:`LmonnxLanguageModel` (pyctcdecode's own ``load_from_dir``
    reads only a KenLM model)."""
    _require_pyctcdecode()
    directory = Path(filepath)
    alphabet_path = directory / BeamSearchDecoderCTC._ALPHABET_SERIALIZED_FILENAME
    if not alphabet_path.is_file():
        raise PathNotFoundError(f"{alphabet_path} not found: not a saved decoder directory")
    alphabet = Alphabet.loads(alphabet_path.read_text(encoding="utf-8"))
    language_model = LmonnxLanguageModel.load_from_dir(
        directory / BeamSearchDecoderCTC._LANGUAGE_MODEL_SERIALIZED_DIRECTORY,
        providers=providers, num_threads=num_threads)
    return BeamSearchDecoderCTC(alphabet, language_model)


def build_ctcdecoder(labels: Sequence[str], scorer_or_path, *, alpha: float = DEFAULT_ALPHA,
                     beta: float = DEFAULT_BETA,
                     unk_score_offset: float = DEFAULT_UNK_LOGP_OFFSET,
                     unigrams: Collection[str] | None = None, unknown: str = "error",
                     case_fold: bool = False, cache_size: int = DEFAULT_CACHE_SIZE,
                     order: int = UNBOUNDED_ORDER, providers: str = "cpu",
                     num_threads: int | None = None):
    """A pyctcdecode ``BeamSearchDecoderCTC`` for ``labels`` (as pyctcdecode's
    ``build_ctcdecoder`` takes them: ``""`` the blank, ``" "`` the word boundary) with an
    :class:`LmonnxLanguageModel` over ``scorer_or_path`` (the other arguments are its)."""
    _require_pyctcdecode()
    if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
        raise ArgumentTypeError("labels must be a list of str, one per emission column")
    language_model = LmonnxLanguageModel(
        scorer_or_path, alpha=alpha, beta=beta, unk_score_offset=unk_score_offset,
        unigrams=unigrams, unknown=unknown, case_fold=case_fold, cache_size=cache_size,
        order=order, providers=providers, num_threads=num_threads)
    alphabet = Alphabet.build_alphabet(list(labels))
    if language_model._known:  # logs a warning when the labels lack the words' characters
        verify_alphabet_coverage(alphabet, sorted(language_model._known))
    return BeamSearchDecoderCTC(alphabet, language_model)


__all__ = ["LmonnxLanguageModel", "CTCLMState", "build_ctcdecoder", "load_ctcdecoder", "LN10",
           "UNBOUNDED_ORDER", "DEFAULT_CACHE_SIZE"]
