"""Corpus evaluation: onnxruntime logits + the lmonnx kernel, streamed, with KenLM-style accounting.

    lines --tokenize--> (inputs, targets) --bucket by length, token budget--> padded batches
          --onnxruntime--> logits [B, T, V] --kernel, one pass--> NLL and top-1 hit per position
          --sum per sentence (float64)--> per-sentence results, in corpus order --> totals

Accounting (as KenLM and SRILM report it): a sentence ``w1 .. wn`` scores n+1 tokens, ``</s>``
included, ``<s>`` never.  ``perplexity = exp(nll / tokens)``; ``perplexity_no_oov`` leaves OOV
targets out of both the sum and the count.  ``bits_per_byte`` divides the total NLL in bits by
the original UTF-8 bytes of the sentences (surrounding whitespace included, one byte for each
line break, which ``</s>`` predicts; blank lines are not sentences and not counted), so it compares models with different tokenizers.  Totals are float64 sums of
per-sentence float64 sums: they do not depend on batch size or order beyond float rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from lmonnx.batching import Batch, bucketed_batches, make_pair
from lmonnx.runtime import ModelSession
from lmonnx.vocab import UNK_ID
from lmonnx.xent import token_nll_and_hits

LN2 = math.log(2.0)


def perplexity_of(nll: float, tokens: int) -> float:
    """exp(nll / tokens), ``inf`` instead of an OverflowError for a diverged model."""
    mean = nll / tokens
    return math.exp(mean) if mean < 709.0 else math.inf
DEFAULT_BATCH_SIZE = 64
LOGITS_BUDGET_BYTES = 64 << 20
"""Default cap on one batch's float32 logits: keeps memory flat and the logits that onnxruntime
writes close to cache when the kernel reads them."""


def default_max_tokens(vocab_size: int) -> int:
    """Padded positions per batch so that its logits [B, T, V] fit LOGITS_BUDGET_BYTES."""
    return max(256, LOGITS_BUDGET_BYTES // (4 * vocab_size))


@dataclass
class SentenceResult:
    """Scores of one sentence.  ``logprob`` is the natural-log probability (nats, <= 0) of its
    ``tokens`` targets, ``</s>`` included; ``token_nll`` (float64 [tokens], nats) is kept only
    when asked for."""

    key: object
    tokens: int
    oovs: int
    logprob: float
    oov_nll: float
    hits: int
    oov_hits: int
    token_nll: np.ndarray | None = None
    target_ids: np.ndarray | None = None

    @property
    def nll(self) -> float:
        return -self.logprob

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.nll, self.tokens)


@dataclass(frozen=True)
class TokenScore:
    """One scored target: ``logprob`` in nats; ``word`` is the text as written (``</s>`` last)."""

    word: str
    id: int
    logprob: float
    is_oov: bool


def token_scores(vocab, text: str, result: SentenceResult) -> list[TokenScore]:
    """Per-token scores of a sentence scored with ``keep_tokens=True``, like kenlm's
    ``full_scores``: its words as the tokenizer splits them, then ``</s>``."""
    words = vocab.words(text) + ["</s>"]
    return [TokenScore(word=w, id=int(i), logprob=-float(n), is_oov=int(i) == UNK_ID)
            for w, i, n in zip(words, result.target_ids, result.token_nll)]


@dataclass
class EvaluationReport:
    """What ``lmonnx evaluate`` prints, for one corpus.  NLL in nats; bits where named."""

    corpus: str
    sentences: int
    tokens: int
    words: int
    oovs: int
    nll: float
    mean_nll: float
    perplexity: float
    perplexity_no_oov: float
    bits_per_token: float
    bits_per_byte: float
    top1_accuracy: float
    top1_accuracy_no_oov: float
    padding_fraction: float
    tokens_per_second: float
    seconds: float
    provider: str

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        rows = [
            ("corpus", self.corpus),
            ("sentences", f"{self.sentences:,}"),
            ("tokens (</s> included)", f"{self.tokens:,}"),
            ("words", f"{self.words:,}"),
            ("OOVs", f"{self.oovs:,} ({100.0 * self.oovs / max(self.tokens, 1):.2f}% of tokens)"),
            ("total NLL", f"{self.nll:,.4f} nats"),
            ("mean NLL", f"{self.mean_nll:.6f} nats/token"),
            ("perplexity", f"{self.perplexity:.4f}"),
            ("perplexity excl. OOVs", f"{self.perplexity_no_oov:.4f}"),
            ("bits per token", f"{self.bits_per_token:.6f}"),
            ("bits per byte", f"{self.bits_per_byte:.6f}"),
            ("top-1 accuracy", f"{100.0 * self.top1_accuracy:.2f}% "
                               f"({100.0 * self.top1_accuracy_no_oov:.2f}% excl. OOVs)"),
            ("padding", f"{100.0 * self.padding_fraction:.2f}% of computed positions"),
            ("speed", f"{self.tokens_per_second:,.0f} tokens/s ({self.seconds:.3f} s)"),
            ("provider", self.provider),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@dataclass
class _Totals:
    sentences: int = 0
    tokens: int = 0
    oovs: int = 0
    nll: float = 0.0
    oov_nll: float = 0.0
    hits: int = 0
    oov_hits: int = 0
    bytes: int = 0
    real_positions: int = 0
    computed_positions: int = 0

    def add(self, result: SentenceResult, nbytes: int) -> None:
        self.sentences += 1
        self.tokens += result.tokens
        self.oovs += result.oovs
        self.nll += result.nll
        self.oov_nll += result.oov_nll
        self.hits += result.hits
        self.oov_hits += result.oov_hits
        self.bytes += nbytes

    def report(self, corpus: str, seconds: float, provider: str) -> EvaluationReport:
        tokens = self.tokens
        in_vocab = tokens - self.oovs
        mean_nll = self.nll / tokens
        return EvaluationReport(
            corpus=corpus,
            sentences=self.sentences,
            tokens=tokens,
            words=tokens - self.sentences,
            oovs=self.oovs,
            nll=self.nll,
            mean_nll=mean_nll,
            perplexity=perplexity_of(self.nll, tokens),
            perplexity_no_oov=(perplexity_of(self.nll - self.oov_nll, in_vocab) if in_vocab
                               else math.nan),
            bits_per_token=mean_nll / LN2,
            bits_per_byte=self.nll / LN2 / self.bytes,
            top1_accuracy=self.hits / tokens,
            top1_accuracy_no_oov=(self.hits - self.oov_hits) / in_vocab if in_vocab else math.nan,
            padding_fraction=(1.0 - self.real_positions / self.computed_positions
                              if self.computed_positions else 0.0),
            tokens_per_second=tokens / seconds if seconds > 0 else math.inf,
            seconds=seconds,
            provider=provider,
        )


def score_batch(session: ModelSession, batch: Batch, *, keep_tokens: bool = False,
                num_threads: int | None = None) -> list[SentenceResult]:
    """Score one padded batch: one onnxruntime call, one kernel pass over its logits."""
    logits = session.logits(batch.inputs)
    nll, hits = token_nll_and_hits(logits, batch.targets, batch.mask, num_threads=num_threads)
    oov = (batch.targets == UNK_ID) & (batch.mask != 0)
    row_nll = nll.sum(axis=1)
    row_oov_nll = np.where(oov, nll, 0.0).sum(axis=1)
    row_hits = hits.sum(axis=1)
    row_oov_hits = (hits & oov).sum(axis=1)  # an <unk> target "predicted" by <unk>
    row_oovs = oov.sum(axis=1)
    results = []
    for r, key in enumerate(batch.keys):
        n = int(batch.lengths[r])
        results.append(SentenceResult(
            key=key, tokens=n, oovs=int(row_oovs[r]), logprob=-float(row_nll[r]),
            oov_nll=float(row_oov_nll[r]), hits=int(row_hits[r]),
            oov_hits=int(row_oov_hits[r]),
            token_nll=nll[r, :n].copy() if keep_tokens else None,
            target_ids=batch.targets[r, :n].copy() if keep_tokens else None))
    return results


def score_sentences(session: ModelSession, sentences: Iterable[tuple[object, str]], *,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = None,
                    keep_tokens: bool = False, num_threads: int | None = None,
                    totals: _Totals | None = None,
                    progress: Callable[[int], None] | None = None,
                    ) -> Iterator[tuple[object, str, SentenceResult]]:
    """Yield ``(key, text, result)`` for every ``(key, text)`` in input order, streaming.

    An item may also be ``(key, text, nbytes)``: the sentence's original UTF-8 bytes for bits
    per byte (default: ``text`` plus one byte for its line break).

    Sentences are bucketed by length within a bounded look-ahead, so memory stays bounded by
    the batch budget and the look-ahead, never by the corpus.  ``progress`` is called with the
    UTF-8 bytes of each scored sentence.  ``max_tokens=None`` picks ``default_max_tokens``.
    """
    if max_tokens is None:
        max_tokens = default_max_tokens(session.vocab_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max tokens must be a positive integer, got {max_tokens!r}")
    vocab = session.vocab
    pending: dict[int, tuple[object, str, int]] = {}
    ready: dict[int, SentenceResult] = {}
    next_out = 0

    def items():
        for seq, item in enumerate(sentences):
            key, text = item[0], item[1]
            nbytes = item[2] if len(item) > 2 else len(text.encode("utf-8")) + 1
            pending[seq] = (key, text, nbytes)
            inputs, targets = make_pair(vocab.encode(text))
            yield seq, inputs, targets

    for batch in bucketed_batches(items(), max_tokens=max_tokens, max_batch_size=batch_size):
        if totals is not None:
            totals.real_positions += batch.tokens
            totals.computed_positions += batch.inputs.size
        for result in score_batch(session, batch, keep_tokens=keep_tokens,
                                  num_threads=num_threads):
            ready[result.key] = result
        while next_out in ready:  # hand results back in input order
            result = ready.pop(next_out)
            key, text, nbytes = pending.pop(next_out)
            result.key = key
            if totals is not None:
                totals.add(result, nbytes)
            if progress is not None:
                progress(nbytes)
            yield key, text, result
            next_out += 1


def evaluate_sentences(session: ModelSession, sentences: Iterable[tuple[object, str]], *,
                       corpus: str = "<lines>", batch_size: int = DEFAULT_BATCH_SIZE,
                       max_tokens: int | None = None, keep_tokens: bool = False,
                       num_threads: int | None = None,
                       on_sentence: Callable[[object, str, SentenceResult], None] | None = None,
                       progress: Callable[[int], None] | None = None) -> EvaluationReport:
    """Evaluate ``(key, text)`` sentences; ``ValueError`` when there are none."""
    totals = _Totals()
    start = time.perf_counter()
    for key, text, result in score_sentences(
            session, sentences, batch_size=batch_size, max_tokens=max_tokens,
            keep_tokens=keep_tokens, num_threads=num_threads, totals=totals, progress=progress):
        if on_sentence is not None:
            on_sentence(key, text, result)
    seconds = time.perf_counter() - start
    if totals.sentences == 0:
        raise ValueError(f"{corpus}: no sentences to evaluate (empty or blank input)")
    return totals.report(corpus, seconds, session.provider)
