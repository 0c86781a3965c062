"""From word ids to padded, length-bucketed, token-budgeted batches (training and evaluation).

A sentence ``w1 .. wn`` becomes one (input, target) pair of n+1 positions; the target is the
input shifted by one, so every word and the closing ``</s>`` is predicted exactly once::

    sentence            the  cat  sat
    inputs      <s>     the  cat  sat          [2, 4, 9, 17]
                 |       |    |    |
                 v       v    v    v
    targets     the     cat  sat  </s>         [4, 9, 17, 3]

Pairs of different lengths share a batch by padding with 0 at the end; the mask is
``sign(inputs)`` as in the course (every real input id is >= 1, so mask == "position is real")::

                      t=0  1  2  3  4
    inputs    row 0 [  2  4  9 17  0 ]   mask [ 1 1 1 1 0 ]   length 4
              row 1 [  2  5  0  0  0 ]        [ 1 1 0 0 0 ]   length 2
              row 2 [  2  6  7  8 11 ]        [ 1 1 1 1 1 ]   length 5
    targets   row 0 [  4  9 17  3  0 ]
              row 1 [  5  3  0  0  0 ]
              row 2 [  6  7  8 11  3 ]

With right padding a causal LSTM's outputs at real positions never see the padding, so a
sentence's score does not depend on which other sentences share its batch.

Bucketing keeps padding small: :func:`bucketed_batches` reads a bounded window of
``lookahead`` items, sorts it by length, and cuts consecutive runs into batches whose padded
size ``B * T_max`` stays within ``max_tokens``::

    lookahead chunk (sorted by length)    batches (max_tokens = 12, max_batch_size = 4)
    len 2 2 3 3 3 5 6 6 14           ->   [2 2 3 3] 4x3=12 | [3 5] 2x5=10 | [6 6] 2x6=12 | [14] alone

With ``call_cost`` the cut minimises padded positions plus ``call_cost`` per batch instead
(scoring: a few sentences of mixed lengths become two or three batches, not one padded to the
longest).  An item longer than ``max_tokens`` becomes a batch of its own and is never
truncated.  For training, :func:`split_windows` cuts sentences longer than ``max_length``
into consecutive windows first, so no token is dropped either (the LSTM state restarts at
each window).

Training does not sort a whole chunk: every batch would then hold sentences of one length, and
the gradient would see a biased sample at every step.  The trainer's default is
:func:`packed_batches`: the plain loop's random batches, each laid end to end in fewer rows by
:func:`pack_rows`, with the LSTM state restarting at each sequence (``carry`` 0)::

    random batch, padded (B = 4, T = 6)        packed (2 rows, T = 6)
    [a a a a a a]                              [a a a a a a]    carry [0 1 1 1 1 1]
    [b b 0 0 0 0]                              [c c c b b d]          [0 1 1 0 1 0]
    [c c c 0 0 0]
    [d 0 0 0 0 0]

:func:`padded_batches` (``lmonnx train --no-pack``) pads the same random batches instead.
That is the course recipe's; the tied recipe (the default) trains on :func:`stream_windows`:
the shuffled sentences end to end in ``columns`` rows, cut into windows that carry the LSTM
state from one to the next, no padding but at the very end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator, Sequence

import numpy as np

from lmonnx.errors import InvalidArgumentError
from lmonnx.validation import check_int
from lmonnx.vocab import BOS_ID, EOS_ID, PAD_ID


def make_pair(word_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sentence ids ``w1..wn`` -> (inputs ``[BOS, w1..wn]``, targets ``[w1..wn, EOS]``), int32, n+1."""
    words = np.asarray(word_ids, dtype=np.int32).ravel()
    n = words.shape[0]
    inputs = np.empty(n + 1, dtype=np.int32)
    targets = np.empty(n + 1, dtype=np.int32)
    inputs[0] = BOS_ID
    inputs[1:] = words
    targets[:n] = words
    targets[n] = EOS_ID
    return inputs, targets


