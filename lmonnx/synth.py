"""A synthetic corpus whose likelihood is known exactly: the oracle for training and evaluation.

The text is sampled from a sparse first-order Markov chain over ``words`` word types named
``w0, w1, ...``::

    <s> --start--> w_a --T[a,b]--> w_b --T[b,c]--> w_c --eos[c]--> </s>

- ``start``: a Zipf-like distribution over a few dozen sentence-initial words;
- ``T[i]``: each word has a small set of successors (drawn with Zipf weights over the word
  ranks, so frequent words are frequent successors and the unigram distribution is Zipfian) with
  Zipf-like probabilities, scaled by ``1 - eos[i]``; a ring successor ``w(i+1)`` guarantees that
  every word is reachable, hence frequent enough to enter any vocabulary of ``words + 4`` entries;
- ``eos[i]``: the word's probability of ending the sentence (about 10 words per sentence).

A sentence ``w1 .. wn`` scores ``log start[w1] + sum log T[w_k, w_k+1] + log eos[wn]`` nats
over n+1 tokens (the words and one ``</s>``), exactly as ``lmonnx evaluate`` counts them. So
the true perplexity of a text, ``exp(sum NLL / tokens)``, is known, and a language model trained
on the corpus approaches it from above. The entropy rate (expected NLL per token of the process)
follows from the expected visits ``start (I - Q)^-1`` of the absorbing chain, summed over the
successor lists: nothing is ever a dense ``words x words`` matrix, so ``--words 40000`` takes
seconds and tens of MB.

Randomness: one ``SeedSequence(seed)`` spawns independent streams for the chain and for each
split, so the test text does not change when only the train size does.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from lmonnx.atomic import write_atomic
from lmonnx.errors import InvalidArgumentError, PathExistsError
from lmonnx.validation import check_int

SYNTH_FORMAT = "lmonnx-synth/1"
SPLITS = ("train", "valid", "test")

DEFAULT_WORDS = 300
DEFAULT_TRAIN_SENTENCES = 15_000
DEFAULT_VALID_SENTENCES = 2_000
DEFAULT_TEST_SENTENCES = 2_000
VISITS_TOLERANCE = 1e-17
"""expected_visits stops when the mass still in the chain is this fraction of the visits."""


class MarkovChain:
    """A sparse first-order chain over words with an end-of-sentence probability per word.

    ``start``: float64 [V] (sums to 1); ``successors[i]``: int64 [K_i] distinct word ids;
    ``probs[i]``: float64 [K_i], summing to ``1 - eos[i]``; ``eos``: float64 [V] in (0, 1).
    """

    def __init__(self, start, successors, probs, eos, names=None):
        self.start = np.asarray(start, dtype=np.float64)
        v = self.start.shape[0]
        self.successors = [np.asarray(s, dtype=np.int64) for s in successors]
        self.probs = [np.asarray(p, dtype=np.float64) for p in probs]
        self.eos = np.asarray(eos, dtype=np.float64)
        self.names = tuple(names) if names is not None else tuple(f"w{i}" for i in range(v))
        if not (len(self.successors) == len(self.probs) == self.eos.shape[0] == len(self.names) == v):
            raise InvalidArgumentError("start, successors, probs, eos and names must all cover the same words")
        if not math.isclose(self.start.sum(), 1.0, rel_tol=1e-9) or (self.start < 0).any():
            raise InvalidArgumentError("start must be a probability distribution")
        if not ((self.eos > 0) & (self.eos < 1)).all():
            raise InvalidArgumentError("eos probabilities must lie in (0, 1)")
        for i, (s, p) in enumerate(zip(self.successors, self.probs)):
            if s.shape != p.shape or len(set(s.tolist())) != len(s) or (p <= 0).any():
                raise InvalidArgumentError(f"word {i}: successors must be distinct with positive probabilities")
            if not math.isclose(p.sum() + self.eos[i], 1.0, rel_tol=1e-9):
                raise InvalidArgumentError(f"word {i}: successor and eos probabilities must sum to 1")
        self._index = {name: i for i, name in enumerate(self.names)}
        self._visits: np.ndarray | None = None  # expected_visits(), computed once
        # Log-probabilities keyed by (word, next word) for exact scoring, cumulative tables for
        # sampling: the outcome after a word is one of its successors or -1 (end of sentence).
        self._log_start = {i: math.log(p) for i, p in enumerate(self.start.tolist()) if p > 0}
        self._log_trans = [dict(zip(s.tolist(), np.log(p).tolist()))
                           for s, p in zip(self.successors, self.probs)]
        self._log_eos = np.log(self.eos).tolist()
        self._start_cum = np.cumsum(self.start).tolist()
        self._start_cum[-1] = 1.0
        self._next_cum = []
        self._next_out = []
        for s, p, e in zip(self.successors, self.probs, self.eos.tolist()):
            cum = np.cumsum(np.append(p, e)).tolist()
            cum[-1] = 1.0
            self._next_cum.append(cum)
            self._next_out.append(s.tolist() + [-1])

    # ---- construction

    @classmethod
    def random(cls, words: int = DEFAULT_WORDS, rng: np.random.Generator | None = None, *,
               zipf: float = 0.6, successors: tuple[int, int] = (12, 32), successor_zipf: float = 0.9,
               eos: tuple[float, float] = (0.04, 0.16), starters: int = 40) -> "MarkovChain":
        """Draw a chain over ``words`` types in O(words x successors) time and memory.

        ``zipf``: exponent of the rank weights used to pick successors and starters (the corpus'
        unigram shape); ``successors``: inclusive range of successor-set sizes;
        ``successor_zipf``: exponent of the probabilities within a set; ``eos``: range of the
        per-word end probabilities; ``starters``: how many words may start a sentence.
        """
        v = check_int("words", words, low=2)
        rng = np.random.default_rng(0) if rng is None else rng
        rank_w = 1.0 / np.arange(1, v + 1) ** zipf
        draw = _RankDraw(rank_w)
        lo, hi = successors
        succ_list, prob_list = [], []
        eos_p = rng.uniform(eos[0], eos[1], size=v)
        for i in range(v):
            k = int(min(rng.integers(lo, hi + 1), v))
            ring = (i + 1) % v
            others = draw.without(rng, k - 1, excluded=ring)
            succ = rng.permutation(np.append(others, ring))  # the ring successor at a random rank
            p = 1.0 / np.arange(1, k + 1) ** successor_zipf
            succ_list.append(succ)
            prob_list.append(p / p.sum() * (1.0 - eos_p[i]))
        n_start = min(starters, v)
        start_words = rng.choice(v, size=n_start, replace=False, p=rank_w / rank_w.sum())
        start = np.zeros(v)
        sp = 1.0 / np.arange(1, n_start + 1) ** successor_zipf
        start[start_words] = sp / sp.sum()
        return cls(start, succ_list, prob_list, eos_p)

    # ---- sampling and scoring

    def __len__(self) -> int:
        return len(self.names)

    def sample_ids(self, rng: np.random.Generator) -> list[int]:
        """One sentence as word ids (at least one word)."""
        i = bisect.bisect_right(self._start_cum, rng.random())
        out = [i]
        while True:
            j = self._next_out[i][bisect.bisect_right(self._next_cum[i], rng.random())]
            if j < 0:
                return out
            out.append(j)
            i = j

    def sample_sentence(self, rng: np.random.Generator) -> list[str]:
        names = self.names
        return [names[i] for i in self.sample_ids(rng)]

    def log_prob(self, sentence_words) -> float:
        """Natural-log probability of one sentence (words as names or ids), ``</s>`` included.

        ``-inf`` for a sentence the chain cannot produce (an empty one included).
        """
        ids = [self._index[w] if isinstance(w, str) else int(w) for w in sentence_words]
        if not ids:
            return -math.inf
        lp = self._log_start.get(ids[0], -math.inf)
        for a, b in zip(ids, ids[1:]):
            lp += self._log_trans[a].get(b, -math.inf)
        return lp + self._log_eos[ids[-1]]

    # ---- closed-form properties (sparse: O(words x successors) memory for any size)

    def expected_visits(self) -> np.ndarray:
        """Expected occurrences of each word per sentence, float64 [V]: ``start (I - Q)^-1``
        for the substochastic transition matrix Q, summed as the series ``sum_k start Q^k``
        over the successor lists until the mass still in the chain is below float64
        resolution (it shrinks by at least ``1 - min(eos)`` per step)."""
        if self._visits is None:
            rows = np.repeat(np.arange(len(self)), [len(s) for s in self.successors])
            cols = np.concatenate(self.successors)
            weights = np.concatenate(self.probs)
            visits, step = self.start.copy(), self.start
            while step.sum() > VISITS_TOLERANCE * visits.sum():
                step = np.bincount(cols, weights=step[rows] * weights, minlength=len(self))
                visits += step
            self._visits = visits
        return self._visits

    def expected_tokens(self) -> float:
        """Expected scored tokens per sentence (words plus one ``</s>``)."""
        return float(self.expected_visits().sum()) + 1.0

    def entropy_rate(self) -> float:
        """Expected NLL per token in nats: E[sentence NLL] / E[tokens per sentence]."""
        def h(p):
            p = p[p > 0]
            return float(-(p * np.log(p)).sum())
        row_h = np.array([h(np.append(p, e)) for p, e in zip(self.probs, self.eos)])
        expected_nll = h(self.start) + float(self.expected_visits() @ row_h)
        return expected_nll / self.expected_tokens()


class _RankDraw:
    """``rng.choice(V, size, replace=False, p=w / w.sum())`` with ``w`` the rank weights and one
    index excluded (weight 0): the same indices from the same random numbers as NumPy, without
    NumPy's O(V) normalised copy and cumulative sum per call.

    NumPy draws ``size - found`` uniforms per round, maps each through the cumulative
    distribution of the weights not yet taken (``searchsorted(side="right")``) and keeps the
    first occurrence of each new index.  Here that distribution is the cumulative sum of all
    weights, computed once, minus the few excluded ones.  Its rounding differs from NumPy's by
    far less than ``tolerance``; a uniform that close to a boundary is mapped through NumPy's
    own arithmetic instead, so the result is the same bit for bit.
    """

    def __init__(self, weights: np.ndarray):
        self.weights = weights
        self.cumulative = np.cumsum(weights)
        self.tolerance = 16.0 * (len(weights) + 1) * np.finfo(np.float64).eps

    def without(self, rng: np.random.Generator, size: int, *, excluded: int) -> np.ndarray:
        """``size`` distinct indices (int64 [size]), never ``excluded``."""
        found: list[int] = []
        while len(found) < size:
            uniforms = rng.random(size - len(found))
            for index in self._invert(uniforms, excluded, found):
                if index not in found:  # NumPy keeps the first of a round's repeats
                    found.append(index)
        return np.array(found, dtype=np.int64)

    def _invert(self, uniforms: np.ndarray, excluded: int, found: list[int]) -> list[int]:
        zeroed = np.array(sorted([excluded, *found]), dtype=np.int64)
        zeroed_cum = np.concatenate(([0.0], np.cumsum(self.weights[zeroed])))
        total = self.cumulative[-1] - zeroed_cum[-1]
        last = len(self.weights) - 1

        def kept_mass(j):  # weight of the indices <= j that are not zeroed
            return self.cumulative[j] - zeroed_cum[np.searchsorted(zeroed, j, side="right")]

        targets = uniforms * total
        j = np.minimum(np.searchsorted(self.cumulative, targets, side="right"), last)
        for _ in range(len(zeroed) + 1):  # the first j whose kept mass exceeds the target
            short = kept_mass(j) <= targets
            if not short.any():
                break
            lifted = targets + zeroed_cum[np.searchsorted(zeroed, j, side="right")]
            j = np.where(short, np.minimum(np.searchsorted(self.cumulative, lifted,
                                                           side="right"), last), j)
        below = np.where(j > 0, kept_mass(np.maximum(j - 1, 0)), 0.0)
        margin = np.minimum(kept_mass(j) - targets, targets - below) / total
        if (margin <= self.tolerance).any():
            return self._numpy_invert(uniforms, excluded, found)
        return j.tolist()

    def _numpy_invert(self, uniforms: np.ndarray, excluded: int, found: list[int]) -> list[int]:
        """NumPy's own arithmetic (``Generator.choice``): normalise, zero, cumsum, renormalise."""
        w = self.weights.copy()
        w[excluded] = 0.0
        p = w / w.sum()
        p[found] = 0.0
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        return cdf.searchsorted(uniforms, side="right").tolist()


