"""Per-token linear interpolation of an lmonnx model with a KenLM n-gram model.

A neural LM and an n-gram LM make different errors, so mixing their probabilities word by
word lowers perplexity below either alone (Mikolov et al. 2011, "Empirical evaluation and
combination of advanced language modeling techniques"; Kaldi and the RNNLM toolkit do this)::

    p_mix(w | h) = L * p_lmonnx(w | h) + (1 - L) * q(w | h)        L in [0, 1]

on the tokens lmonnx scores (every word, then ``</s>``; ``<s>`` never), in probability space:
``log p_mix = logaddexp(log L + log p_lmonnx, log(1 - L) + log q)``.  Every log-probability
here is a natural log (nats); kenlm returns log10, converted by ``* ln(10)``.

Out-of-vocabulary rule.  lmonnx's tokenizer gives the words; lmonnx maps words outside its
vocabulary to ``<unk>`` (id 1).  For each scored token (each word of the sentence as lmonnx's
example builder split it, then ``</s>``), KenLM is fed the same word sequence (the words as
lmonnx split them, KenLM's own ``<s>`` context via ``bos=True``, ``</s>`` via ``eos=True``)
through ``model.full_scores(sentence, bos=True, eos=True)``, which yields (log10 prob, n-gram
length, oov) per word plus ``</s>``.  The KenLM distribution q over lmonnx's vocabulary is:

    a word both models know              q(w) = p_kenlm(w)
    lmonnx's <unk> (a word lmonnx        q = p_kenlm of that position as KenLM scores it:
    does not know)                       KenLM's <unk> mass if KenLM does not know the word
                                         either, else its probability of the word, which is a
                                         lower bound of the mass of lmonnx's <unk> class
                                         (every word lmonnx does not know)
    a word lmonnx knows and KenLM        q = 0, so p_mix = L * p_lmonnx there: KenLM's <unk>
    does not (full_scores' oov flag)     mass belongs to all the words it does not know, not
                                         to each

Normalization: the mixed distribution sums to at most 1 over lmonnx's vocabulary (q's terms
are disjoint events of KenLM's distribution, <pad> and <s> get q = 0), and to exactly 1 when
both vocabularies are the same closed vocabulary (the same training text): then q(<unk>) is
KenLM's <unk> mass and q sums to KenLM's total, 1.  KenLM must split text as lmonnx's
tokenizer does (train it on text tokenized that way), or the rule compares different words.
A literal ``<s>`` or ``</s>`` in the text is lmonnx's ``<unk>`` but KenLM's own marker (an
lmplz model gives ``<s>`` 10^-99): the rule takes KenLM's number as it is.

A weight of 0 with a word lmonnx knows and KenLM does not gives log p_mix = -inf and an
infinite perplexity (so does KenLM alone under q): that is the truth of the rule, reported as
such (:attr:`MixReport.kenlm_unknown` counts those tokens), never NaN or a warning.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from lmonnx.corpus import STDIN, require_sentences, sentences_of_lines
from lmonnx.errors import (ArgumentTypeError, ArtifactError, CorpusError, InvalidArgumentError,
                           MissingDependencyError, PathIsDirectoryError, PathNotFoundError,
                           first_line)
from lmonnx.evaluate import lookahead_chunks
from lmonnx.examples import Example, ExampleBuilder
from lmonnx.metrics import perplexity_of
from lmonnx.native_stderr import native_stderr_silenced
from lmonnx.scorer import Scorer, SentenceScore
from lmonnx.validation import check_int, check_real
from lmonnx.vocab import UNK_ID

LN10 = math.log(10.0)
"""nats per log10 unit: what turns kenlm's log10 probabilities into natural logs."""

AUTO = "auto"
"""``mix_weight="auto"``: fit L by EM on a held-out text (``fit_on=``)."""


def _kenlm_module():
    try:
        import kenlm
    except ImportError:  # an optional dependency: say how to get it, in one line
        raise MissingDependencyError("mixing with a KenLM model needs the kenlm module: "
                                     "pip install kenlm") from None
    return kenlm