def split_windows(inputs, targets, max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut one pair into consecutive windows of at most ``max_length`` positions (no token dropped)."""
    check_int("max_length", max_length)
    inputs = np.asarray(inputs)
    targets = np.asarray(targets)
    if inputs.shape != targets.shape or inputs.ndim != 1:
        raise InvalidArgumentError(f"inputs and targets must be 1-D of equal length, got {inputs.shape} "
                         f"and {targets.shape}")
    n = inputs.shape[0]
    if n <= max_length:
        return [(inputs, targets)]
    return [(inputs[i:i + max_length], targets[i:i + max_length]) for i in range(0, n, max_length)]


class _Positions:
    """What a padded batch and a packed one both report, from ``inputs`` and ``lengths``."""

    inputs: np.ndarray
    lengths: np.ndarray

    @property
    def tokens(self) -> int:
        """Real (scored) positions in the batch."""
        return int(self.lengths.sum())

    @property
    def padding_fraction(self) -> float:
        """Share of the batch's positions that are padding."""
        size = self.inputs.size
        return 0.0 if size == 0 else 1.0 - self.tokens / size


@dataclass
class Batch(_Positions):
    """B pairs padded to the longest, T positions.

    inputs, targets: int32 [B, T], 0 after each row's length; mask: float32 [B, T] = sign(inputs);
    lengths: int64 [B]; keys: one caller-given key per row, in row order.
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    keys: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.inputs.shape[0]


def pad_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray]], keys: Sequence | None = None) -> Batch:
    """Pad (inputs, targets) pairs with 0 at the end into one :class:`Batch`.

    ``keys`` default to the row numbers ``0 .. B-1``.
    """
    b = len(pairs)
    if b == 0:
        raise InvalidArgumentError("cannot make a batch of no pairs")
    if keys is None:
        keys = list(range(b))
    elif len(keys) != b:
        raise InvalidArgumentError(f"got {len(keys)} keys for {b} pairs")
    lengths = np.empty(b, dtype=np.int64)
    for r, (x, y) in enumerate(pairs):
        if len(x) != len(y):
            raise InvalidArgumentError(f"row {r}: inputs have {len(x)} positions, targets {len(y)}")
        lengths[r] = len(x)
    t = int(lengths.max())
    inputs = np.full((b, t), PAD_ID, dtype=np.int32)
    targets = np.full((b, t), PAD_ID, dtype=np.int32)
    for r, (x, y) in enumerate(pairs):
        n = lengths[r]
        inputs[r, :n] = x
        targets[r, :n] = y
    mask = np.sign(inputs).astype(np.float32)
    return Batch(inputs, targets, mask, lengths, list(keys))


def bucketed_batches(items: Iterable[tuple[object, np.ndarray, np.ndarray]], *, max_tokens: int,
                     max_batch_size: int, lookahead: int = 4096,
                     rng: np.random.Generator | None = None,
                     call_cost: int | None = None) -> Iterator[Batch]:
    """Stream ``(key, inputs, targets)`` items into length-bucketed, token-budgeted batches.

    Reads at most ``lookahead`` items at a time (memory is bounded by it, not by the input),
    sorts them by length and cuts consecutive runs into batches with ``B * T_max <= max_tokens``
    and ``B <= max_batch_size``: as few batches as the caps allow, or, with ``call_cost``
    (padded positions one more batch is worth), the cut with the fewest padded positions plus
    ``call_cost`` per batch.  An item longer than ``max_tokens`` is a batch of its own, whole.
    Every item appears in exactly one batch.

    Without ``rng`` the result is deterministic (ties keep input order). With ``rng`` (training)
    each chunk is shuffled before the stable sort, so equal lengths meet in random order, and
    the chunk's batches are yielded in random order.
    """
    # Validate now, not at the first next(): a bad budget is the caller's error at the call.
    max_tokens = check_int("max_tokens", max_tokens)
    max_batch_size = check_int("max_batch_size", max_batch_size)
    lookahead = check_int("lookahead", lookahead)
    if call_cost is not None:
        call_cost = check_int("call_cost", call_cost, low=0)
    return _bucketed(iter(items), max_tokens, max_batch_size, lookahead, rng, call_cost)


def _greedy_groups(chunk: list, max_tokens: int, max_batch_size: int) -> list[list]:
    """Sorted ``chunk`` cut into the fewest consecutive runs within the caps, each run as long
    as the budget allows."""
    groups: list[list] = []
    current: list = []
    for item in chunk:
        n = len(item[1])
        if n > max_tokens:
            if current:
                groups.append(current)
                current = []
            groups.append([item])
            continue
        # Sorted ascending, so the newcomer sets T_max of the grown batch.
        if current and ((len(current) + 1) * n > max_tokens or len(current) >= max_batch_size):
            groups.append(current)
            current = []
        current.append(item)
    if current:
        groups.append(current)
    return groups


def _cheapest_groups(chunk: list, max_tokens: int, max_batch_size: int,
                     call_cost: int) -> list[list]:
    """Sorted ``chunk`` cut into consecutive runs within the caps that minimise the padded
    positions computed plus ``call_cost`` for each run (dynamic programming over the cut
    points: O(len(chunk) x max_batch_size)).  Items longer than ``max_tokens`` (the tail of
    the sorted chunk) are runs of their own."""
    lengths = [len(item[1]) for item in chunk]
    fitting = len(lengths)
    while fitting and lengths[fitting - 1] > max_tokens:
        fitting -= 1
    best = np.zeros(fitting + 1, dtype=np.int64)  # best[j]: the cheapest cut of the first j
    start = [0] * (fitting + 1)  # where the last run of that cut starts
    index = np.arange(fitting + 1, dtype=np.int64)
    for j in range(1, fitting + 1):
        n = lengths[j - 1]  # the run's T_max: sorted ascending
        first = j - min(max_batch_size, max_tokens // n if n else max_batch_size, j)
        # A run i..j costs call_cost + (j - i) * n: minimise best[i] - i * n over the window
        # (vectorised: a look-ahead of 4096 sentences takes ~16 ms, not ~36 ms in a generator;
        # argmin takes the first of equal costs, so the cut is deterministic).
        costs = best[first:j] - index[first:j] * n
        k = int(costs.argmin())
        start[j] = first + k
        best[j] = costs[k] + call_cost + j * n
    groups: list[list] = []
    j = fitting
    while j:
        groups.append(chunk[start[j]:j])
        j = start[j]
    groups.reverse()
    return groups + [[item] for item in chunk[fitting:]]


def _bucketed(it, max_tokens: int, max_batch_size: int, lookahead: int,
              rng: np.random.Generator | None, call_cost: int | None) -> Iterator[Batch]:
    while True:
        chunk = list(islice(it, lookahead))
        if not chunk:
            return
        if rng is not None:
            chunk = [chunk[i] for i in rng.permutation(len(chunk))]
        chunk.sort(key=lambda item: len(item[1]))  # stable
        groups = (_greedy_groups(chunk, max_tokens, max_batch_size) if call_cost is None
                  else _cheapest_groups(chunk, max_tokens, max_batch_size, call_cost))
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        for group in groups:
            yield pad_batch([(x, y) for _, x, y in group], [k for k, _, _ in group])


def padded_batches(items: Sequence[tuple[object, np.ndarray, np.ndarray]], *, batch_size: int,
                   rng: np.random.Generator) -> list[Batch]:
    """One training epoch of random batches, each padded to its longest (``--no-pack``).

    The items are shuffled and cut into consecutive batches of ``batch_size`` items, the rows
    of each in order of length (ties keep the shuffled order), and the batches returned in a
    random order.  Every item appears in exactly one batch; the result depends only on
    ``items`` and the state of ``rng``.
    """
    batch_size = check_int("batch_size", batch_size)
    order = rng.permutation(len(items))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = sorted((items[i] for i in order[start:start + batch_size]),
                      key=lambda item: len(item[1]))  # stable
        batches.append(pad_batch([(x, y) for _, x, y in rows], [k for k, _, _ in rows]))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class PackedBatch(_Positions):
    """A training batch of sequences laid end to end in fewer rows (:func:`pack_rows`).

    inputs, targets: int32 [R, T], 0 after each row's last sequence; carry: float32 [R, T],
    0.0 where a sequence starts (the LSTM state restarts from zero there) and 1.0 elsewhere;
    lengths: int64 [S], the S sequences' lengths in the order given.
    """

    inputs: np.ndarray
    targets: np.ndarray
    carry: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        """Sequences in the batch (not rows)."""
        return self.lengths.shape[0]


def pack_rows(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> PackedBatch:
    """Lay (inputs, targets) pairs end to end in as few rows as first-fit decreasing finds,
    each row as long as the longest pair.

    A batch of random sentences padded to its longest is mostly padding when lengths vary (on
    a corpus of mean length 10 and longest 35, three positions in four), and a recurrent step
    costs the same for a padded row as for a real one.  Packed, the same sentences fill about a
    third of the rows at the same number of steps; ``carry`` restarts the state at each
    sequence's first position, so every sequence is computed exactly as alone from a zero
    state, and the summed loss and its gradient are those of the padded batch::

        pairs (lengths 5 3 2 4 1), T = 5    rows      inputs           carry
                                            row 0  [a a a a a]      [0 1 1 1 1]
                                            row 1  [d d d d e]      [0 1 1 1 0]
                                            row 2  [b b b c c]      [0 1 1 0 1]
    """
    if len(pairs) == 0:
        raise InvalidArgumentError("cannot pack no pairs")
    lengths = np.array([len(x) for x, _ in pairs], dtype=np.int64)
    for r, (x, y) in enumerate(pairs):
        if len(x) != len(y):
            raise InvalidArgumentError(f"pair {r}: inputs have {len(x)} positions, targets {len(y)}")
    width = int(lengths.max())
    if width == 0:
        raise InvalidArgumentError("cannot pack pairs of no positions")
    fill: list[int] = []  # positions used in each row
    placed: list[tuple[int, int, int]] = []  # (pair, row, start)
    for i in np.argsort(-lengths, kind="stable"):  # longest first; ties keep the given order
        n = int(lengths[i])
        row = next((r for r, used in enumerate(fill) if used + n <= width), len(fill))
        if row == len(fill):
            fill.append(0)
        placed.append((int(i), row, fill[row]))
        fill[row] += n
    inputs = np.full((len(fill), width), PAD_ID, dtype=np.int32)
    targets = np.full((len(fill), width), PAD_ID, dtype=np.int32)
    carry = np.ones((len(fill), width), dtype=np.float32)
    for i, row, start in placed:
        x, y = pairs[i]
        n = int(lengths[i])
        inputs[row, start:start + n] = x
        targets[row, start:start + n] = y
        carry[row, start] = 0.0
    return PackedBatch(inputs, targets, carry, lengths)


def packed_batches(items: Sequence[tuple[object, np.ndarray, np.ndarray]], *, batch_size: int,
                   rng: np.random.Generator) -> list[PackedBatch]:
    """One training epoch of random batches, each packed (:func:`pack_rows`).

    The items are shuffled once and cut into consecutive batches of ``batch_size`` items: the
    plain loop's random-order batches, in the plain loop's order.  A function of ``items`` and
    the state of ``rng``.
    """
    batch_size = check_int("batch_size", batch_size)
    order = rng.permutation(len(items))
    return [pack_rows([items[i][1:] for i in order[start:start + batch_size]])
            for start in range(0, len(order), batch_size)]


@dataclass
class StreamWindow:
    """One window of a training stream (:func:`stream_windows`).

    inputs, targets: int32 [columns, T]; 0 only after the end of the text, in the last
    column(s) of the last windows.  Row r continues where row r of the previous window ended,
    so the LSTM state carries over from one window to the next.
    """

    inputs: np.ndarray
    targets: np.ndarray

    @property
    def tokens(self) -> int:
        return int(np.count_nonzero(self.inputs))


def stream_windows(items: Sequence[tuple[object, np.ndarray, np.ndarray]], *, columns: int,
                   window: int, rng: np.random.Generator) -> list[StreamWindow]:
    """One training epoch as a stream (truncated backpropagation through time, as Zaremba et
    al. and pytorch's word_language_model train): the sentences in a random order, their
    (input, target) pairs end to end, cut into ``columns`` equal rows read in parallel, then
    into windows of ``window`` positions::

        stream   <s> a b <s> c d e <s> f ...            targets  a b </s> c d e </s> f ...
        columns  row 0: <s> a b <s> c d | e <s> f ...   (windows of T steps, left to right)
                 row 1: ...

    Every token is kept (the last row is padded with 0 at its end).  A function of ``items``
    and the state of ``rng``.
    """
    columns, window = check_int("columns", columns), check_int("window", window)
    order = rng.permutation(len(items))
    inputs = np.concatenate([items[i][1] for i in order]).astype(np.int32, copy=False)
    targets = np.concatenate([items[i][2] for i in order]).astype(np.int32, copy=False)
    columns = min(columns, len(inputs))
    length = -(-len(inputs) // columns)  # rows of equal length, the last one padded
    padded = np.zeros((2, columns * length), np.int32)
    padded[0, :len(inputs)], padded[1, :len(targets)] = inputs, targets
    rows = padded.reshape(2, columns, length)
    return [StreamWindow(np.ascontiguousarray(rows[0, :, t:t + window]),
                         np.ascontiguousarray(rows[1, :, t:t + window]))
            for t in range(0, length, window)]
