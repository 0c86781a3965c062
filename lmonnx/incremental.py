"""Incremental scoring for decoders: the LM state after a history, advanced a word at a time.

KenLM's ``State`` / ``BaseScore`` for a neural LM (the LSTM state of a format-2 model)::

    state = begin()                          after <s>: h, c and log p(. | <s>)
    logprob, state = step(state, "the")      log p(the | <s>) read from the state; one
                                             onnxruntime call computes the next state
    logprob, state = step(state, END)        log p(</s> | ...): the sentence ends (no call)
    logprobs, states = step_batch(states, words)   n hypotheses, one onnxruntime call per
                                             max_rows of them (the logits budget)

A state holds the LSTM state (h, c: float32 [layers, units]) *and* the next-word
log-distribution, so the probability of a word is known before the model runs again: a beam
search or shallow fusion costs one batched call per step, not a re-score of every prefix.
States are immutable (read-only arrays) and cheap to keep: ``4 * (2 * layers * units + V)``
bytes each.  Words are tokenized as sentences are, so a literal ``"</s>"`` is a word (scored
as ``<unk>``, as ``Scorer.score`` scores it); the end of a sentence is :data:`END`.
Word-by-word probabilities (``END`` last) equal ``Scorer.full_scores``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lmonnx.corpus import to_line
from lmonnx.errors import ArgumentTypeError, InferenceError, InvalidArgumentError
from lmonnx.metrics import default_max_tokens
from lmonnx.runtime import ModelSession
from lmonnx.validation import check_int, check_optional_int, check_real
from lmonnx.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from lmonnx.windows import CarriedWindows


class _End:
    """The end of a sentence, for ``step`` / ``step_batch``: scores ``</s>``."""

    def __repr__(self) -> str:
        return "END"


END = _End()
"""Pass as a word to end a hypothesis: it scores ``</s>``.  A ``"</s>"`` string is a word."""
EOS_TEXT = "</s>"
"""What ``generate`` returns last when the model ended the sentence."""


def next_token_ids(vocab_size: int) -> np.ndarray:
    """int64 ids that can be a next token: every id but padding and ``<s>`` (never targets)."""
    ids = np.arange(vocab_size)
    return ids[(ids != PAD_ID) & (ids != BOS_ID)]


@dataclass(frozen=True, eq=False)
class LMState:
    """The model after ``<s>`` and ``words`` words.  ``logprobs``: float32 [V] natural-log
    probabilities of the next token (the full softmax, ``</s>`` included); ``ended``: the
    hypothesis scored ``</s>`` and cannot be advanced."""

    h: np.ndarray
    c: np.ndarray
    logprobs: np.ndarray
    words: int = 0
    ended: bool = False

    def __repr__(self) -> str:
        return (f"LMState(words={self.words}, ended={self.ended}, layers={self.h.shape[0]}, "
                f"units={self.h.shape[1]}, vocab={self.logprobs.shape[0]})")

    def logprob(self, token_id: int) -> float:
        """log p(token | history) in nats."""
        return float(self.logprobs[token_id])


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 [n, V] log-probabilities of float32 logits [n, V], max-shifted.  float32 is
    enough (NumPy sums pairwise: ~2e-6 nats from a float64 reference at V=10k) and 5x faster,
    which is most of a beam step's time outside onnxruntime."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def state_from_logits(h: np.ndarray, c: np.ndarray, logits: np.ndarray, words: int) -> LMState:
    """The state with LSTM state ``h``, ``c`` (float32 [layers, units]) whose next-word
    distribution is the log-softmax of ``logits`` (float32 [V]): the arithmetic of every
    state here, for callers that run the session themselves (the OpenAI routes)."""
    return LMState(_frozen(h), _frozen(c), _frozen(_log_softmax(logits[None])[0]), words)


class HistoryRun:
    """The state after a history, computed a window per :meth:`step`
    (:class:`~lmonnx.windows.CarriedWindows`); only the last position's logits are kept."""

    def __init__(self, session: ModelSession, input_ids: np.ndarray, window: int):
        if len(input_ids) == 0 or input_ids[0] != BOS_ID:
            raise InvalidArgumentError("a history starts with <s>")
        self.session, self.input_ids = session, input_ids
        self._windows = CarriedWindows(len(input_ids), window)
        self._last: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self._windows.done

    def step(self) -> None:
        """Run the next window (one onnxruntime call)."""
        _, self._last = self._windows.step(self._run)

    def _run(self, part: slice, state):
        logits, state = self.session.run(self.input_ids[None, part], state)
        return logits[0, -1], state

    def state(self) -> LMState:
        """The state after the whole history, once :attr:`done`."""
        if not self.done:
            raise RuntimeError(f"the history is run up to position {self._windows.start} of "
                               f"{len(self.input_ids)}")
        h, c = self._windows.state
        return state_from_logits(h[:, 0], c[:, 0], self._last, len(self.input_ids) - 1)


