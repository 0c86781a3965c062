"""N-best rescoring for ASR and OCR: a first-pass decoder's hypotheses re-ranked with lmonnx.

Each hypothesis of an utterance gets, as in NeMo's n-best rescoring script::

    score = am + alpha * lm + beta * words

``am``: the first pass's score, as the decoder wrote it; ``lm``: the hypothesis's
log-probability under lmonnx (``Scorer.score``: its words, then ``</s>``), or under lmonnx
mixed per token with KenLM (:class:`lmonnx.mix.MixedScorer`), in **nats (natural log)**, as
lmonnx reports everywhere; ``words``: the hypothesis's whitespace-separated words
(``len(text.split())``, NeMo's count).  NeMo's and KenLM's own scripts use log10 or natural
logs depending on the tool, so a tuned ``alpha`` absorbs the base: an alpha tuned on log10
scores is ln(10) = 2.303 times the one for nats.  The best hypothesis of an utterance has the
highest score; ties go to the earlier hypothesis (the first pass's order).

The **first-pass best** is the hypothesis with the highest ``am`` score (alpha = beta = 0),
not necessarily the first line of its utterance.  Word error rates are jiwer's
(``jiwer.wer`` over the lists of references and chosen hypotheses: word errors summed over
the utterances, divided by the references' words), in the optional extra ``lmonnx[asr]``.

:func:`tune` searches alpha and beta on a grid by WER without running the model again: the
LM scores are computed once (:func:`lm_scores`) and every setting is NumPy arithmetic over
[utterances, hypotheses] arrays, with each hypothesis's word errors counted once by jiwer.

Input (:func:`read_nbest`): NeMo's TSV (``text<TAB>am_score``, ``beam_size`` lines per
utterance) or JSON lines (``{"utterance": id, "text": ..., "am_score": ...}``, an
utterance's hypotheses on consecutive lines).  Lines are decoded as corpus lines are
(:mod:`lmonnx.corpus`: UTF-8, strict or replace, a BOM and the line break dropped).
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from lmonnx.corpus import STDIN, check_corpora, decode_line, to_line
from lmonnx.errors import (ArgumentTypeError, CorpusError, InvalidArgumentError,
                           MissingDependencyError)
from lmonnx.strict_json import json_line
from lmonnx.validation import check_choice, check_int, check_real

FORMATS = ("tsv", "jsonl")
_EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl"}
_BOM = "\ufeff".encode("utf-8")

DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 0.0
DEFAULT_ALPHAS = tuple(i / 10 for i in range(21))
"""alpha grid of :func:`tune`: 0, 0.1, ..., 2.0."""
DEFAULT_BETAS = tuple(i / 2 for i in range(-4, 5))
"""beta grid of :func:`tune`: -2, -1.5, ..., 2."""
CHUNK_HYPOTHESES = 4096
"""Hypotheses (of whole utterances) per scoring call of :func:`lm_scores`."""


@dataclass(frozen=True)
class Utterance:
    """One utterance's n-best list: ``id`` (JSON lines: its ``"utterance"``; TSV: its
    1-based number in the file), ``hypotheses`` (texts, surrounding whitespace stripped, in
    the first pass's order; an empty one is allowed) and ``am_scores`` (float64 [n], the
    first pass's scores, finite)."""

    id: str
    hypotheses: tuple[str, ...]
    am_scores: np.ndarray

    def __post_init__(self):
        hypotheses = tuple(self.hypotheses)
        if not hypotheses or not all(isinstance(h, str) for h in hypotheses):
            raise ArgumentTypeError(f"utterance {self.id!r}: hypotheses must be a non-empty "
                                    "sequence of str")
        am_scores = np.asarray(self.am_scores, dtype=np.float64)
        if am_scores.shape != (len(hypotheses),) or not np.isfinite(am_scores).all():
            raise InvalidArgumentError(f"utterance {self.id!r}: am_scores must be "
                                       f"{len(hypotheses)} finite numbers, one per hypothesis")
        object.__setattr__(self, "hypotheses", hypotheses)
        object.__setattr__(self, "am_scores", am_scores)

    @property
    def word_counts(self) -> np.ndarray:
        """int64 [n]: each hypothesis's whitespace-separated words (the beta term's count)."""
        return np.array([len(h.split()) for h in self.hypotheses], dtype=np.int64)


# ---- reading ----------------------------------------------------------------------------------

def nbest_format(path, format: str | None = None) -> str:
    """``format`` ("tsv" or "jsonl") when given, else the one ``path``'s extension names:
    ``.tsv`` / ``.tab`` -> tsv, ``.jsonl`` / ``.ndjson`` / ``.json`` -> jsonl."""
    if format is not None:
        return check_choice("format", format, FORMATS)
    if str(path) == STDIN:
        raise InvalidArgumentError("an n-best list read from stdin (-) needs its format: "
                                   "--format tsv|jsonl (format= in Python)")
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise InvalidArgumentError(f"{path}: cannot tell the n-best format from the extension "
                                   "(.tsv or .jsonl); pass --format tsv|jsonl (format= in "
                                   "Python)")
    return found


def _raw_lines(path, errors: str) -> tuple[str, list[bytes]]:
    """(the name errors use, every line of ``path`` as bytes; ``"-"``: stdin)."""
    check_corpora([path], errors)
    name = "<stdin>" if str(path) == STDIN else str(path)
    try:
        if str(path) == STDIN:
            return name, list(sys.stdin.buffer)
        with open(path, "rb") as f:
            return name, list(f)
    except OSError as exc:
        raise CorpusError(f"{name}: cannot read it: {exc.strerror or exc}") from None


def _decoded(raw: bytes, errors: str, where: str) -> str:
    """A line's text without its line break and BOM, not stripped (a TSV line's leading tab
    is its empty hypothesis)."""
    raw = raw.rstrip(b"\r\n")
    while raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    return decode_line(raw, errors, where)


def _am_score(value, where: str) -> float:
    """A finite am_score from TSV text or a JSON number; :class:`CorpusError` otherwise."""
    try:
        value = float(value)
    except ValueError:
        raise CorpusError(f"{where}: am_score {value.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise CorpusError(f"{where}: am_score {value} is not a finite number")
    return value


def _tsv_hypothesis(raw: bytes, errors: str, where: str) -> tuple[str, float]:
    fields = _decoded(raw, errors, where).split("\t")
    if len(fields) != 2:
        found = "no tab" if len(fields) == 1 else f"{len(fields) - 1} tabs"
        raise CorpusError(f"{where}: {found}; expected text<TAB>am_score (one tab)")
    return fields[0].strip(), _am_score(fields[1], where)


def _utterance(key: str, group: list[tuple[str, float]]) -> Utterance:
    return Utterance(key, tuple(text for text, _ in group),
                     np.array([score for _, score in group], dtype=np.float64))


def _read_tsv(name: str, lines: list[bytes], beam_size: int, errors: str) -> list[Utterance]:
    """NeMo's TSV: ``beam_size`` consecutive lines per utterance, ids "1", "2", ..."""
    if len(lines) % beam_size:
        raise CorpusError(f"{name}: {len(lines)} lines is not a multiple of the beam size "
                          f"{beam_size} (--beam-size): every utterance has beam-size lines")
    parsed = [_tsv_hypothesis(raw, errors, f"{name}:{i}") for i, raw in enumerate(lines, 1)]
    return [_utterance(str(number), parsed[start:start + beam_size])
            for number, start in enumerate(range(0, len(parsed), beam_size), 1)]


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, text in ((str, "a string"), (numbers.Real, "a number"), (list, "an array"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return text
    return "null"


def _jsonl_hypothesis(text: str, where: str) -> tuple[str, str, float]:
    """(utterance, text, am_score) of one JSON line."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {_json_type(record)}")
    for key in ("utterance", "text", "am_score"):
        if key not in record:
            raise CorpusError(f'{where}: no "{key}" key (each line needs "utterance", "text" '
                              'and "am_score")')
    for key, wanted in (("utterance", "a string"), ("text", "a string"),
                        ("am_score", "a number")):
        if _json_type(record[key]) != wanted:
            raise CorpusError(f'{where}: "{key}" must be {wanted}, got '
                              f"{_json_type(record[key])}")
    return record["utterance"], record["text"].strip(), _am_score(record["am_score"], where)


def _read_jsonl(name: str, lines: list[bytes], errors: str) -> list[Utterance]:
    """JSON lines, an utterance's hypotheses consecutive; blank lines skipped."""
    groups: dict[str, list[tuple[str, float]]] = {}
    current = None
    for i, raw in enumerate(lines, 1):
        where = f"{name}:{i}"
        text = to_line(i, raw, errors, where).text
        if not text:
            continue
        utterance, hypothesis, am_score = _jsonl_hypothesis(text, where)
        if utterance != current and utterance in groups:
            raise CorpusError(f"{where}: utterance {utterance!r} again after another "
                              "utterance; its hypotheses must be consecutive lines")
        current = utterance
        groups.setdefault(utterance, []).append((hypothesis, am_score))
    return [_utterance(key, group) for key, group in groups.items()]


def read_nbest(path, *, beam_size: int | None = None, format: str | None = None,
               errors: str = "strict") -> list[Utterance]:
    """Every utterance of an n-best file (``"-"``: stdin), in order.

    ``format``: "tsv" or "jsonl" (default: from the extension, :func:`nbest_format`).  TSV
    needs ``beam_size``, the lines per utterance (the line count must be a multiple of it);
    JSON lines group consecutive lines by ``"utterance"`` and take no ``beam_size``.
    ``errors``: "strict" or "replace" for undecodable UTF-8.  A malformed line raises
    :class:`~lmonnx.errors.CorpusError` naming ``file:line``; so does an input without
    hypotheses.
    """
    format = nbest_format(path, format)
    if format == "tsv" and beam_size is None:
        raise InvalidArgumentError("a TSV n-best list needs its beam size, the lines per "
                                   "utterance: --beam-size N (beam_size= in Python)")
    if format == "jsonl" and beam_size is not None:
        raise InvalidArgumentError("JSON lines name their utterances: the beam size "
                                   "(--beam-size) is for TSV only")
    name, lines = _raw_lines(path, errors)
    if format == "tsv":
        utterances = _read_tsv(name, lines, check_int("beam_size", beam_size), errors)
    else:
        utterances = _read_jsonl(name, lines, errors)
    if not utterances:
        raise CorpusError(f"{name}: no hypotheses (the input is empty or blank)")
    return utterances


def read_references(path, errors: str = "strict") -> list[str]:
    """One reference transcript per line of ``path`` (``"-"``: stdin), every line counted:
    a blank line is refused (:class:`~lmonnx.errors.CorpusError` naming it), as WER needs
    reference words."""
    name, lines = _raw_lines(path, errors)
    references = [to_line(i, raw, errors, f"{name}:{i}").text for i, raw in enumerate(lines, 1)]
    for i, reference in enumerate(references, 1):
        if not reference:
            raise CorpusError(f"{name}:{i}: an empty reference; WER needs the words of every "
                              "utterance")
    return references


# ---- LM scores --------------------------------------------------------------------------------

def _chunks(utterances: Sequence[Utterance], hypotheses: int) -> Iterator[list[Utterance]]:
    """Runs of whole utterances of at most ``hypotheses`` hypotheses (a larger one alone)."""
    chunk, size = [], 0
    for utterance in utterances:
        if chunk and size + len(utterance.hypotheses) > hypotheses:
            yield chunk
            chunk, size = [], 0
        chunk.append(utterance)
        size += len(utterance.hypotheses)
    if chunk:
        yield chunk


def _logprobs(lm, texts: list[str]) -> list[float]:
    return [score.logprob for score in lm.score(texts)]  # a Scorer's or a MixedScorer's


def lm_scores(lm, utterances: Sequence[Utterance], *,
              chunk_hypotheses: int = CHUNK_HYPOTHESES) -> list[np.ndarray]:
    """Each utterance's LM log-probabilities, float64 [n] in nats (natural log), in order.

    ``lm``: an :class:`lmonnx.Scorer` (``Scorer.score``: the words, then ``</s>``; an empty
    hypothesis scores ``</s>`` alone), anything with its ``score(texts)`` method, or a
    :class:`lmonnx.mix.MixedScorer` (the per-token mix).  The hypotheses of up to
    ``chunk_hypotheses`` (whole utterances) go in one scoring call, which batches them;
    identical texts anywhere in the input are scored once.
    """
    utterances = _check_utterances(utterances)
    chunk_hypotheses = check_int("chunk_hypotheses", chunk_hypotheses)
    scored: dict[str, float] = {}
    for chunk in _chunks(utterances, chunk_hypotheses):
        new = [h for h in distinct_texts(chunk) if h not in scored]
        if new:
            scored.update(zip(new, _logprobs(lm, new)))
    return lm_arrays(utterances, scored)


def distinct_texts(utterances: Sequence[Utterance]) -> list[str]:
    """Every hypothesis text of ``utterances`` once, in first-seen order: what an LM scores."""
    return list(dict.fromkeys(h for u in utterances for h in u.hypotheses))


def lm_arrays(utterances: Sequence[Utterance], logprob: Mapping[str, float]
              ) -> list[np.ndarray]:
    """Each utterance's LM log-probabilities, float64 [n] in nats, looked up by text in
    ``logprob`` (the scores of :func:`distinct_texts`): :func:`lm_scores`' answer."""
    return [np.array([logprob[h] for h in u.hypotheses], dtype=np.float64) for u in utterances]


# ---- rescoring ----------------------------------------------------------------------------------

def _check_utterances(utterances) -> list[Utterance]:
    utterances = list(utterances)
    if not utterances or not all(isinstance(u, Utterance) for u in utterances):
        raise ArgumentTypeError("utterances must be a non-empty list of Utterance "
                                "(read_nbest gives one)")
    return utterances


class _Arrays(NamedTuple):
    """An n-best input as [utterances, most hypotheses] arrays, padded past each utterance's
    own hypotheses (``real`` False there)."""

    am: np.ndarray     # float64, the first pass's scores
    lm: np.ndarray     # float64, nats
    words: np.ndarray  # float64, word counts
    real: np.ndarray   # bool


def _padded(rows: Sequence[np.ndarray], width: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _arrays(utterances, lm) -> _Arrays:
    utterances = _check_utterances(utterances)
    lm = [np.asarray(row, dtype=np.float64) for row in lm]
    if len(lm) != len(utterances) or any(
            row.shape != u.am_scores.shape for row, u in zip(lm, utterances)):
        raise InvalidArgumentError("lm must hold one array per utterance, one log-probability "
                                   "per hypothesis (lm_scores gives it)")
    width = max(len(u.hypotheses) for u in utterances)
    sizes = np.array([len(u.hypotheses) for u in utterances])
    return _Arrays(am=_padded([u.am_scores for u in utterances], width, np.float64),
                   lm=_padded(lm, width, np.float64),
                   words=_padded([u.word_counts for u in utterances], width, np.float64),
                   real=np.arange(width)[None, :] < sizes[:, None])


def _scores(arrays: _Arrays, alpha: float, beta: float) -> np.ndarray:
    """float64 [utterances, width]: am + alpha * lm + beta * words, -inf at padding.  At
    alpha 0 the LM term is left out (0 * -inf, a mix at weight 0, would be NaN)."""
    score = arrays.am + alpha * arrays.lm if alpha else arrays.am.copy()
    score += beta * arrays.words
    score[~arrays.real] = -np.inf
    return score


def _checked_scores(utterances, lm, alpha, beta) -> tuple[_Arrays, np.ndarray]:
    alpha = check_real("alpha", alpha, low=0.0)
    beta = check_real("beta", beta)
    arrays = _arrays(utterances, lm)
    return arrays, _scores(arrays, alpha, beta)


def combined_scores(utterances: Sequence[Utterance], lm: Sequence[np.ndarray],
                    alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA
                    ) -> list[np.ndarray]:
    """Each utterance's new scores, float64 [n]: ``am + alpha * lm + beta * words``.

    ``lm``: :func:`lm_scores`' arrays (nats); ``alpha`` >= 0 weighs them; ``beta`` (any real)
    is the reward per word (negative: a penalty)."""
    arrays, scores = _checked_scores(utterances, lm, alpha, beta)
    return [row[real] for row, real in zip(scores, arrays.real)]


def rescore(utterances: Sequence[Utterance], lm: Sequence[np.ndarray],
            alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> list[int]:
    """The best hypothesis's index (0-based, in its n-best) of each utterance under
    :func:`combined_scores`; a tie goes to the earlier hypothesis."""
    return _checked_scores(utterances, lm, alpha, beta)[1].argmax(axis=1).tolist()


def first_pass(utterances: Sequence[Utterance]) -> list[int]:
    """The first pass's best of each utterance: the highest ``am_score`` (the earlier on a
    tie), i.e. :func:`rescore` at alpha = beta = 0."""
    utterances = _check_utterances(utterances)
    return rescore(utterances, [np.zeros(len(u.hypotheses)) for u in utterances], 0.0, 0.0)


# ---- word error rates and tuning ------------------------------------------------------------

def _jiwer():
    try:
        import jiwer
    except ImportError:
        raise MissingDependencyError("word error rates need jiwer: pip install "
                                     "'lmonnx[asr]'") from None
    return jiwer


def _check_references(references, count: int) -> list[str]:
    if isinstance(references, (str, bytes)):
        raise ArgumentTypeError("references must be a list of str, one per utterance")
    references = list(references)
    if not all(isinstance(r, str) for r in references):
        raise ArgumentTypeError("references must be a list of str, one per utterance")
    if len(references) != count:
        raise InvalidArgumentError(f"{len(references)} references for {count} utterances: "
                                   "give one reference per utterance, in order")
    for i, reference in enumerate(references, 1):
        if not reference.split():
            raise InvalidArgumentError(f"reference {i} is empty; WER needs its words")
    return references


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """jiwer's WER of ``hypotheses`` against ``references`` (lists of one text per
    utterance): word errors (substitutions + deletions + insertions) summed over the
    utterances, divided by the references' words."""
    references = _check_references(references, len(hypotheses))
    return float(_jiwer().wer(references, list(hypotheses)))


def word_errors(utterances: Sequence[Utterance], references: Sequence[str]
                ) -> tuple[list[np.ndarray], int]:
    """(each utterance's word errors per hypothesis, int64 [n]: substitutions + deletions +
    insertions against its reference as jiwer aligns them; the references' words in all, as
    jiwer splits them).  One jiwer call for every hypothesis."""
    utterances = _check_utterances(utterances)
    references = _check_references(references, len(utterances))
    pairs = [(r, h) for r, u in zip(references, utterances) for h in u.hypotheses]
    output = _jiwer().process_words([r for r, _ in pairs], [h for _, h in pairs])
    errors, reference_lengths = [], []
    for chunks in output.alignments:
        errors.append(sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                          for c in chunks if c.type != "equal"))
        reference_lengths.append(sum(c.ref_end_idx - c.ref_start_idx for c in chunks))
    bounds = np.cumsum([0] + [len(u.hypotheses) for u in utterances])
    reference_words = sum(reference_lengths[start] for start in bounds[:-1])
    return ([np.array(errors[a:b], dtype=np.int64) for a, b in zip(bounds, bounds[1:])],
            int(reference_words))


@dataclass(frozen=True)
class TuneRow:
    """One grid setting: ``alpha``, ``beta``, the chosen hypotheses' word ``errors`` and
    ``wer`` (errors / reference words)."""

    alpha: float
    beta: float
    errors: int
    wer: float


@dataclass(frozen=True)
class TuneResult:
    """:func:`tune`'s answer: ``rows``, every grid setting best first (lowest WER, then the
    smallest alpha, the smallest \\|beta\\|, the smaller beta); the first pass's word errors
    and WER (the highest am_score); ``reference_words``.  :attr:`best` is ``rows[0]``."""

    rows: tuple[TuneRow, ...]
    first_pass_errors: int
    first_pass_wer: float
    reference_words: int

    @property
    def best(self) -> TuneRow:
        return self.rows[0]

    def format_table(self, limit: int = 10) -> str:
        """The best ``limit`` settings as a text table (WERs in percent)."""
        lines = [f"{'alpha':>8}  {'beta':>8}  {'WER':>8}  {'first-pass WER':>14}"]
        lines += [f"{row.alpha:8g}  {row.beta:8g}  {row.wer * 100:7.2f}%  "
                  f"{self.first_pass_wer * 100:13.2f}%" for row in self.rows[:limit]]
        return "\n".join(lines)

    def to_dict(self, limit: int | None = None) -> dict:
        return {"best": asdict(self.best), "first_pass_errors": self.first_pass_errors,
                "first_pass_wer": self.first_pass_wer, "reference_words": self.reference_words,
                "rows": [asdict(row) for row in self.rows[:limit]]}


def _grid(name: str, values, low: float | None) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ArgumentTypeError(f"{name} must be a non-empty sequence of numbers")
    return list(dict.fromkeys(check_real(name, v, low=low) for v in values))


def tune(utterances: Sequence[Utterance], lm: Sequence[np.ndarray], references: Sequence[str],
         alphas: Sequence[float] = DEFAULT_ALPHAS,
         betas: Sequence[float] = DEFAULT_BETAS) -> TuneResult:
    """Grid search of alpha (each >= 0) and beta on WER against ``references`` (one per
    utterance, in order).  ``lm``: :func:`lm_scores`' arrays, computed once: each setting is
    an argmax over [utterances, hypotheses] arrays and a sum of word errors counted once
    (:func:`word_errors`), so each row's ``wer`` is :func:`word_error_rate` of that setting's
    choice, exactly.  Ties between settings: the smallest alpha, then the smallest |beta|."""
    alphas, betas = _grid("alphas", alphas, 0.0), _grid("betas", betas, None)
    arrays = _arrays(utterances, lm)
    errors, reference_words = word_errors(utterances, references)
    error_matrix = _padded(errors, arrays.am.shape[1], np.int64)
    rows_index = np.arange(len(error_matrix))

    def total_errors(alpha: float, beta: float) -> int:
        best = _scores(arrays, alpha, beta).argmax(axis=1)
        return int(error_matrix[rows_index, best].sum())

    rows = [TuneRow(a, b, e, e / reference_words)
            for a in alphas for b in betas for e in [total_errors(a, b)]]
    rows.sort(key=lambda r: (r.errors, r.alpha, abs(r.beta), r.beta))
    first = total_errors(0.0, 0.0)
    return TuneResult(tuple(rows), first, first / reference_words, reference_words)


# ---- output -------------------------------------------------------------------------------------

def output_lines(utterances: Sequence[Utterance], lm: Sequence[np.ndarray],
                 alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, *,
                 format: str = "tsv", all_hypotheses: bool = False) -> Iterator[str]:
    """The output's lines (no line breaks).  The best hypothesis of each utterance, or with
    ``all_hypotheses`` every hypothesis: "tsv", its text (all: ``text<TAB>score``, NeMo's
    shape again); "jsonl", ``{"utterance", "text", "am_score", "lm_logprob", "score",
    "rank"}`` (``rank``: its 0-based index in the n-best; all: plus ``"best"``)."""
    format = check_choice("format", format, FORMATS)
    utterances, lm = _check_utterances(utterances), list(lm)
    scores = _checked_scores(utterances, lm, alpha, beta)[1]
    for utterance, lm_row, score_row in zip(utterances, lm, scores):
        chosen = int(score_row.argmax())
        ranks = range(len(utterance.hypotheses)) if all_hypotheses else [chosen]
        for rank in ranks:
            text, score = utterance.hypotheses[rank], float(score_row[rank])
            if format == "tsv":
                yield f"{text}\t{score!r}" if all_hypotheses else text
                continue
            record = {"utterance": utterance.id, "text": text,
                      "am_score": float(utterance.am_scores[rank]),
                      "lm_logprob": float(lm_row[rank]), "score": score, "rank": rank}
            yield json_line({**record, "best": rank == chosen} if all_hypotheses else record)


__all__ = ["FORMATS", "DEFAULT_ALPHA", "DEFAULT_BETA", "DEFAULT_ALPHAS", "DEFAULT_BETAS",
           "Utterance", "nbest_format", "read_nbest", "read_references", "lm_scores",
           "distinct_texts", "lm_arrays",
           "combined_scores", "rescore", "first_pass", "word_error_rate", "word_errors",
           "TuneRow", "TuneResult", "tune", "output_lines"]
