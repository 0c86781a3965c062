"""Incremental scoring for decoders: the LM state after a history, advanced a word at a time.

KenLM's ``State`` / ``BaseScore`` for a neural LM (format-2 models carry the LSTM state)::

    state = begin()                          after <s>: h, c and log p(. | <s>)
    logprob, state = step(state, "the")      log p(the | <s>) read from the state; one
                                             onnxruntime call computes the next state
    logprobs, states = step_batch(states, words)   n hypotheses, ONE onnxruntime call

A state holds the LSTM state (h, c: float32 [layers, units]) *and* the next-word
log-distribution, so the probability of a word is known before the model runs again: a beam
search or shallow fusion costs one batched call per step, not a re-score of every prefix.
States are immutable (read-only arrays) and cheap to keep: ``4 * (2 * layers * units + V)``
bytes each.  Word-by-word probabilities equal ``Scorer.full_scores`` (the same graph, the
state carried instead of recomputed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lmonnx.errors import ArgumentTypeError, InvalidArgumentError
from lmonnx.validation import check_int
from lmonnx.runtime import ModelSession
from lmonnx.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

END = "</s>"


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


class Incremental:
    """Begin, step and sample hypotheses with one stateful :class:`ModelSession`."""

    def __init__(self, session: ModelSession):
        self.session = session
        self.vocab = session.vocab
        self._begin: LMState | None = None

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
        """The state after ``<s>``: the start of every sentence."""
        if self._begin is None:
            self.session.require_state("incremental scoring (begin/step)")
            # two threads may both compute it; they get equal, immutable states
            self._begin = self._states_after(np.array([BOS_ID]), None)[0]
        return self._begin

    def state_after(self, input_ids: np.ndarray, window: int) -> LMState:
        """The state after ``input_ids`` (int32 [n], ``<s>`` first), run in windows of at
        most ``window`` tokens that carry the state: a long history costs memory for one
        window's logits, never for all of them."""
        self.session.require_state("a state after a history")
        state = None
        for start in range(0, len(input_ids), window):
            logits, state = self.session.run(input_ids[None, start:start + window], state)
        h, c = state
        last = _log_softmax(logits[:, -1, :])[0]
        return LMState(_frozen(h[:, 0]), _frozen(c[:, 0]), _frozen(last), len(input_ids) - 1)

    def word_id(self, word) -> int:
        """The id a word is scored as: ``</s>`` ends the sentence, an OOV word is ``<unk>``.

        ``word`` is tokenized as sentences are and must be exactly one word."""
        if not isinstance(word, str):
            raise ArgumentTypeError(f"a word must be a str, got {type(word).__name__}")
        if word == END:
            return EOS_ID
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

    def step_batch(self, states: Sequence[LMState], words: Sequence[str]):
        """Advance hypothesis i by ``words[i]``: ``(logprobs, new_states)``.

        ``logprobs``: float64 [n], log p(words[i] | history i) in nats.  All hypotheses that
        do not end go through ONE onnxruntime call; ``</s>`` needs none (its state is ended).
        """
        if isinstance(words, str):
            raise ArgumentTypeError("step_batch takes a list of words, one per state")
        states = self._check_states(states)
        words = list(words)
        if len(words) != len(states):
            raise InvalidArgumentError(f"got {len(states)} states and {len(words)} words")
        ids = np.array([self.word_id(w) for w in words], dtype=np.int64)
        for i, s in enumerate(states):
            if s.ended:
                raise InvalidArgumentError(f"hypothesis {i} already ended with </s>; it cannot be advanced")
        logprobs = np.array([s.logprob(t) for s, t in zip(states, ids)], dtype=np.float64)
        new: list[LMState | None] = [None] * len(states)
        going_on = [i for i, t in enumerate(ids) if t != EOS_ID]
        if going_on:
            advanced = self._states_after(ids[going_on], [states[i] for i in going_on])
            for i, state in zip(going_on, advanced):
                new[i] = state
        for i, t in enumerate(ids):
            if t == EOS_ID:
                s = states[i]
                new[i] = LMState(s.h, s.c, s.logprobs, s.words + 1, ended=True)
        return logprobs, new

    def step(self, state: LMState, word: str) -> tuple[float, LMState]:
        """``(log p(word | history), state after word)``; one onnxruntime call."""
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

    def generate(self, prefix: str = "", *, words: int = 20, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 window: int = 4096) -> list[str]:
        """Sample up to ``words`` words after ``prefix`` by stepping the state.

        Stops early at ``</s>`` (then the last item is ``"</s>"``).  ``temperature`` 0 is
        greedy (argmax); ``top_k`` keeps the k most likely tokens; the same ``seed`` gives the
        same text.  Padding and ``<s>`` are never drawn.
        """
        if not isinstance(prefix, str):
            raise ArgumentTypeError(f"prefix must be a str, got {type(prefix).__name__}")
        words = check_int("words", words)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
            raise ArgumentTypeError(f"temperature must be a number, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None:
            top_k = check_int("top_k", top_k)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ArgumentTypeError(f"seed must be a non-negative integer or None, got {type(seed).__name__}")
        if seed is not None and seed < 0:
            raise InvalidArgumentError(f"seed must be a non-negative integer or None, got {seed!r}")
        rng = np.random.default_rng(seed)
        ids = self.vocab.encode_words(self.vocab.words(prefix))
        state = (self.state_after(np.concatenate([[BOS_ID], ids]).astype(np.int32), window)
                 if len(ids) else self.begin())
        out: list[str] = []
        for _ in range(words):
            token = self._draw(state.logprobs, temperature, top_k, rng)
            if token == EOS_ID:
                out.append(END)
                break
            word = self.vocab.id_to_token(token)
            out.append(word)
            (state,) = self._states_after(np.array([token]), [state])
        return out

    @staticmethod
    def _draw(logprobs: np.ndarray, temperature: float, top_k: int | None,
              rng: np.random.Generator) -> int:
        scores = logprobs.astype(np.float64)
        scores[[PAD_ID, BOS_ID]] = -np.inf
        if top_k is not None and top_k < scores.size:
            cut = np.partition(scores, -top_k)[-top_k]
            scores[scores < cut] = -np.inf
        if temperature == 0:
            return int(np.argmax(scores))
        scores = scores / temperature
        p = np.exp(scores - scores.max())
        return int(rng.choice(scores.size, p=p / p.sum()))


__all__ = ["LMState", "Incremental", "END", "UNK_ID"]
