"""The factored (adaptive) softmax: exact, normalized word probabilities at a fraction of the
full output layer's cost.  No TensorFlow here: the cluster layout both training and scoring
use, and the tails' arithmetic at scoring time.

The vocabulary is frequency-ordered (ids 0..3 the specials, then words by count), so the
``cutoffs`` ``[c_0, c_1, ..., V]`` split it into a head ``[0, c_0)`` and tail clusters
``[c_k, c_{k+1})``.  With h the last LSTM layer's output (float32 [units])::

    head      logits over the head words and one token per cluster    [c_0 + clusters]
    tail k    (h @ P_k) @ W_k + b_k over the words of cluster k          [c_{k+1} - c_k]

    log p(w | h) = log_softmax(head)[w]                                    w in the head
                 = log_softmax(head)[c_0 + k] + log_softmax(tail k)[w - c_k]  w in cluster k

exactly (Goodman 2001; Grave et al. 2017, "Efficient softmax approximation for GPUs"; PyTorch's
``nn.AdaptiveLogSoftmaxWithLoss``).  ``P_k`` projects ``units`` to ``units / 4**(k+1)``: the rarer a
word, the narrower its cluster.  Scoring a target costs the head plus its own cluster only.

:class:`TailLayers` computes the tails from float32 weights (numpy BLAS); ``lmonnx.runtime``
reads them from the ``.onnx`` (initializers named by :func:`tail_names`) and gets the head and
the hidden states from onnxruntime.  The padding-masked cross-entropy over the head and each
gathered cluster is the C kernel's (:func:`lmonnx.xent.token_nll_and_hits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from lmonnx.errors import InvalidArgumentError
from lmonnx.xent import token_nll_and_hits, token_nll_hits_and_max

SOFTMAX_CHOICES = ("full", "adaptive")
DEFAULT_CUTOFFS = (2000, 10000, 50000, 200000)
"""The head holds the 2,000 most frequent words (Grave et al.'s choice for text8 and
Europarl); each further cluster is about five times the one before it."""
TAIL_SHRINK = 4
"""The default divisor of the tails' widths: cluster k's projection is ``units // 4**(k+1)``
wide (at least 1), PyTorch's ``div_value``."""
SPECIALS = 4


