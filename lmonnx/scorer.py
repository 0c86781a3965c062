"""``Scorer``: the embeddable scoring API, modelled on kenlm's ``Model``.

    scorer = lmonnx.Scorer("model.onnx")
    scorer.score(["the cat sat", "cat the sat"])   # one SentenceScore per sentence
    scorer.perplexity("the cat sat")
    scorer.full_scores("the cat sat")              # per token, </s> included
    scorer.predict_next("the cat", k=5)            # [(word, probability), ...]
    scorer.evaluate("test.txt")                    # the same report as `lmonnx evaluate`

    state = scorer.begin()                         # incremental scoring
    logprob, state = scorer.step(state, "cat")     # log p(cat | <s>), the state after it
    logprob, state = scorer.end(state)             # log p(</s> | <s> cat), the state ended
    logprobs, states = scorer.step_batch(states, words)   # one onnxruntime call for all
    scorer.generate("the cat", words=10, seed=0)   # sampling by stepping the state

Log-probabilities are natural logs (nats); ``</s>`` is scored, ``<s>`` is not.  No TensorFlow.
Thread-safe: onnxruntime sessions and the kernel are reentrant; a ``Scorer`` builds its
scoring session at construction and what incremental scoring needs once, on first use, under
a lock; nothing changes after that.  A sentence's score does not depend on the other sentences
in its batch (right padding + a causal LSTM + the kernel's mask), nor on the entry point: every
method reads text through ``lmonnx.corpus`` and builds examples with ``lmonnx.examples``, as
the CLI does.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from lmonnx.batching import pad_batch
from lmonnx.corpus import STDIN, check_corpora, require_sentences, sentences_of_lines, to_line
from lmonnx.errors import ArgumentTypeError
from lmonnx.evaluate import (DEFAULT_BATCH_SIZE, EvaluationReport, Evaluator, SentenceResult,
                             TokenScore, WindowedRow, open_writers, token_scores)
from lmonnx.examples import Example, ExampleBuilder
from lmonnx.incremental import END, Incremental, LMState
from lmonnx.metrics import default_max_tokens, perplexity_of
from lmonnx.runtime import ModelSession
from lmonnx.validation import check_int, check_optional_int


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
    the batches of ``score`` and ``evaluate`` (``max_tokens=None``: a batch's logits -- a
    factored model's head and hidden states -- stay under 64 MiB; decoder steps, which return
    every word's log-probability, under 64 MiB of those).  Every argument is checked here, not at the first call, and everything is
    built here but what only incremental scoring and predictions need (the state after
    ``<s>``; on CUDA a second session that returns logits), which is built once, on first
    use, under a lock.
    """

    def __init__(self, path, providers: str = "auto", num_threads: int | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = None):
        self._num_threads = check_optional_int("num_threads", num_threads)
        self.batch_size = check_int("batch_size", batch_size)
        self.max_tokens = check_optional_int("max_tokens", max_tokens)
        self._session = ModelSession(path, providers=providers, num_threads=num_threads)
        self._examples = ExampleBuilder(self._session.vocab)
        self._lock = threading.Lock()
        self._incremental_scorer: Incremental | None = None

    @property
    def _incremental(self) -> Incremental:
        """Next-word distributions and states, built once on first use, under the lock.  On
        CUDA the scoring session carries the loss head (no logits): a second session."""
        if self._incremental_scorer is not None:  # built: no lock on a decoder's hot path
            return self._incremental_scorer
        with self._lock:
            if self._incremental_scorer is None:
                session = self._session
                if session.loss_head:
                    session = ModelSession(session.source, providers=session.provider_choice,
                                           num_threads=self._num_threads, name=session.name,
                                           loss_head=False)
                self._incremental_scorer = Incremental(session, max_rows=self.max_tokens)
            return self._incremental_scorer

    @property
    def incremental(self) -> Incremental:
        """The :class:`~lmonnx.incremental.Incremental` behind :meth:`begin`, :meth:`step`
        and :meth:`generate` (built on first use): for servers that check a request's words
        (``check_step``) apart from running them (``step_ids``)."""
        return self._incremental

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

    @property
    def window(self) -> int:
        """Positions per onnxruntime call (the batch budget): a longer sentence or history
        is run in windows that carry the LSTM state (:meth:`windowed`)."""
        return self.max_tokens or default_max_tokens(self._session.scored_width)

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

    def examples(self, sentences: Iterable) -> list[Example]:
        """The :class:`~lmonnx.examples.Example` of each sentence, as :meth:`score` reads
        them (checked and cleaned; a ``ValueError`` or ``TypeError`` names the bad one).
        With :meth:`score_examples`, a server tokenizes on its event loop and scores many
        callers' sentences in one batch."""
        return list(self._sentence_examples(sentences))

    def score_examples(self, examples: Iterable[Example], *, keep_tokens: bool = False,
                       batch_size: int | None = None) -> list[SentenceResult]:
        """Score examples in length-bucketed batches: one ``SentenceResult`` each, in order
        (``token_nll`` kept with ``keep_tokens``).  ``batch_size`` caps sentences per
        onnxruntime call (default: the scorer's).  A sentence's numbers do not depend on
        its batch-mates: the same bits as :meth:`score` on CPU."""
        evaluator = Evaluator(self._session, batch_size=batch_size or self.batch_size,
                              max_tokens=self.max_tokens, num_threads=self._num_threads,
                              keep_tokens=keep_tokens)
        return [result for _, result in evaluator.scored(examples)]

    def windowed(self, example: Example) -> WindowedRow:
        """``example`` as a :class:`~lmonnx.evaluate.WindowedRow`, scored :attr:`window`
        positions per ``step()``; for a sentence longer than one window its
        ``results(keep_tokens)[0]`` is :meth:`score_examples`' result to the last bit (the
        same windows, the same sums).  A server runs the steps as turns of its compute
        thread, so that one long sentence never holds the other callers."""
        batch = pad_batch([(example.inputs, example.targets)], [example.key])
        return WindowedRow(self._session, batch, self.window, self._num_threads)

    def score(self, sentences: Iterable) -> list[SentenceScore]:
        """One ``SentenceScore`` per sentence (``str`` or UTF-8 ``bytes``), in order.

        A sentence is cleaned as a corpus line is (surrounding whitespace and a leading
        byte-order mark removed); an empty sentence scores ``</s>`` alone.
        """
        return [SentenceScore(logprob=r.logprob, tokens=r.tokens, oovs=r.oovs)
                for r in self.score_examples(self._sentence_examples(sentences))]

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
        probabilities are the model's full softmax (``exp`` of the state's log-probabilities,
        not renormalised over what is listed), so a word's probability here is ``exp`` of its
        ``logprob`` when scored after ``prefix``.  A long prefix runs in windows.
        """
        k = check_int("k", k)
        (example,) = self._sentence_examples([_check_sentence(prefix, "prefix")])
        state = self._incremental.state_after(example.inputs, self.window)
        return [(self.vocab.id_to_token(i), float(np.exp(logprob)))
                for i, logprob in self._incremental.top_next(state, k)]

    def evaluate(self, source, *, corpus: str | None = None, errors: str = "strict",
                 per_sentence=None, per_token=None, force: bool = False,
                 progress: Callable[[int], None] | None = None) -> EvaluationReport:
        """Evaluate a corpus as ``lmonnx evaluate`` does: same lines, same numbers.

        ``source``: a path (``"-"``: stdin), or an iterable of lines (``str`` or ``bytes``;
        a text file object works, but Python's text mode also splits at a lone ``\\r``, so
        pass the path for the CLI's exact line splitting).  Blank lines are skipped, line
        numbers count them.  ``errors``: "strict" or "replace" for undecodable UTF-8.
        ``per_sentence`` / ``per_token``: a path or an open text file, receiving the CLI's
        JSON lines (see :meth:`evaluate_corpora`).  ``progress``: called with the bytes of
        each scored sentence.
        """
        if isinstance(source, (str, os.PathLike)):
            return self.evaluate_corpora(
                [source], errors=errors, per_sentence=per_sentence, per_token=per_token,
                force=force, progress=progress and (lambda _, nbytes: progress(nbytes)),
                names=None if corpus is None else [corpus])[0]
        lines = sentences_of_lines(source, errors)
        name = corpus if corpus is not None else "<lines>"
        with open_writers(per_sentence, per_token, inputs=self._model_paths(),
                          force=force) as writers:
            return self._evaluator(name, writers=writers).run(
                self._examples.build_all(lines), progress)

    def evaluate_corpora(self, paths: Sequence, *, errors: str = "strict", per_sentence=None,
                         per_token=None, force: bool = False,
                         progress: Callable[[int, int], None] | None = None,
                         on_report: Callable[[int, EvaluationReport], None] | None = None,
                         names: Sequence[str] | None = None,
                         flags: tuple[str, str] = ("per_sentence", "per_token"),
                         ) -> list[EvaluationReport]:
        """Evaluate files (``"-"``: stdin, once) in one run, as ``lmonnx evaluate a b`` does:
        one report each, in order.

        Every path is checked (exists, not a directory) and every output checked (not a
        corpus nor the model, not both one file, an existing regular file only with
        ``force``) before any scoring.  ``per_sentence`` / ``per_token``: paths, written
        atomically (replaced only when every corpus succeeded; a FIFO or ``/dev/stdout`` is
        written as results come), or open text files.  ``progress(i, nbytes)`` is called per
        scored sentence of corpus ``i``, ``on_report(i, report)`` when corpus ``i`` is done.
        ``names`` label the reports (default: the paths, ``<stdin>`` for ``-``); ``flags``
        name the outputs in errors.
        """
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise ArgumentTypeError("evaluate_corpora takes a list of paths")
        paths = list(paths)
        check_corpora(paths, errors)
        sources = [require_sentences(p, errors) for p in paths]
        names = list(names) if names is not None else [
            "<stdin>" if os.fspath(p) == STDIN else os.fspath(p) for p in paths]
        reports = []
        with open_writers(per_sentence, per_token, inputs=[*paths, *self._model_paths()],
                          force=force, flags=flags) as writers:
            for i, (name, lines) in enumerate(zip(names, sources)):
                report = self._evaluator(name, writers=writers).run(
                    self._examples.build_all(lines),
                    progress and (lambda nbytes, i=i: progress(i, nbytes)))
                reports.append(report)
                if on_report is not None:
                    on_report(i, report)
        return reports

    def _model_paths(self) -> list:
        return [] if self._session.path is None else [self._session.path]

    # ---- incremental scoring: KenLM's State / BaseScore for decoders -----------------------

    def begin(self) -> LMState:
        """The state after ``<s>``: an immutable value, cheap to keep and share."""
        return self._incremental.begin()

    def step(self, state: LMState, word) -> tuple[float, LMState]:
        """``(log p(word | history) in nats, the state after word)``: one onnxruntime call.

        ``word`` is tokenized as sentences are: an OOV word (a literal ``"</s>"`` too) scores
        as ``<unk>``.  :meth:`end` (or ``step(state, lmonnx.incremental.END)``) scores the end
        of the sentence.  Stepping a sentence word by word, then ``end``, gives
        ``full_scores``."""
        return self._incremental.step(state, word)

    def end(self, state: LMState) -> tuple[float, LMState]:
        """``(log p(</s> | history) in nats, the ended state)``; no onnxruntime call."""
        return self._incremental.step(state, END)

    def step_batch(self, states, words) -> tuple[np.ndarray, list[LMState]]:
        """Advance hypothesis i by ``words[i]`` (a word, or ``END``): ``(logprobs float64
        [n] in nats, new states)``.  States of any history and length mix freely; one
        onnxruntime call per ``max_tokens`` hypotheses (the batch budget)."""
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
                                          top_k=top_k, seed=seed, window=self.window)

    def __repr__(self) -> str:
        return (f"Scorer({self._session.name!r}, provider={self.provider!r}, "
                f"vocab_size={len(self.vocab)})")


def open_scorer(scorer_or_path, providers: str = "cpu", num_threads: int | None = None
                ) -> tuple[Scorer, dict | None]:
    """``(scorer, the settings to reopen it)`` for an adapter that takes either a
    :class:`Scorer` or a model path (opened with ``providers`` and ``num_threads``); the
    settings (``path``, ``providers``, ``num_threads``) are None for a Scorer opened from
    bytes, which cannot be reopened (pickled, saved)."""
    if isinstance(scorer_or_path, Scorer):
        session = scorer_or_path._session  # the path and options it was opened with
        if session.path is None:
            return scorer_or_path, None
        return scorer_or_path, dict(path=os.fspath(session.path),
                                    providers=session.provider_choice,
                                    num_threads=session.num_threads)
    if not isinstance(scorer_or_path, (str, os.PathLike)):
        raise ArgumentTypeError(f"scorer_or_path must be an lmonnx.Scorer or a model path, "
                                f"got {type(scorer_or_path).__name__}")
    scorer = Scorer(scorer_or_path, providers=providers, num_threads=num_threads)
    return scorer, dict(path=os.fspath(scorer_or_path), providers=providers,
                        num_threads=num_threads)


__all__ = ["Scorer", "SentenceScore", "TokenScore", "LMState", "END", "open_scorer"]