def load_kenlm(path):
    """The ``kenlm.Model`` at ``path`` (ARPA or KenLM binary).

    ``MissingDependencyError`` without the kenlm module; ``PathNotFoundError`` /
    ``PathIsDirectoryError`` for a missing path or a directory (as for an lmonnx model);
    ``ArtifactError`` (a ``ValueError``) naming the path and kenlm's reason for a file kenlm
    cannot load.  Every message is one line."""
    kenlm = _kenlm_module()
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"a KenLM model path must be str or os.PathLike, "
                                f"got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise PathIsDirectoryError(f"KenLM model path is a directory, not a file: {path}")
    if not os.path.exists(path):
        raise PathNotFoundError(f"KenLM model not found: {path}")
    try:
        # KenLM's loader writes to fd 2 from C++ (an ARPA file's "faster if you build a binary
        # file" and a progress bar), which would precede the one-line error below
        with native_stderr_silenced():
            return kenlm.Model(path)
    except Exception as exc:  # kenlm raises OSError for a bad ARPA, others for other damage
        raise ArtifactError(f"{path}: kenlm cannot load it: {first_line(exc)}") from None


def check_mix_weight(value) -> float | str:
    """``value`` as a float in [0, 1], or ``"auto"``: ``ArgumentTypeError`` for a wrong type,
    ``InvalidArgumentError`` for a number outside [0, 1] or another string."""
    if isinstance(value, str):
        if value != AUTO:
            raise InvalidArgumentError(f'mix_weight must be a number from 0 to 1 or "auto"; '
                                       f"got {value!r}")
        return value
    return check_real("mix_weight", value, low=0.0, high=1.0, why='or "auto"')


def _token_arrays(lm_logprobs, kenlm_logprobs) -> tuple[np.ndarray, np.ndarray]:
    lm = np.asarray(lm_logprobs, dtype=np.float64)
    kenlm = np.asarray(kenlm_logprobs, dtype=np.float64)
    if lm.ndim != 1 or lm.shape != kenlm.shape:
        raise InvalidArgumentError(f"lm_logprobs and kenlm_logprobs must be 1-D arrays of one "
                                   f"length; got shapes {lm.shape} and {kenlm.shape}")
    return lm, kenlm


def _mix(lm: np.ndarray, kenlm: np.ndarray, weight: float) -> np.ndarray:
    # log 0 = -inf is meant here (weight 0 or 1 drops a model); -inf + finite and
    # logaddexp(-inf, -inf) are exact in IEEE arithmetic and warn about nothing.
    with np.errstate(divide="ignore"):
        log_weight, log_rest = np.log(weight), np.log1p(-weight)
    return np.logaddexp(log_weight + lm, log_rest + kenlm)


def mix_token_logprobs(lm_logprobs, kenlm_logprobs, weight: float) -> np.ndarray:
    """log p_mix per token, float64 [n] in nats, from lmonnx's and KenLM's (q under the
    rule) log-probabilities, float [n] in nats, and the weight L of lmonnx in [0, 1].

    Weight 1 gives ``lm_logprobs`` exactly, weight 0 ``kenlm_logprobs`` exactly; -inf where
    both models give the token probability 0 (a KenLM-unknown word at weight 0)."""
    lm, kenlm = _token_arrays(lm_logprobs, kenlm_logprobs)
    return _mix(lm, kenlm, check_real("weight", weight, low=0.0, high=1.0))