def make_chain(seed: int = 0, words: int = DEFAULT_WORDS) -> MarkovChain:
    """The chain that :func:`write_corpus` uses for ``seed`` and ``words``."""
    chain_seq, *_ = np.random.SeedSequence(seed).spawn(1 + len(SPLITS))
    return MarkovChain.random(words, np.random.default_rng(chain_seq))


def sample_splits(seed: int = 0, words: int = DEFAULT_WORDS, *,
                  progress: Callable[[str], None] | None = None, **sizes: int):
    """(chain, {split: list of sentences as word-name lists}) for ``sizes`` like ``train=100``;
    ``progress`` is called with a line before each stage."""
    say = progress or (lambda message: None)
    seed = check_int("seed", seed, low=0)
    chain_seq, *split_seqs = np.random.SeedSequence(seed).spawn(1 + len(SPLITS))
    say(f"drawing a Markov chain over {words} words")
    chain = MarkovChain.random(words, np.random.default_rng(chain_seq))
    out = {}
    for name, seq in zip(SPLITS, split_seqs):
        n = check_int(f"{name}_sentences", sizes.get(name, 0), low=0)
        say(f"sampling {n} {name} sentences")
        rng = np.random.default_rng(seq)
        out[name] = [chain.sample_sentence(rng) for _ in range(n)]
    return chain, out


