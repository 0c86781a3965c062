"""``Scorer``: the embeddable scoring API, modelled on kenlm's ``Model``.

    scorer = lmonnx.Scorer("model.onnx")
    scorer.score(["the cat sat", "cat the sat"])   # one SentenceScore per sentence
    scorer.perplexity("the cat sat")
    scorer.full_scores("the cat sat")              # per token, </s> included
    scorer.predict_next("the cat", k=5)            # [(word, probability), ...]
    scorer.evaluate("test.txt")                    # the same report as `lmonnx evaluate`

    state = scorer.begin()                         # incremental scoring (format-2 models)
    logprob, state = scorer.step(state, "cat")     # log p(cat | <s>), the state after it
    logprobs, states = scorer.step_batch(states, words)   # one onnxruntime call for all
    scorer.generate("the cat", words=10, seed=0)   # sampling by stepping the state

Log-probabilities are natural logs (nats); ``</s>`` is scored, ``<s>`` is not.  No TensorFlow.
Thread-safe: onnxruntime sessions and the kernel are reentrant, and a ``Scorer`` keeps no
mutable state after construction.  A sentence's score does not depend on the other sentences
in its batch (right padding + a causal LSTM + the kernel's mask), nor on the entry point: every
method reads text through ``lmonnx.corpus`` and builds examples with ``lmonnx.examples``, as
the CLI does.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from lmonnx.errors import ArgumentTypeError
from lmonnx.validation import check_int
from lmonnx.atomic import check_output, output_file
from lmonnx.corpus import read_sentences, sentences_of_lines, to_line
from lmonnx.evaluate import (DEFAULT_BATCH_SIZE, EvaluationReport, Evaluator, SentenceWriter,
                             TokenScore, TokenWriter, token_scores)
from lmonnx.examples import ExampleBuilder
from lmonnx.incremental import Incremental, LMState
from lmonnx.metrics import default_max_tokens, perplexity_of
from lmonnx.runtime import ModelSession
from lmonnx.vocab import BOS_ID, PAD_ID


@dataclass(frozen=True)
class SentenceScore:
    """``logprob``: natural-log probability of the sentence, ``</s>`` included (nats, <= 0)."""

    logprob: float
    tokens: int
    oovs: int

    @property
    def perplexity(self) -> float:
        return perplexity_of(-self.logprob, self.tokens)


def _check_sentence(sentence, what="sentence"):
    if not isinstance(sentence, (str, bytes)):
        raise ArgumentTypeError(f"{what} must be str (or UTF-8 bytes), got {type(sentence).__name__}")
    return sentence


class Scorer:
    """Score text with an lmonnx ``.onnx`` model in onnxruntime.

    Parameters: ``path`` of the model; ``providers`` "auto" | "cpu" | "cuda"; ``num_threads``
    for onnxruntime's intra-op pool (None: one per core); ``batch_size`` and ``max_tokens`` bound
    the batches of ``score`` and ``evaluate`` (``max_tokens=None``: a batch's logits stay
    under 64 MiB).  Every argument is checked here, not at the first call.
    """

    def __init__(self, path, providers: str = "auto", num_threads: int | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = None):
        if num_threads is not None:
            num_threads = check_int("num_threads", num_threads)
        self.batch_size = check_int("batch_size", batch_size)
        self.max_tokens = None if max_tokens is None else check_int("max_tokens",
                                                                             max_tokens)
        self._session = ModelSession(path, providers=providers, num_threads=num_threads)
        self._num_threads = num_threads
        self._examples = ExampleBuilder(self._session.vocab)
        self._lock = threading.Lock()
        self._logits_session = None if self._session.loss_head else self._session
        self._incremental_scorer = None

    def _logits(self) -> ModelSession:
        """A session that returns logits.  On CUDA the main session carries the loss head
        (scores only), and next-word distributions need the logits: a second session, made
        on first use."""
        with self._lock:
            if self._logits_session is None:
                s = self._session
                self._logits_session = ModelSession(
                    s.source, providers=s.provider_choice, num_threads=self._num_threads,
                    name=s.name, loss_head=False)
            return self._logits_session

    @property
    def _incremental(self) -> Incremental:
        if self._incremental_scorer is None:
            self._incremental_scorer = Incremental(self._logits())
        return self._incremental_scorer

    @property
    def vocab(self):
        return self._session.vocab

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider actually in use."""
        return self._session.provider

    @property
    def config(self) -> dict:
        return dict(self._session.metadata.config)

    @property
    def training(self) -> dict:
        return dict(self._session.metadata.training)

    def _window(self) -> int:
        """Positions per onnxruntime call for one long history (the batch budget)."""
        return self.max_tokens or default_max_tokens(len(self.vocab))

    def _evaluator(self, corpus: str = "<lines>", *, keep_tokens: bool = False,
                   writers=()) -> Evaluator:
        return Evaluator(self._session, corpus=corpus, batch_size=self.batch_size,
                         max_tokens=self.max_tokens, num_threads=self._num_threads,
                         keep_tokens=keep_tokens, writers=writers)

    def _sentence_examples(self, sentences: Iterable):
        if isinstance(sentences, (str, bytes)):
            raise ArgumentTypeError("score() takes a list of sentences; for one sentence use "
                            "score([sentence])[0] or perplexity(sentence)")
        for i, s in enumerate(sentences):
            yield self._examples.build(to_line(i, _check_sentence(s), "strict",
                                               f"sentence {i + 1}"))

    def score(self, sentences: Iterable) -> list[SentenceScore]:
        """One ``SentenceScore`` per sentence (``str`` or UTF-8 ``bytes``), in order.

        A sentence is cleaned as a corpus line is (surrounding whitespace and a leading
        byte-order mark removed); an empty sentence scores ``</s>`` alone.
        """
        return [SentenceScore(logprob=r.logprob, tokens=r.tokens, oovs=r.oovs)
                for _, r in self._evaluator().scored(self._sentence_examples(sentences))]

    def perplexity(self, sentence) -> float:
        """exp(-logprob / tokens) of one sentence, ``</s>`` counted."""
        return self.score([_check_sentence(sentence)])[0].perplexity

    def full_scores(self, sentence) -> list[TokenScore]:
        """Per-token scores of one sentence, like kenlm's ``full_scores``: words, then ``</s>``."""
        (example, result), = self._evaluator(keep_tokens=True).scored(
            self._sentence_examples([_check_sentence(sentence)]))
        return token_scores(example, result)

    def predict_next(self, prefix, k: int = 5) -> list[tuple[str, float]]:
        """Top-``k`` (word, probability) after ``prefix``: the softmax at its last position.

        The course's ``get_word_predictions`` for one sequence.  ``</s>`` means the sentence
        ends there; padding and ``<s>`` are never listed (they are never targets).  The
        probabilities are the model's full softmax, not renormalised over what is listed, so
        a word's probability here is ``exp`` of its ``logprob`` when scored after ``prefix``.
        """
        k = check_int("k", k)
        (example,) = self._sentence_examples([_check_sentence(prefix, "prefix")])
        # <s> w1 .. wn: the last position predicts the next word.  A stateful model runs a
        # long prefix in windows and keeps only the last distribution.
        session = self._logits()
        if session.stateful:
            state = self._incremental.state_after(example.inputs, self._window())
            logits = state.logprobs.astype(np.float64)
        else:
            logits = session.logits(example.inputs[None, :])[0, -1].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        listed = probs.copy()
        listed[[PAD_ID, BOS_ID]] = -1.0  # below every probability: never in the top k
        k = min(k, len(probs) - 2)
        top = np.argsort(-listed, kind="stable")[:k]
        return [(self.vocab.id_to_token(int(i)), float(probs[i])) for i in top]

    def evaluate(self, source, *, corpus: str | None = None, errors: str = "strict",
                 per_sentence=None, per_token=None, force: bool = False) -> EvaluationReport:
        """Evaluate a corpus as ``lmonnx evaluate`` does: same lines, same numbers.

        ``source``: a path (``"-"``: stdin), or an iterable of lines (``str`` or ``bytes``;
        a text file object works, but Python's text mode also splits at a lone ``\\r``, so
        pass the path for the CLI's exact line splitting).  Blank lines are skipped, line
        numbers count them.  ``errors``: "strict" or "replace" for undecodable UTF-8.
        ``per_sentence`` / ``per_token``: a path (written atomically; an existing file needs
        ``force``) or an open text file, receiving the CLI's JSON lines.
        """
        if isinstance(source, (str, os.PathLike)):
            lines = read_sentences(source, errors)
            corpus = corpus if corpus is not None else os.fspath(source)
        else:
            lines = sentences_of_lines(source, errors)
            corpus = corpus if corpus is not None else "<lines>"
        with contextlib.ExitStack() as stack:
            writers = []
            for flag, target, kind in (("per_sentence", per_sentence, SentenceWriter),
                                       ("per_token", per_token, TokenWriter)):
                if target is None:
                    continue
                if not hasattr(target, "write"):
                    check_output(target, flag, force=force)
                    target = stack.enter_context(output_file(target, flag))
                writers.append(kind(target))
            evaluator = self._evaluator(corpus, writers=writers)
            return evaluator.run(self._examples.build_all(lines))

    # ---- incremental scoring (format 2): KenLM's State / BaseScore for decoders ----------

    def begin(self) -> LMState:
        """The state after ``<s>``: an immutable value, cheap to keep and share."""
        return self._incremental.begin()

    def step(self, state: LMState, word: str) -> tuple[float, LMState]:
        """``(log p(word | history) in nats, the state after word)``: one onnxruntime call.

        ``"</s>"`` scores the end of the sentence (no call; the state is then ended); an OOV
        word scores as ``<unk>``.  Stepping a sentence word by word gives ``full_scores``."""
        return self._incremental.step(state, word)

    def step_batch(self, states, words) -> tuple[np.ndarray, list[LMState]]:
        """Advance hypothesis i by ``words[i]`` in ONE onnxruntime call: ``(logprobs float64
        [n] in nats, new states)``.  States of any history and length mix freely."""
        return self._incremental.step_batch(states, words)

    def next_logprobs(self, states) -> np.ndarray:
        """float32 [n, vocab]: the next-token log-probabilities of each state (by token id;
        ``scorer.vocab.token_to_id(word)`` indexes a word)."""
        return self._incremental.next_logprobs(states)

    def generate(self, prefix: str = "", *, words: int = 20, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> list[str]:
        """Sample up to ``words`` words after ``prefix`` (``"</s>"`` last if the model ended
        the sentence).  ``temperature=0`` is greedy; a ``seed`` makes it reproducible."""
        return self._incremental.generate(prefix, words=words, temperature=temperature,
                                          top_k=top_k, seed=seed, window=self._window())

    def __repr__(self) -> str:
        return (f"Scorer({self._session.name!r}, provider={self.provider!r}, "
                f"vocab_size={len(self.vocab)})")


__all__ = ["Scorer", "SentenceScore", "TokenScore", "LMState"]