def fit_weight(lm_logprobs, kenlm_logprobs, *, tol: float = 1e-6, max_iter: int = 200) -> float:
    """The weight L of lmonnx that maximizes the likelihood of held-out tokens under the mix,
    by EM: from L = 0.5, L becomes the mean over tokens of lmonnx's posterior share
    ``L p_lmonnx / p_mix``, until it moves less than ``tol`` (or ``max_iter`` rounds).

    ``lm_logprobs``, ``kenlm_logprobs``: float [n], nats.  A mean of shares in [0, 1] never
    leaves [0, 1].  Tokens both models give probability 0 are left out: the likelihood is
    -inf there whatever L, so they say nothing about it.  The log-likelihood is concave in
    L, so EM's fixed point is the optimum; it converges linearly, slowest when the optimum is
    0 or 1."""
    lm, kenlm = _token_arrays(lm_logprobs, kenlm_logprobs)
    tol = check_real("tol", tol, low=0.0, low_open=True)
    max_iter = check_int("max_iter", max_iter)
    if np.isnan(lm).any() or np.isnan(kenlm).any():
        raise InvalidArgumentError("fit_weight: the token log-probabilities hold NaN")
    possible = np.isfinite(np.logaddexp(lm, kenlm))
    if not possible.any():
        raise InvalidArgumentError("fit_weight needs a token that either model gives a "
                                   "probability above 0")
    lm, kenlm = lm[possible], kenlm[possible]
    weight = 0.5
    for _ in range(max_iter):
        with np.errstate(divide="ignore"):  # a weight that reached 0 stays there: log 0
            share = np.exp(np.log(weight) + lm - _mix(lm, kenlm, weight))
        new_weight = float(share.mean())
        if abs(new_weight - weight) < tol:
            return new_weight
        weight = new_weight
    return weight


def kenlm_logprobs(model, words, lm_oov) -> tuple[np.ndarray, np.ndarray]:
    """KenLM's q (the module's OOV rule) of a sentence's scored tokens: ``(logprobs float64
    [n+1] in nats, -inf where q = 0; KenLM's oov flags bool [n+1])``.

    ``words``: the n words as lmonnx's example builder split them; ``lm_oov``: bool [n+1],
    the tokens lmonnx scores as ``<unk>`` (``</s>`` last, never one)."""
    # lmonnx's words hold no whitespace (str.split made them) while kenlm splits its input on
    # ASCII whitespace: joined by spaces, kenlm gets these very words back, one score each.
    scores = list(model.full_scores(" ".join(words), bos=True, eos=True))
    log10 = np.array([s[0] for s in scores], dtype=np.float64)
    kenlm_oov = np.array([s[2] for s in scores], dtype=bool)
    # A word only lmonnx knows gets 0, not KenLM's <unk> mass (which is every unknown word's).
    unknown_to_kenlm_only = kenlm_oov & ~np.asarray(lm_oov, dtype=bool)
    return np.where(unknown_to_kenlm_only, -np.inf, log10 * LN10), kenlm_oov


@dataclass(frozen=True)
class MixedTokenScore:
    """One scored token: ``lm_logprob`` (lmonnx), ``kenlm_logprob`` (KenLM's q under the OOV
    rule: -inf for a word lmonnx knows and KenLM does not), ``logprob`` (the mix), in nats;
    ``lm_oov``: lmonnx scored ``<unk>``; ``kenlm_oov``: KenLM's oov flag."""

    word: str
    lm_logprob: float
    kenlm_logprob: float
    logprob: float
    lm_oov: bool
    kenlm_oov: bool


@dataclass(frozen=True)
class MixReport:
    """Totals of a text under lmonnx alone, KenLM alone (q) and the mix: NLLs in nats
    (``</s>`` counted, ``<s>`` not), ``perplexity = exp(nll / tokens)`` (inf where a token
    has probability 0).  ``kenlm_unknown``: tokens lmonnx knows and KenLM does not (q = 0:
    the KenLM perplexity is infinite when there is one, and the mixed one at weight 0)."""

    corpus: str
    sentences: int
    tokens: int
    weight: float
    kenlm_unknown: int
    lm_nll: float
    kenlm_nll: float
    mixed_nll: float
    lm_perplexity: float
    kenlm_perplexity: float
    mixed_perplexity: float

    def to_dict(self) -> dict:
        return asdict(self)


class _SentenceTokens(NamedTuple):
    """One sentence's scored tokens: log-probabilities float64 [n+1] in nats, flags bool."""

    lm: np.ndarray
    kenlm: np.ndarray
    lm_oov: np.ndarray
    kenlm_oov: np.ndarray