class Incremental:
    """Begin, step and sample hypotheses with one :class:`ModelSession` (that returns logits).

    ``max_rows``: hypotheses per onnxruntime call in ``step_batch`` (None: as many as keep
    their float32 logits under the batch budget, :func:`lmonnx.metrics.default_max_tokens`).
    Everything is computed at construction (the state after ``<s>`` included): an
    ``Incremental`` never changes afterwards, so threads may share it.
    """

    def __init__(self, session: ModelSession, max_rows: int | None = None):
        self.session = session
        self.vocab = session.vocab
        self.max_rows = check_optional_int("max_rows", max_rows) or default_max_tokens(
            len(self.vocab))
        self._candidates = next_token_ids(len(self.vocab))
        self._begin = self._states_after(np.array([BOS_ID]), None)[0]

    def _states_after(self, ids: np.ndarray, states: Sequence[LMState] | None) -> list[LMState]:
        """New states after feeding one token id per row: one onnxruntime call."""
        n = len(ids)
        if states is None:
            state = None
            words = [0] * n
        else:
            state = (np.stack([s.h for s in states], axis=1), np.stack([s.c for s in states], axis=1))
            words = [s.words + 1 for s in states]
        logits, (h, c) = self.session.run(np.asarray(ids, np.int32)[:, None], state)
        logprobs = _log_softmax(logits[:, 0, :])
        return [LMState(_frozen(h[:, i]), _frozen(c[:, i]), _frozen(logprobs[i]), words[i])
                for i in range(n)]

    def begin(self) -> LMState:
        """The state after ``<s>``: the start of every sentence (one value, shared)."""
        return self._begin

    def history_run(self, input_ids: np.ndarray, window: int) -> "HistoryRun":
        """The state after ``input_ids`` (int32 [n], ``<s>`` first), to be computed a window
        of at most ``window`` tokens per :meth:`HistoryRun.step` (a server runs each as a
        turn of its compute thread)."""
        return HistoryRun(self.session, input_ids, window)

    def state_after(self, input_ids: np.ndarray, window: int) -> LMState:
        """The state after ``input_ids`` (int32 [n], ``<s>`` first), run in windows of at
        most ``window`` tokens that carry the state: a long history costs memory for one
        window's logits, never for all of them."""
        run = self.history_run(input_ids, window)
        while not run.done:
            run.step()
        return run.state()

    def history_ids(self, prefix: str) -> np.ndarray | None:
        """int32 ``<s>`` and the ids of ``prefix``'s words, cleaned and tokenized as a
        sentence is (:func:`~lmonnx.corpus.to_line`: a BOM and surrounding whitespace
        dropped); None when it has no words (its state is :meth:`begin`'s)."""
        if not isinstance(prefix, str):
            raise ArgumentTypeError(f"prefix must be a str, got {type(prefix).__name__}")
        text = to_line(0, prefix, where="prefix").text
        ids = self.vocab.encode_words(self.vocab.words(text))
        if not len(ids):
            return None
        return np.concatenate([[BOS_ID], ids]).astype(np.int32)

    def state_after_text(self, prefix: str, window: int) -> LMState:
        """The state after ``<s>`` and the words of ``prefix`` (cleaned and tokenized as a
        sentence: :meth:`history_ids`)."""
        ids = self.history_ids(prefix)
        return self._begin if ids is None else self.state_after(ids, window)

    def word_id(self, word) -> int:
        """The id a word is scored as: :data:`END` is ``</s>``; a word is tokenized as
        sentences are and must be exactly one word (an OOV word, ``"</s>"`` included, is
        ``<unk>``)."""
        if word is END:
            return EOS_ID
        if not isinstance(word, str):
            raise ArgumentTypeError(f"a word must be a str (or END), got {type(word).__name__}")
        words = self.vocab.words(word)
        if len(words) != 1:
            raise InvalidArgumentError(f"step takes one word; the tokenizer makes {len(words)} of {word!r}")
        return int(self.vocab.encode_words(words)[0])

    def _check_states(self, states) -> list[LMState]:
        states = list(states)
        shape = (self.session.num_layers, self.session.num_units)
        for i, s in enumerate(states):
            if not isinstance(s, LMState):
                raise ArgumentTypeError(f"state {i} is a {type(s).__name__}, not an LMState from begin()/step()")
            if s.h.shape != shape or s.logprobs.shape != (len(self.vocab),):
                raise InvalidArgumentError(f"state {i} comes from another model (shape {s.h.shape}, "
                                 f"{s.logprobs.shape[0]} tokens)")
        return states

    def check_step(self, states, words) -> tuple[list[LMState], np.ndarray]:
        """``(states, token ids int64 [n])`` of a step, checked: ``ValueError`` /
        ``TypeError`` for a foreign or ended state, a word that is not one word, or counts
        that differ.  :meth:`step_ids` runs what this returns."""
        if isinstance(words, str):
            raise ArgumentTypeError("step_batch takes a list of words, one per state")
        states, words = self._check_states(states), list(words)
        if len(words) != len(states):
            raise InvalidArgumentError(f"got {len(states)} states and {len(words)} words")
        for i, s in enumerate(states):
            if s.ended:
                raise InvalidArgumentError(f"hypothesis {i} already ended with </s>; it cannot be advanced")
        ids = np.empty(len(words), dtype=np.int64)
        for i, word in enumerate(words):
            try:
                ids[i] = self.word_id(word)
            except (InvalidArgumentError, ArgumentTypeError) as exc:
                raise type(exc)(f"word {i}: {exc}") from None
        return states, ids

    def step_batch(self, states: Sequence[LMState], words: Sequence):
        """Advance hypothesis i by ``words[i]`` (a word or :data:`END`): ``(logprobs,
        new_states)``.

        ``logprobs``: float64 [n], log p(words[i] | history i) in nats.  The hypotheses that
        do not end go through one onnxruntime call per ``max_rows`` of them; :data:`END`
        needs none (its state is ended).
        """
        return self.step_ids(*self.check_step(states, words))

    def step_ids(self, states: Sequence[LMState], ids: np.ndarray):
        """:meth:`step_batch` of checked states and token ids (:meth:`check_step`)."""
        logprobs = np.array([s.logprob(t) for s, t in zip(states, ids)], dtype=np.float64)
        new: list = [None] * len(states)
        for i in np.flatnonzero(ids == EOS_ID):  # ended here: no call, the state stays
            s = states[i]
            new[i] = LMState(s.h, s.c, s.logprobs, s.words + 1, ended=True)
        going_on = np.flatnonzero(ids != EOS_ID)
        for start in range(0, len(going_on), self.max_rows):
            rows = going_on[start:start + self.max_rows]
            for i, state in zip(rows, self._states_after(ids[rows], [states[i] for i in rows])):
                new[i] = state
        return logprobs, new

    def step(self, state: LMState, word) -> tuple[float, LMState]:
        """``(log p(word | history), state after word)``; one onnxruntime call (none for
        :data:`END`)."""
        logprobs, (new,) = self.step_batch([state], [word])
        return float(logprobs[0]), new

    def next_logprobs(self, states: Sequence[LMState]) -> np.ndarray:
        """float32 [n, V]: each state's next-token log-probabilities (index with token ids)."""
        if isinstance(states, LMState):
            raise ArgumentTypeError("next_logprobs takes a list of states; for one: next_logprobs([state])")
        states = self._check_states(states)
        if not states:
            return np.empty((0, len(self.vocab)), np.float32)
        return np.stack([s.logprobs for s in states])

    def top_next(self, state: LMState, k: int) -> list[tuple[int, float]]:
        """The ``k`` likeliest next tokens of ``state`` as ``(id, log-probability)``, best
        first; padding and ``<s>`` never (NaN log-probabilities rank last)."""
        scores = state.logprobs[self._candidates]
        order = np.argsort(-scores, kind="stable")[:k]  # NaN sorts last
        return [(int(self._candidates[i]), float(scores[i])) for i in order]

    def generate(self, prefix: str = "", *, words: int = 20, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 window: int = 4096) -> list[str]:
        """Sample up to ``words`` words after ``prefix`` by stepping the state.

        Stops early at ``</s>`` (then the last item is ``"</s>"``).  ``temperature`` 0 is
        greedy (argmax), and a tiny positive one acts as its limit (sampling among the tied
        maxima); ``top_k`` keeps the k most likely tokens; the same ``seed`` gives the same
        text.  Padding and ``<s>`` are never drawn.
        """
        words = check_int("words", words)
        temperature = check_real("temperature", temperature, low=0)
        top_k = check_optional_int("top_k", top_k)
        seed = check_optional_int("seed", seed, low=0)
        rng = np.random.default_rng(seed)
        state = self.state_after_text(prefix, window)
        out: list[str] = []
        for _ in range(words):
            token = self.draw(state.logprobs, temperature, top_k, rng)
            if token == EOS_ID:
                out.append(EOS_TEXT)
                break
            out.append(self.vocab.id_to_token(token))
            (state,) = self._states_after(np.array([token]), [state])
        return out

    def draw(self, logprobs: np.ndarray, temperature: float, top_k: int | None,
             rng: np.random.Generator) -> int:
        """One token id drawn from ``logprobs`` (float32 [V]) as :meth:`generate` draws:
        padding and ``<s>`` never; ``temperature`` 0 greedy; ``top_k`` the k likeliest."""
        scores = logprobs[self._candidates].astype(np.float64)
        if np.isnan(scores).any():
            raise InferenceError(f"{self.session.name}: the model's next-word distribution "
                                 "holds NaN; it cannot be sampled")
        if top_k is not None and top_k < scores.size:
            cut = np.partition(scores, -top_k)[-top_k]
            scores[scores < cut] = -np.inf
        if temperature == 0:
            return int(self._candidates[np.argmax(scores)])
        with np.errstate(over="ignore"):  # a tiny temperature: every non-maximum -> -inf
            scaled = (scores - scores.max()) / temperature
        p = np.exp(scaled)
        return int(self._candidates[rng.choice(scores.size, p=p / p.sum())])


__all__ = ["LMState", "Incremental", "HistoryRun", "END", "EOS_TEXT", "UNK_ID", "next_token_ids",
           "state_from_logits"]