def _is_synth_output(truth: Path) -> bool:
    """True when ``truth`` is the ``truth.json`` :func:`write_corpus` writes."""
    try:
        return json.loads(truth.read_text(encoding="utf-8")).get("format") == SYNTH_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before any work, an ``out_dir`` that is a file, or one holding our files'
    names without ``force``, or (even with ``force``) a user's own corpus: no synth truth.json."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PathExistsError(f"{out_dir} exists and is not a directory")
    targets = [out_dir / f"{s}.txt" for s in SPLITS] + [out_dir / "truth.json"]
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise PathExistsError(f"{existing[0]} already exists; pass --force to overwrite")
    if existing and not _is_synth_output(out_dir / "truth.json"):
        # --force replaces a corpus this command wrote, never a user's own train.txt & co.
        raise PathExistsError(f"{existing[0]} exists and {out_dir} holds no lmonnx synth "
                              "truth.json: not overwriting it even with --force; choose "
                              "another --out")


def write_corpus(out_dir, *, seed: int = 0, words: int = DEFAULT_WORDS,
                 train_sentences: int = DEFAULT_TRAIN_SENTENCES,
                 valid_sentences: int = DEFAULT_VALID_SENTENCES,
                 test_sentences: int = DEFAULT_TEST_SENTENCES, force: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Sample the corpus into ``out_dir``/{train,valid,test}.txt and write ``truth.json``.

    Returns the summary stored in ``truth.json``: seed, words, sentences and tokens per split,
    the exact NLL (nats) and true perplexity of each split's text, and the chain's entropy rate
    (nats per token).  Existing files are an error unless ``force``.  ``progress`` is called
    with a line before each stage (drawing the chain, sampling each split, the entropy rate).
    """
    seed, words = check_int("seed", seed, low=0), check_int("words", words, low=2)
    sizes = {name: check_int(f"{name}_sentences", n) for name, n in
             zip(SPLITS, (train_sentences, valid_sentences, test_sentences))}
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)

    chain, texts = sample_splits(seed, words, progress=progress, **sizes)
    if progress is not None:
        progress("computing the entropy rate")
    summary = {"format": SYNTH_FORMAT, "seed": seed, "words": words,
               "sentences": {}, "tokens": {}, "nll": {}, "true_perplexity": {},
               "entropy_rate_nats": chain.entropy_rate(),
               "expected_tokens_per_sentence": chain.expected_tokens()}
    summary["entropy_rate_perplexity"] = math.exp(summary["entropy_rate_nats"])
    for name in SPLITS:
        sentences = texts[name]
        tokens = sum(len(s) + 1 for s in sentences)
        nll = -math.fsum(chain.log_prob(s) for s in sentences)
        summary["sentences"][name] = len(sentences)
        summary["tokens"][name] = tokens
        summary["nll"][name] = nll
        summary["true_perplexity"][name] = math.exp(nll / tokens)
        write_atomic(out_dir / f"{name}.txt", "".join(" ".join(s) + "\n" for s in sentences))
    write_atomic(out_dir / "truth.json", json.dumps(summary, indent=2) + "\n")
    return summary