def _corpus_name(source) -> str:
    """How ``Scorer.evaluate`` names a source in its report."""
    if not isinstance(source, (str, os.PathLike)):
        return "<lines>"
    return "<stdin>" if os.fspath(source) == STDIN else os.fspath(source)


def _sentences(source, errors: str):
    """Lines of a path (``"-"``: stdin) or of an iterable of lines, as ``Scorer.evaluate``
    reads them."""
    if isinstance(source, (str, os.PathLike)):
        return require_sentences(source, errors)
    return sentences_of_lines(source, errors)


def _as_kenlm_model(model):
    if isinstance(model, (str, os.PathLike)):
        return load_kenlm(model)
    if not isinstance(model, _kenlm_module().Model):
        raise ArgumentTypeError(f"kenlm_model must be a path or a kenlm.Model, "
                                f"got {type(model).__name__}")
    return model


@dataclass
class _MixTotals:
    """Float64 NLL sums (nats) of sentences added one by one: a report's numbers."""

    sentences: int = 0
    tokens: int = 0
    kenlm_unknown: int = 0
    lm_nll: float = 0.0
    kenlm_nll: float = 0.0
    mixed_nll: float = 0.0

    def add(self, sentence: _SentenceTokens, mixed: np.ndarray) -> None:
        self.sentences += 1
        self.tokens += len(mixed)
        self.kenlm_unknown += int(np.count_nonzero(sentence.kenlm_oov & ~sentence.lm_oov))
        # Each sentence summed on its own, then added, as lmonnx's Totals does: lmonnx's NLL
        # here is `Scorer.evaluate`'s to the last bit.
        self.lm_nll -= float(sentence.lm.sum())
        self.kenlm_nll -= float(sentence.kenlm.sum())
        self.mixed_nll -= float(mixed.sum())

    def report(self, corpus: str, weight: float) -> MixReport:
        if self.sentences == 0:
            raise CorpusError(f"{corpus}: no sentences to evaluate (empty or blank input)")
        return MixReport(
            corpus=corpus, sentences=self.sentences, tokens=self.tokens, weight=weight,
            kenlm_unknown=self.kenlm_unknown, lm_nll=self.lm_nll, kenlm_nll=self.kenlm_nll,
            mixed_nll=self.mixed_nll, lm_perplexity=perplexity_of(self.lm_nll, self.tokens),
            kenlm_perplexity=perplexity_of(self.kenlm_nll, self.tokens),
            mixed_perplexity=perplexity_of(self.mixed_nll, self.tokens))


