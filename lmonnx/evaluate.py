"""Corpus evaluation: onnxruntime logits + the lmonnx kernel, streamed, with KenLM-style accounting.

    Line --ExampleBuilder--> Example (words, inputs, targets, bytes, OOVs)
         --bucket by length, token budget--> padded batches
         --onnxruntime--> logits [B, T, V] --kernel, one pass--> NLL and top-1 hit per position
         --sum per sentence (float64)--> SentenceResult, in input order
         --Evaluator: totals, per-sentence / per-token writers--> EvaluationReport

Accounting (as KenLM and SRILM report it): a sentence ``w1 .. wn`` scores n+1 tokens, ``</s>``
included, ``<s>`` never.  ``perplexity = exp(nll / tokens)``; ``perplexity_no_oov`` leaves OOV
targets out of both the sum and the count.  ``bits_per_byte`` divides the total NLL in bits by
the original UTF-8 bytes of the sentences (surrounding whitespace included, a byte-order mark
not, one byte for each line break, which ``</s>`` predicts; blank lines are not sentences and
not counted), so it compares models with different tokenizers.  Totals are float64 sums of
per-sentence float64 sums: they do not depend on batch size or order beyond float rounding.

Memory is bounded by the batch budget and the look-ahead for any input: sentences are read
ahead (to sort them into length buckets) up to :data:`LOOKAHEAD` sentences *and*
:data:`LOOKAHEAD_BYTES` bytes of text, and a sentence longer than the budget is a batch of its own,
scored in consecutive windows of ``max_tokens`` positions that carry the LSTM state: its
logits never exceed the budget, and its NLL is that of one pass (to float rounding).

JSON (``--json``, the per-sentence and per-token lines) is strict (:mod:`lmonnx.strict_json`):
a NaN or infinite number (a model whose logits hold NaN, a diverged model's perplexity) is
written as ``null``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np

from lmonnx.atomic import check_outputs, output_file
from lmonnx.batching import Batch, bucketed_batches
from lmonnx.errors import CorpusError, InvalidArgumentError
from lmonnx.examples import Example
from lmonnx.metrics import LN2, default_max_tokens, perplexity_of
from lmonnx.runtime import CUDA, ModelSession
from lmonnx.strict_json import json_line
from lmonnx.validation import check_int
from lmonnx.vocab import UNK_ID
from lmonnx.windows import CarriedWindows
from lmonnx.xent import token_nll_and_hits

DEFAULT_BATCH_SIZE = 64
LOOKAHEAD = 4096
"""Sentences read ahead to sort into length buckets: bounds memory and latency."""
CALL_COST_MACS = 8_000_000
"""What one more onnxruntime call costs on CPU, in multiply-adds of the model: the sorted
look-ahead is cut into the batches that minimise padded positions plus, per batch, this many
multiply-adds' worth of positions (:func:`call_cost_positions`;
:func:`lmonnx.batching.bucketed_batches`).  Filling the logits budget greedily instead padded
a few callers' sentences to the longest of them.  Measured on 2 cores with a fixed 24
positions a call, against the greedy cut, ``Scorer.score`` of 64 PTB sentences a call: 2x200
V=10k 1.33x (8 and 64 positions: the same within noise), 2x64 V=3000 1.48x (64 and 128: the
same); a server's batches of ~11 sentences at 32 callers (2x64): 32 positions gave 1.07x the
requests/s of 96 and 1.17x of none.  A fixed 32 made a tiny model (2x64, V=104) 0.75x at 16
sentences a call: a position costs it so little that the calls' fixed costs dominate (scaled
by model size to 110 positions a call it still measured ~0.85x), hence the scale by model
size and the greedy cut past :data:`CALL_BOUND_POSITIONS` (2x200 V=10k: 16 positions, 2x64
V=3000: 30, 2x64 V=104: greedy).  A full look-ahead (``evaluate``) was already packed (1.8%
padding; now 0.3%, the same speed: PTB test, best of 5, 2x64 V=3000 0.422 s against 0.432 s
greedy, 2x200 V=6k 1.855 s against 1.891 s)."""
CALL_BOUND_POSITIONS = 64
"""Past this many positions a call, a model is cut greedily (see :data:`CALL_COST_MACS`)."""
LOOKAHEAD_BYTES = 1 << 20
"""Bytes of text read ahead at most (a longer sentence is read alone): bounds the memory of the
look-ahead when lines are long (4096 lines of 300k words would otherwise be held).  Counted in
bytes, not tokens, so that a reader that has not tokenized yet (``lmonnx.distributed``'s read tasks)
cuts exactly the chunks the evaluator cuts; a token takes at least two bytes (a character
and a separator or the line break), so this also bounds the tokens held."""


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


def token_scores(example: Example, result: SentenceResult) -> list[TokenScore]:
    """Per-token scores of a sentence scored with ``keep_tokens=True``, like kenlm's
    ``full_scores``: its words as the example builder split them, then ``</s>``."""
    if result.token_nll is None:
        raise InvalidArgumentError("the sentence was scored without keep_tokens=True")
    words = example.words + ("</s>",)
    return [TokenScore(word=w, id=int(i), logprob=-float(n), is_oov=int(i) == UNK_ID)
            for w, i, n in zip(words, example.targets, result.token_nll)]


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


def _token_scores(session: ModelSession, inputs, targets, mask, state, num_threads):
    """(nll float64 [B, T] in nats, 0 where masked; top-1 hits bool [B, T]; state after).

    CPU: onnxruntime's logits, read once by the kernel.  A session with the loss head (CUDA):
    the head's [B, T] log-probabilities and hits, the logits never leave the device."""
    if session.loss_head:
        logprob, hit, state = session.run_head(inputs, targets, state)
        real = mask != 0
        nll = np.where(real, -logprob.astype(np.float64), 0.0)
        return nll, hit & real & ~np.isnan(logprob), state  # NaN rows are never hits
    if session.factored:  # the head and, per position, its target's cluster only
        return session.score_targets(inputs, targets, mask, state, num_threads=num_threads)
    logits, state = session.run(inputs, state)
    nll, hits = token_nll_and_hits(logits, targets, mask, num_threads=num_threads)
    return nll, hits, state


def score_batch(session: ModelSession, batch: Batch, *, keep_tokens: bool = False,
                num_threads: int | None = None, window: int | None = None,
                ) -> list[SentenceResult]:
    """Score one padded batch: onnxruntime logits and one kernel pass over them (or the
    session's loss head on CUDA).

    ``window``: a one-row batch longer than ``window`` positions is run in consecutive windows
    that carry the LSTM state (:class:`WindowedRow`), so its logits never exceed
    ``window x V`` at once; the NLL equals one pass up to float rounding.
    """
    batch_size, length = batch.inputs.shape
    if window is None or length <= window or batch_size != 1:
        nll, hits, _ = _token_scores(session, batch.inputs, batch.targets, batch.mask, None,
                                     num_threads)
        return batch_results(batch, nll, hits, keep_tokens)
    row = WindowedRow(session, batch, window, num_threads)
    while not row.done:
        row.step()
    return row.results(keep_tokens)


class WindowedRow:
    """A one-row batch scored ``window`` positions per :meth:`step`, the LSTM state carried
    from window to window (:class:`~lmonnx.windows.CarriedWindows`): what :func:`score_batch`
    does for a long sentence, in steps a server runs as turns of its compute thread, so that
    other callers' batches run between them.  Memory: the row's NLL and hits (9 bytes a
    position) and one window's logits."""

    def __init__(self, session: ModelSession, batch: Batch, window: int,
                 num_threads: int | None = None):
        if batch.inputs.shape[0] != 1:
            raise InvalidArgumentError(f"a windowed row is one sentence, got a batch of "
                                       f"{batch.inputs.shape[0]}")
        self.session, self.batch, self.num_threads = session, batch, num_threads
        self.nll = np.empty(batch.inputs.shape, dtype=np.float64)
        self.hits = np.empty(batch.inputs.shape, dtype=bool)
        self._windows = CarriedWindows(batch.inputs.shape[1], window)

    @property
    def window(self) -> int:
        return self._windows.window

    @property
    def done(self) -> bool:
        return self._windows.done

    def step(self) -> None:
        """Score the next window (onnxruntime and the kernel)."""
        part, (nll, hits) = self._windows.step(self._score_window)
        self.nll[:, part], self.hits[:, part] = nll, hits

    def _score_window(self, part: slice, state):
        b = self.batch
        nll, hits, state = _token_scores(self.session, b.inputs[:, part], b.targets[:, part],
                                         b.mask[:, part], state, self.num_threads)
        return (nll, hits), state

    def results(self, keep_tokens: bool = False) -> list[SentenceResult]:
        """The row's :class:`SentenceResult` (a list of one), once :attr:`done`."""
        if not self.done:
            raise RuntimeError(f"the row is scored up to position {self._windows.start} of "
                               f"{self.batch.inputs.shape[1]}")
        return batch_results(self.batch, self.nll, self.hits, keep_tokens)


def batch_results(batch: Batch, nll: np.ndarray, hits: np.ndarray,
                  keep_tokens: bool = False) -> list[SentenceResult]:
    """Each row's :class:`SentenceResult` from its token NLL (float64 [B, T], nats, 0 where
    masked) and top-1 hits (bool [B, T])."""
    oov = (batch.targets == UNK_ID) & (batch.mask != 0)
    oov_nll = np.where(oov, nll, 0.0)
    row_hits = hits.sum(axis=1)
    row_oov_hits = (hits & oov).sum(axis=1)  # an <unk> target "predicted" by <unk>
    row_oovs = oov.sum(axis=1)
    results = []
    for r, key in enumerate(batch.keys):
        n = int(batch.lengths[r])
        # Summed over the real positions only: NumPy's pairwise sum groups terms by the
        # row's length, so summing the padding too would make a sentence's last bit depend
        # on the longest sentence of its batch (a server batches strangers together).
        results.append(SentenceResult(
            key=key, tokens=n, oovs=int(row_oovs[r]), logprob=-float(nll[r, :n].sum()),
            oov_nll=float(oov_nll[r, :n].sum()), hits=int(row_hits[r]),
            oov_hits=int(row_oov_hits[r]),
            token_nll=nll[r, :n].copy() if keep_tokens else None))
    return results


def sentence_record(corpus: str, result: SentenceResult) -> dict:
    """One sentence's ``--per-sentence`` record (``result.key``: its line number), the keys in
    this order; ``nll`` in nats.  Local JSON lines and ``lmonnx.distributed``'s sinks all write it."""
    return {"corpus": corpus, "line": result.key, "tokens": result.tokens,
            "oovs": result.oovs, "nll": result.nll, "perplexity": result.perplexity,
            "hits": result.hits}


# ---- writers: the files `--per-sentence` and `--per-token` produce, for API users too --------

class SentenceWriter:
    """JSON lines, one per sentence: corpus, line, tokens, oovs, nll (nats), perplexity, hits."""

    needs_tokens = False

    def __init__(self, file: TextIO):
        self.file = file

    def write(self, corpus: str, example: Example, result: SentenceResult) -> None:
        self.file.write(json_line(sentence_record(corpus, result)) + "\n")


class TokenWriter:
    """JSON lines, one per scored token: corpus, line, word, id, logprob (nats), is_oov."""

    needs_tokens = True

    def __init__(self, file: TextIO):
        self.file = file

    def write(self, corpus: str, example: Example, result: SentenceResult) -> None:
        for token in token_scores(example, result):
            self.file.write(json_line({"corpus": corpus, "line": example.key,
                                       **asdict(token)}) + "\n")


def lookahead_chunks(items: Iterable, max_sentences: int = LOOKAHEAD,
                     max_bytes: int = LOOKAHEAD_BYTES) -> Iterator[list]:
    """Consecutive runs of ``items`` (:class:`Example` or :class:`lmonnx.corpus.Line`: anything
    with ``nbytes``) of at most ``max_sentences`` sentences and ``max_bytes`` bytes of text (a
    longer sentence is a run of its own): what the evaluator holds at once to sort into
    length buckets, and the chunks ``lmonnx.distributed`` scores, so both form the same batches."""
    chunk: list = []
    nbytes = 0
    for item in items:
        if chunk and (len(chunk) >= max_sentences or nbytes + item.nbytes > max_bytes):
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(item)
        nbytes += item.nbytes
    if chunk:
        yield chunk


@contextlib.contextmanager
def open_writers(per_sentence=None, per_token=None, *, inputs: Sequence = (),
                 force: bool = False, flags: tuple[str, str] = ("per_sentence", "per_token"),
                 ) -> Iterator[list]:
    """The writers of the outputs asked for (None: not asked for), as a context.

    A target is an open text file, or a path: checked first by
    :func:`lmonnx.atomic.check_outputs` (not one of ``inputs``, not both one file, an existing
    file only with ``force``), then opened with :func:`lmonnx.atomic.output_file`, so a regular
    file is replaced only when the ``with`` block succeeds while a FIFO or ``/dev/stdout`` is
    written as results come.  ``flags`` name the two outputs in errors."""
    wanted = [(flag, target, kind) for flag, target, kind in
              zip(flags, (per_sentence, per_token), (SentenceWriter, TokenWriter))
              if target is not None]
    check_outputs({flag: target for flag, target, _ in wanted if not hasattr(target, "write")},
                  inputs, force=force)
    with contextlib.ExitStack() as stack:
        yield [kind(target if hasattr(target, "write")
                    else stack.enter_context(output_file(target, flag)))
               for flag, target, kind in wanted]


# ---- the evaluator ---------------------------------------------------------------------------

def call_cost_positions(session: ModelSession) -> int | None:
    """Padded positions one more onnxruntime call is worth for this model on CPU:
    :data:`CALL_COST_MACS` over a position's multiply-adds (the LSTM layers' and the output
    layer's), at least 16; None (the greedy cut, the fewest batches) for a model so small
    that a call is worth more than :data:`CALL_BOUND_POSITIONS`, and on CUDA, where a call's
    launches cost more than padding (not measured here: the cut as before)."""
    if session.provider == CUDA:
        return None
    units = session.num_units
    per_position = 8 * session.num_layers * units * units + session.output_macs
    positions = CALL_COST_MACS // max(per_position, 1)
    if positions > CALL_BOUND_POSITIONS:
        return None  # a tiny model: its calls' fixed costs dominate, the fewest calls win
    return max(16, positions)


class Evaluator:
    """Scores a stream of :class:`Example` objects and owns the totals and writers of one run.

    ``scored(examples)`` yields ``(example, result)`` in input order while it adds them to the
    totals and hands them to ``writers``; ``report()`` turns the totals into an
    :class:`EvaluationReport`.  ``Scorer.score`` and ``Scorer.evaluate``, the CLI and export's
    self-check all score through this class, so they cannot disagree on a number.

    ``batch_size`` bounds sentences per batch, ``max_tokens`` padded positions per batch
    (None: what a batch holds stays under 64 MiB: its logits, or a factored model's head and
    hidden states, :attr:`ModelSession.scored_width`); both are checked here, at construction.
    """

    def __init__(self, session: ModelSession, *, corpus: str = "<lines>",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = None,
                 num_threads: int | None = None, keep_tokens: bool = False, writers=()):
        self.session = session
        self.corpus = corpus
        self.batch_size = check_int("batch_size", batch_size)
        self.max_tokens = (default_max_tokens(session.scored_width) if max_tokens is None
                           else check_int("max_tokens", max_tokens))
        self.num_threads = num_threads
        self.call_cost = call_cost_positions(session)
        self.writers = tuple(writers)
        self.keep_tokens = keep_tokens or any(w.needs_tokens for w in self.writers)
        self.totals = Totals()
        self.seconds = 0.0

    def _add(self, example: Example, result: SentenceResult) -> None:
        self.totals.add(result, example.nbytes)
        for writer in self.writers:
            writer.write(self.corpus, example, result)

    def scored(self, examples: Iterable[Example], progress: Callable[[int], None] | None = None,
               ) -> Iterator[tuple[Example, SentenceResult]]:
        """Yield ``(example, result)`` for every example, in input order, streaming.

        Sentences are bucketed by length within a look-ahead of :data:`LOOKAHEAD` sentences
        and :data:`LOOKAHEAD_BYTES` bytes, so memory stays bounded by the batch budget and
        the look-ahead, never by the corpus.  ``progress`` is called with the bytes of each
        scored sentence.
        """
        start = time.perf_counter()
        try:
            for chunk in lookahead_chunks(examples):
                for example, result in zip(chunk, self._score_chunk(chunk)):
                    result.key = example.key
                    self._add(example, result)
                    if progress is not None:
                        progress(example.nbytes)
                    yield example, result
        finally:
            self.seconds += time.perf_counter() - start

    def _score_chunk(self, chunk: Sequence[Example]) -> list[SentenceResult]:
        """Results of one look-ahead's examples, in their order (batched by length)."""
        results: list[SentenceResult | None] = [None] * len(chunk)
        items = [(i, example.inputs, example.targets) for i, example in enumerate(chunk)]
        for batch in bucketed_batches(items, max_tokens=self.max_tokens,
                                      max_batch_size=self.batch_size, lookahead=len(items),
                                      call_cost=self.call_cost):
            self.totals.real_positions += batch.tokens
            self.totals.computed_positions += batch.inputs.size
            for result in score_batch(self.session, batch, keep_tokens=self.keep_tokens,
                                      num_threads=self.num_threads, window=self.max_tokens):
                results[result.key] = result
        return results

    def run(self, examples: Iterable[Example],
            progress: Callable[[int], None] | None = None) -> EvaluationReport:
        """Score every example and return the report; ``ValueError`` when there is none."""
        for _ in self.scored(examples, progress):
            pass
        return self.report()

    def report(self) -> EvaluationReport:
        return self.totals.report(self.corpus, self.session.provider_description, self.seconds)


@dataclass
class Totals:
    """The sums a report is made of: counts, and float64 NLL sums in nats, added sentence by
    sentence in input order.  :class:`Evaluator` keeps one; ``lmonnx.distributed`` adds its rows into
    one in the same order, so both report the same numbers to the last bit."""

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
        """Count one scored sentence of ``nbytes`` original UTF-8 bytes."""
        self.sentences += 1
        self.tokens += result.tokens
        self.oovs += result.oovs
        self.nll += result.nll
        self.oov_nll += result.oov_nll
        self.hits += result.hits
        self.oov_hits += result.oov_hits
        self.bytes += nbytes

    def report(self, corpus: str, provider: str, seconds: float) -> EvaluationReport:
        """The :class:`EvaluationReport` of these sums; ``CorpusError`` when there is no
        sentence."""
        if self.sentences == 0:
            raise CorpusError(f"{corpus}: no sentences to evaluate (empty or blank input)")
        tokens, nll = self.tokens, self.nll
        in_vocab = tokens - self.oovs
        mean_nll = nll / tokens
        return EvaluationReport(
            corpus=corpus,
            sentences=self.sentences,
            tokens=tokens,
            words=tokens - self.sentences,
            oovs=self.oovs,
            nll=nll,
            mean_nll=mean_nll,
            perplexity=perplexity_of(nll, tokens),
            perplexity_no_oov=(perplexity_of(nll - self.oov_nll, in_vocab) if in_vocab
                               else math.nan),
            bits_per_token=mean_nll / LN2,
            bits_per_byte=nll / LN2 / self.bytes,
            top1_accuracy=self.hits / tokens,
            top1_accuracy_no_oov=(self.hits - self.oov_hits) / in_vocab if in_vocab else math.nan,
            padding_fraction=(1.0 - self.real_positions / self.computed_positions
                              if self.computed_positions else 0.0),
            tokens_per_second=tokens / seconds if seconds > 0 else math.inf,
            seconds=seconds,
            provider=provider,
        )
