"""``Scorer``: the embeddable scoring API, modelled on kenlm's ``Model``.

    scorer = lmonnx.Scorer("model.onnx")
    scorer.score(["the cat sat", "cat the sat"])   # one SentenceScore per sentence
    scorer.perplexity("the cat sat")
    scorer.full_scores("the cat sat")              # per token, </s> included
    scorer.predict_next("the cat", k=5)            # [(word, probability), ...]
    scorer.evaluate(open("test.txt"))              # the same report as `lmonnx evaluate`

Log-probabilities are natural logs (nats); ``</s>`` is scored, ``<s>`` is not.  No TensorFlow.
Thread-safe: onnxruntime sessions and the kernel are reentrant, and a ``Scorer`` keeps no
mutable state after construction.  A sentence's score does not depend on the other sentences
in its batch (right padding + a causal LSTM + the kernel's mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from lmonnx.evaluate import (DEFAULT_BATCH_SIZE, EvaluationReport, TokenScore,
                             evaluate_sentences, perplexity_of, score_sentences, token_scores)
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


def _check_text(sentence, what="sentence") -> str:
    if not isinstance(sentence, str):
        raise TypeError(f"{what} must be a str, got {type(sentence).__name__}")
    return sentence


class Scorer:
    """Score text with an lmonnx ``.onnx`` model in onnxruntime.

    Parameters: ``path`` of the model; ``providers`` "auto" | "cpu" | "cuda"; ``num_threads``
    for onnxruntime's intra-op pool (None: one per core); ``batch_size`` and ``max_tokens`` bound
    the batches of ``score`` and ``evaluate`` (``max_tokens=None``: a batch's logits stay
    under 64 MiB).
    """

    def __init__(self, path, providers: str = "auto", num_threads: int | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = None):
        self._session = ModelSession(path, providers=providers, num_threads=num_threads)
        self._num_threads = num_threads
        self.batch_size = batch_size
        self.max_tokens = max_tokens

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

    def _score(self, sentences: Iterable[str], keep_tokens: bool):
        keyed = ((i, _check_text(s)) for i, s in enumerate(sentences))
        return score_sentences(self._session, keyed, batch_size=self.batch_size,
                               max_tokens=self.max_tokens, keep_tokens=keep_tokens,
                               num_threads=self._num_threads)

    def score(self, sentences: Iterable[str]) -> list[SentenceScore]:
        """One ``SentenceScore`` per sentence, in order (an empty sentence scores ``</s>``)."""
        if isinstance(sentences, str):
            raise TypeError("score() takes a list of sentences; for one sentence use "
                            "score([sentence])[0] or perplexity(sentence)")
        return [SentenceScore(logprob=r.logprob, tokens=r.tokens, oovs=r.oovs)
                for _, _, r in self._score(sentences, keep_tokens=False)]

    def perplexity(self, sentence: str) -> float:
        """exp(-logprob / tokens) of one sentence, ``</s>`` counted."""
        return self.score([_check_text(sentence)])[0].perplexity

    def full_scores(self, sentence: str) -> list[TokenScore]:
        """Per-token scores of one sentence, like kenlm's ``full_scores``: words, then ``</s>``."""
        sentence = _check_text(sentence)
        (_, _, result), = self._score([sentence], keep_tokens=True)
        return token_scores(self.vocab, sentence, result)

    def predict_next(self, prefix: str, k: int = 5) -> list[tuple[str, float]]:
        """Top-``k`` (word, probability) after ``prefix``: the softmax at its last position.

        The course's ``get_word_predictions`` for one sequence.  ``</s>`` means the sentence
        ends there; padding and ``<s>`` are never predicted (they are never targets).
        """
        prefix = _check_text(prefix, "prefix")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        ids = np.concatenate([[BOS_ID], self.vocab.encode(prefix)]).astype(np.int32)
        logits = self._session.logits(ids[None, :])[0, -1].astype(np.float64)
        logits[[PAD_ID, BOS_ID]] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        k = min(k, len(probs) - 2)
        top = np.argsort(-probs, kind="stable")[:k]
        return [(self.vocab.id_to_token(int(i)), float(probs[i])) for i in top]

    def evaluate(self, lines: Iterable[str], *, corpus: str = "<lines>") -> EvaluationReport:
        """Evaluate lines as ``lmonnx evaluate`` does (blank lines are skipped)."""
        if isinstance(lines, str):
            raise TypeError("evaluate() takes an iterable of lines, not one str")
        keyed = ((n, line.strip(), len(line.rstrip("\r\n").encode("utf-8")) + 1)
                 for n, line in enumerate(lines, start=1) if line.strip())
        return evaluate_sentences(self._session, keyed, corpus=corpus,
                                  batch_size=self.batch_size, max_tokens=self.max_tokens,
                                  num_threads=self._num_threads)

    def __repr__(self) -> str:
        return (f"Scorer({str(self._session.path)!r}, provider={self.provider!r}, "
                f"vocab_size={len(self.vocab)})")


__all__ = ["Scorer", "SentenceScore", "TokenScore"]