class MixedScorer:
    """An lmonnx model and a KenLM model mixed per token (the module's rule).

    ``scorer``: an :class:`lmonnx.Scorer`; ``kenlm_model``: a path (:func:`load_kenlm`) or a
    loaded ``kenlm.Model``; ``mix_weight``: L, lmonnx's weight in [0, 1], or ``"auto"`` to
    fit it by EM (:func:`fit_weight`) on ``fit_on``, a held-out text (a path or an iterable
    of lines), never the evaluated one.  :attr:`weight` is the L in use.  Text is read and
    split as ``Scorer.evaluate`` reads it; lmonnx scores it in its batches.
    """

    def __init__(self, scorer: Scorer, kenlm_model, mix_weight: float | str = 0.5, *,
                 fit_on=None):
        if not isinstance(scorer, Scorer):
            raise ArgumentTypeError(f"scorer must be an lmonnx.Scorer, got {type(scorer).__name__}")
        mix_weight = check_mix_weight(mix_weight)
        if mix_weight == AUTO and fit_on is None:
            raise InvalidArgumentError('mix_weight="auto" needs fit_on=, a held-out text to '
                                       "fit the weight on (not the text to evaluate)")
        if mix_weight != AUTO and fit_on is not None:
            raise InvalidArgumentError('fit_on is used only with mix_weight="auto"')
        self.scorer = scorer
        self.kenlm = _as_kenlm_model(kenlm_model)
        self._examples = ExampleBuilder(scorer.vocab)
        self.weight: float = self._fit(fit_on) if mix_weight == AUTO else mix_weight

    def _fit(self, fit_on) -> float:
        # Held-out text only: a weight fitted on the evaluated text is tuned to that very text
        # and flatters the mix's perplexity there (the test set would choose its own model).
        # Fitting keeps every token's two log-probabilities: 16 bytes a token.
        sentences = list(self._scored(_sentences(fit_on, "strict")))
        if not sentences:
            raise CorpusError("fit_on: no sentences to fit the mix weight on (empty or blank)")
        return fit_weight(np.concatenate([s.lm for s in sentences]),
                          np.concatenate([s.kenlm for s in sentences]))

    def _tokens(self, example: Example, lm_logprobs: np.ndarray) -> _SentenceTokens:
        lm_oov = example.targets == UNK_ID
        kenlm, kenlm_oov = kenlm_logprobs(self.kenlm, example.words, lm_oov)
        return _SentenceTokens(lm_logprobs, kenlm, lm_oov, kenlm_oov)

    def _scored(self, lines) -> Iterator[_SentenceTokens]:
        """Each sentence's tokens, in order, streaming: lmonnx scores one look-ahead of
        examples per ``score_examples`` call (the evaluator's chunks, so the same batches
        and bounded memory), KenLM each sentence."""
        for chunk in lookahead_chunks(self._examples.build_all(lines)):
            results = self.scorer.score_examples(chunk, keep_tokens=True)
            for example, result in zip(chunk, results):
                yield self._tokens(example, -result.token_nll)

    def score(self, sentences: Iterable) -> list[SentenceScore]:
        """One :class:`~lmonnx.scorer.SentenceScore` per sentence (``str`` or UTF-8
        ``bytes``), in order, as ``Scorer.score`` gives it (an empty sentence scores ``</s>``
        alone), its ``logprob`` the mix's (nats): lmonnx scores them in one batched call,
        KenLM sentence by sentence."""
        examples = self.scorer.examples(sentences)
        results = self.scorer.score_examples(examples, keep_tokens=True)
        scores = []
        for example, result in zip(examples, results):
            tokens = self._tokens(example, -result.token_nll)
            scores.append(SentenceScore(logprob=float(_mix(tokens.lm, tokens.kenlm,
                                                           self.weight).sum()),
                                        tokens=result.tokens, oovs=result.oovs))
        return scores

    def full_scores(self, sentence) -> list[MixedTokenScore]:
        """Per-token scores of one sentence (``str`` or UTF-8 ``bytes``): its words as
        lmonnx splits them, then ``</s>``; log-probabilities in nats."""
        (example,) = self.scorer.examples([sentence])
        (result,) = self.scorer.score_examples([example], keep_tokens=True)
        tokens = self._tokens(example, -result.token_nll)
        mixed = _mix(tokens.lm, tokens.kenlm, self.weight)
        return [MixedTokenScore(word=word, lm_logprob=float(lm), kenlm_logprob=float(kenlm),
                                logprob=float(mix), lm_oov=bool(lm_oov),
                                kenlm_oov=bool(kenlm_oov))
                for word, lm, kenlm, mix, lm_oov, kenlm_oov in zip(
                    example.words + ("</s>",), tokens.lm, tokens.kenlm, mixed, tokens.lm_oov,
                    tokens.kenlm_oov)]

    def evaluate(self, source: str | os.PathLike | Iterable, *, corpus: str | None = None,
                 errors: str = "strict") -> MixReport:
        """The :class:`MixReport` of a text: a path (``"-"``: stdin) or an iterable of lines
        (``str`` or ``bytes``), read as ``Scorer.evaluate`` reads it (``errors``: "strict"
        or "replace").  Streams: memory holds one look-ahead of sentences, not the text."""
        totals = _MixTotals()
        for sentence in self._scored(_sentences(source, errors)):
            totals.add(sentence, _mix(sentence.lm, sentence.kenlm, self.weight))
        return totals.report(corpus or _corpus_name(source), self.weight)


__all__ = ["LN10", "load_kenlm", "check_mix_weight", "mix_token_logprobs", "fit_weight",
           "kenlm_logprobs", "MixedTokenScore", "MixReport", "MixedScorer"]