def default_cutoffs(vocab_size: int) -> list[int]:
    """The head/cluster boundaries for a vocabulary of ``vocab_size`` ids (the last one,
    ``vocab_size``, included): :data:`DEFAULT_CUTOFFS` below it, or half the vocabulary as
    the head of a small one."""
    cuts = [c for c in DEFAULT_CUTOFFS if c < vocab_size]
    if not cuts:
        cuts = [max(SPECIALS + 1, vocab_size // 2)]
    return [*cuts, vocab_size]


def check_cutoffs(cutoffs: Sequence[int] | None, vocab_size: int) -> list[int]:
    """``cutoffs`` (the boundaries below ``vocab_size``; None: :func:`default_cutoffs`) as the
    full list ending in ``vocab_size``; ``InvalidArgumentError`` unless increasing integers
    between the specials and the vocabulary size."""
    if cutoffs is None:
        return default_cutoffs(vocab_size)
    cuts = list(cutoffs)
    if cuts and cuts[-1] == vocab_size:
        cuts = cuts[:-1]
    if not cuts or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in cuts):
        raise InvalidArgumentError(f"--cutoffs must be one or more integers, got {cutoffs!r}")
    if cuts[0] <= SPECIALS or cuts[-1] >= vocab_size or any(
            b <= a for a, b in zip(cuts, cuts[1:])):
        raise InvalidArgumentError(
            f"--cutoffs {','.join(map(str, cuts))}: increasing, above the {SPECIALS} special "
            f"ids and below the vocabulary's {vocab_size} ids")
    return [int(c) for c in cuts] + [vocab_size]


def tail_dims(units: int, clusters: int, div: int = TAIL_SHRINK) -> list[int]:
    """Each cluster's projection width: ``units // div**(k+1)``, at least 1."""
    return [max(1, units // div ** (k + 1)) for k in range(clusters)]


def tail_names(k: int) -> tuple[str, str, str]:
    """The ``.onnx`` initializer names of cluster ``k``'s projection [units, dim], kernel
    [dim, size] and bias [size]."""
    return (f"lmonnx_tail_{k}_projection", f"lmonnx_tail_{k}_kernel", f"lmonnx_tail_{k}_bias")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class TailLayers:
    """The tail clusters of a factored output layer, float32.

    ``cutoffs``: ``[c_0, ..., V]`` (head ``[0, c_0)``, cluster k ``[c_k, c_{k+1})``);
    ``projections[k]`` [units, dim_k], ``kernels[k]`` [dim_k, size_k], ``biases[k]`` [size_k].
    """

    cutoffs: tuple[int, ...]
    projections: tuple[np.ndarray, ...]
    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    runner: Callable[[int, np.ndarray], np.ndarray] | None = field(default=None, compare=False)
    """What computes ``tail_logits`` (runtime: an onnxruntime session per cluster, whose
    numbers for a row do not depend on the other rows of the call -- numpy's BLAS picks
    other kernels for one row than for many, which would make a sentence's score depend on
    its batch); None: numpy."""

    @property
    def head_size(self) -> int:
        return self.cutoffs[0]

    @property
    def clusters(self) -> int:
        return len(self.cutoffs) - 1

    @property
    def vocab_size(self) -> int:
        return self.cutoffs[-1]

    def tail_logits(self, k: int, hidden: np.ndarray) -> np.ndarray:
        """float32 [n, size_k] logits of cluster ``k`` for hidden rows [n, units]."""
        if self.runner is not None:
            return self.runner(k, np.ascontiguousarray(hidden, np.float32))
        return (hidden @ self.projections[k]) @ self.kernels[k] + self.biases[k]

    def cluster_of(self, ids: np.ndarray) -> np.ndarray:
        """-1 for head ids, k for ids in cluster k (int array, the shape of ``ids``)."""
        return np.searchsorted(np.asarray(self.cutoffs[:-1]), ids, side="right") - 1

    def log_probs(self, head_logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """float32 [..., V] log-probabilities over the whole vocabulary (nats, normalized)
        from the head's logits [..., c_0 + clusters] and the hidden states [..., units]: every
        cluster computed at every position (the next-word distribution)."""
        lead = head_logits.shape[:-1]
        head = _log_softmax(head_logits.reshape(-1, head_logits.shape[-1]).astype(np.float32))
        rows = hidden.reshape(-1, hidden.shape[-1])
        out = np.empty((head.shape[0], self.vocab_size), np.float32)
        c0 = self.head_size
        out[:, :c0] = head[:, :c0]
        for k in range(self.clusters):
            lo, hi = self.cutoffs[k], self.cutoffs[k + 1]
            out[:, lo:hi] = head[:, c0 + k, None] + _log_softmax(self.tail_logits(k, rows))
        return out.reshape(*lead, self.vocab_size)

    def target_scores(self, head_logits: np.ndarray, hidden: np.ndarray, targets: np.ndarray,
                      mask: np.ndarray | None = None, *, num_threads: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(nll float64 [...] in nats, 0 where masked; top-1 hits bool [...]) of ``targets``
        (int [...]) under the full distribution, computing a cluster only where needed.

        The NLL is the kernel's over the head (label: the word, or its cluster's token) plus
        the kernel's over each cluster's gathered rows.  A hit is the target being the first
        argmax over all V words (``log_probs(...).argmax(-1) == targets``, exactly): a word
        of cluster k never beats log p(cluster k), so cluster k is computed for a position
        only when its token's log-probability reaches the target's while the target beats
        every head word."""
        targets = np.asarray(targets)
        c0 = self.head_size
        cluster = self.cluster_of(targets)
        head_labels = np.where(cluster < 0, targets, c0 + cluster)
        nll, head_hit, head_max = token_nll_hits_and_max(head_logits, head_labels, mask,
                                                         num_threads=num_threads)
        real = (np.ones(targets.shape, bool) if mask is None else np.asarray(mask) != 0)
        head_nll = nll.reshape(-1).copy()
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_nll, flat_targets = nll.reshape(-1), targets.reshape(-1)
        flat_cluster, flat_real = cluster.reshape(-1), real.reshape(-1)
        in_cluster_hit = np.zeros(flat_nll.shape, bool)
        for k in range(self.clusters):
            rows = np.flatnonzero(flat_real & (flat_cluster == k))
            if not len(rows):
                continue
            logits = self.tail_logits(k, flat_hidden[rows])
            tail_nll, tail_hit = token_nll_and_hits(
                logits, flat_targets[rows] - self.cutoffs[k], num_threads=num_threads)
            flat_nll[rows] += tail_nll
            in_cluster_hit[rows] = tail_hit
        hits = self._hits(head_logits.reshape(-1, head_logits.shape[-1]), flat_hidden,
                          flat_targets, head_labels.reshape(-1), flat_cluster, flat_real,
                          head_nll, flat_nll, head_hit.reshape(-1), head_max.reshape(-1),
                          in_cluster_hit)
        return nll, hits.reshape(targets.shape)

    def _hits(self, head, hidden, targets, head_labels, cluster, real, head_nll, nll,
              head_hit, head_max, in_cluster_hit) -> np.ndarray:
        """Exact first-argmax hits over all V words (see :meth:`target_scores`), bool
        [positions], from the head's logits [positions, c_0 + clusters] and their row maxima
        (the kernel's, over words and cluster tokens alike)."""
        c0 = self.head_size
        hits = np.zeros(len(targets), bool)
        logp = -nll  # the target's log-probability, nats (NaN rows are never hits)
        is_head = cluster < 0
        # The kernel's head hit for a head target (first argmax of the head, cluster tokens
        # included) settles it: every word of cluster k has log p <= log p(cluster k).
        settled = real & is_head & head_hit
        hits[settled] = True
        rows = np.flatnonzero(real & np.isfinite(logp) & ~settled
                              & (is_head | in_cluster_hit))
        if not len(rows):
            return hits
        lse = head[rows, head_labels[rows]].astype(np.float64) + head_nll[rows]
        # The best head word's logit: the row's maximum unless a cluster token reaches it;
        # only those rows (few: a handful of columns compared) need a pass over the words.
        best = head_max[rows]
        open_rows = np.flatnonzero(head[rows, c0:].max(axis=1) >= best)
        if len(open_rows):
            best[open_rows] = head[rows[open_rows], :c0].max(axis=1)
        ok = np.where(is_head[rows], head[rows, np.where(is_head[rows], targets[rows], 0)] >= best,
                      logp[rows] > best - lse)
        # a head target equal to the best must also be its first: argmax on those rows only
        tied = np.flatnonzero(ok & is_head[rows])
        if len(tied):
            ok[tied] = head[rows[tied], :c0].argmax(axis=1) == targets[rows[tied]]
        cluster_logp = head[rows, c0:] - lse[:, None]  # [n, clusters]
        for k in range(self.clusters):
            need = ok & (cluster[rows] != k) & (cluster_logp[:, k] >= logp[rows])
            if not need.any():
                continue
            sub = rows[need]
            tail = self.tail_logits(k, hidden[sub])
            # log p of the cluster's best word: the kernel's NLL at its argmax (one pass in
            # C, float64 sums) rather than a float64 copy of the rows for a log-sum-exp
            best_nll, _ = token_nll_and_hits(tail, tail.argmax(axis=1), num_threads=1)
            tail_max = cluster_logp[need, k] - best_nll
            # Cluster k's words come after the target (a tie goes to the target) when the
            # target is in the head or in an earlier cluster; before it otherwise.
            after = cluster[sub] < k
            beats = np.where(after, tail_max > logp[sub], tail_max >= logp[sub])
            ok[np.flatnonzero(need)[beats]] = False
        hits[rows] = ok
        return hits
