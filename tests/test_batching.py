"""Pairs, windows, padding, length bucketing and training's random batches."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmonnx.batching import (Batch, bucketed_batches, make_pair, pack_rows, packed_batches,
                             pad_batch, padded_batches, split_windows)
from lmonnx.vocab import BOS_ID, EOS_ID


def _item(key, n, rng=None):
    words = np.arange(4, 4 + n, dtype=np.int32) if rng is None else rng.integers(1, 50, n).astype(np.int32)
    x, y = make_pair(words)
    return key, x, y


def test_make_pair():
    x, y = make_pair(np.array([7, 8, 9]))
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert x.tolist() == [BOS_ID, 7, 8, 9]
    assert y.tolist() == [7, 8, 9, EOS_ID]
    x, y = make_pair(np.array([], dtype=np.int32))
    assert x.tolist() == [BOS_ID] and y.tolist() == [EOS_ID]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1000), max_size=60), st.integers(1, 20))
def test_windows_cover_every_token(words, max_length):
    x, y = make_pair(np.array(words, dtype=np.int32))
    windows = split_windows(x, y, max_length)
    assert all(1 <= len(wx) <= max_length and len(wx) == len(wy) for wx, wy in windows)
    assert np.concatenate([w[0] for w in windows]).tolist() == x.tolist()
    assert np.concatenate([w[1] for w in windows]).tolist() == y.tolist()
    assert len(windows) == -(-len(x) // max_length)


def test_split_windows_errors():
    x, y = make_pair(np.array([5, 6]))
    with pytest.raises(ValueError):
        split_windows(x, y, 0)
    with pytest.raises(ValueError):
        split_windows(x, y[:-1], 3)


def test_pad_batch():
    pairs = [make_pair(np.array(w, dtype=np.int32)) for w in ([4, 9, 17], [5], [6, 7, 8, 11])]
    b = pad_batch(pairs, keys=["a", "b", "c"])
    assert isinstance(b, Batch)
    assert b.inputs.tolist() == [[2, 4, 9, 17, 0], [2, 5, 0, 0, 0], [2, 6, 7, 8, 11]]
    assert b.targets.tolist() == [[4, 9, 17, 3, 0], [5, 3, 0, 0, 0], [6, 7, 8, 11, 3]]
    assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int32
    assert b.mask.dtype == np.float32 and b.lengths.dtype == np.int64
    np.testing.assert_array_equal(b.mask, np.sign(b.inputs).astype(np.float32))
    assert b.lengths.tolist() == [4, 2, 5]
    assert b.keys == ["a", "b", "c"]
    assert b.tokens == 11
    assert b.padding_fraction == pytest.approx(4 / 15)
    assert pad_batch(pairs).keys == [0, 1, 2]
    with pytest.raises(ValueError):
        pad_batch([])
    with pytest.raises(ValueError):
        pad_batch(pairs, keys=[1])


def _collect(batches):
    seen = []
    for b in batches:
        for r, key in enumerate(b.keys):
            seen.append((key, b.inputs[r, :b.lengths[r]].tolist(), b.targets[r, :b.lengths[r]].tolist()))
    return seen


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=200), st.integers(1, 64), st.integers(1, 16),
       st.integers(1, 50), st.booleans())
def test_bucketing_invariants(lengths, max_tokens, max_batch_size, lookahead, shuffle):
    items = [_item(i, n) for i, n in enumerate(lengths)]
    rng = np.random.default_rng(0) if shuffle else None
    batches = list(bucketed_batches(iter(items), max_tokens=max_tokens, max_batch_size=max_batch_size,
                                    lookahead=lookahead, rng=rng))
    seen = _collect(batches)
    # every item exactly once, whole
    assert sorted(k for k, _, _ in seen) == list(range(len(items)))
    for key, x, y in seen:
        assert x == items[key][1].tolist() and y == items[key][2].tolist()
    for b in batches:
        assert len(b.keys) <= max_batch_size
        np.testing.assert_array_equal(b.mask, np.sign(b.inputs))
        assert b.inputs.shape[1] == b.lengths.max()
        if b.inputs.size > max_tokens:  # only a single over-long item may exceed the budget
            assert len(b.keys) == 1 and b.lengths[0] > max_tokens


def test_long_items_are_alone_and_whole():
    items = [_item(0, 3), _item(1, 50), _item(2, 2), _item(3, 4)]
    batches = list(bucketed_batches(items, max_tokens=20, max_batch_size=8))
    long = [b for b in batches if 1 in b.keys]
    assert len(long) == 1 and long[0].keys == [1] and long[0].inputs.shape == (1, 51)
    assert long[0].inputs[0].tolist() == items[1][1].tolist()


def test_bucketing_sorts_and_fills_budget():
    items = [_item(i, n - 1) for i, n in enumerate([6, 2, 3, 14, 3, 2, 5, 6, 3])]
    batches = list(bucketed_batches(items, max_tokens=12, max_batch_size=4))
    assert [b.inputs.shape for b in batches] == [(4, 3), (2, 5), (2, 6), (1, 14)]
    assert batches[0].keys == [1, 5, 2, 4]  # ties keep input order


def test_deterministic_without_rng_reproducible_with_seed():
    rng = np.random.default_rng(1)
    items = [_item(i, int(n), rng) for i, n in enumerate(rng.integers(0, 30, 500))]

    def run(r):
        return [(b.keys, b.inputs.tolist()) for b in bucketed_batches(
            items, max_tokens=100, max_batch_size=16, lookahead=128, rng=r)]

    assert run(None) == run(None)
    assert run(np.random.default_rng(7)) == run(np.random.default_rng(7))
    assert run(np.random.default_rng(7)) != run(np.random.default_rng(8))
    assert run(np.random.default_rng(7)) != run(None)


def test_streaming_reads_at_most_lookahead_before_first_batch():
    consumed = 0

    def gen():
        nonlocal consumed
        for i in range(100_000):
            consumed += 1
            yield (i, *make_pair(np.full(i % 17, 5, dtype=np.int32)))

    stream = bucketed_batches(gen(), max_tokens=256, max_batch_size=32, lookahead=1000)
    first = next(stream)
    assert consumed <= 1000
    assert len(first.keys) >= 1
    n = len(first.keys) + sum(len(b.keys) for b in stream)
    assert n == 100_000 and consumed == 100_000


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_tokens=0, max_batch_size=4), ValueError, "max_tokens must be an integer >= 1; got 0"),
    (dict(max_tokens=10, max_batch_size=0), ValueError, "max_batch_size must be an integer >= 1"),
    (dict(max_tokens=10, max_batch_size=4, lookahead=0), ValueError, "lookahead must be an integer"),
    (dict(max_tokens=1.5, max_batch_size=4), TypeError, "max_tokens must be an integer >= 1; got 1.5")])
def test_bucketing_rejects_bad_budgets(kwargs, error, message):
    with pytest.raises(error, match=message):
        bucketed_batches([_item(0, 2)], **kwargs)  # raised at the call, before iteration


def test_bucketing_empty_input():
    assert list(bucketed_batches([], max_tokens=10, max_batch_size=2)) == []


# ---- padded random batches (training, --no-pack) -------------------------------------------------

def _corpus(n=2000, seed=1):
    rng = np.random.default_rng(seed)
    return [_item(i, int(k), rng) for i, k in enumerate(rng.geometric(0.08, n))]


def test_padded_batches_are_the_plain_loops_batches_in_random_order():
    """Consecutive runs of one shuffle, each padded with its rows by length, the batches in a
    second random order (as the trainer's --no-pack batches always were)."""
    items = _corpus(500)
    batches = padded_batches(items, batch_size=16, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    order = rng.permutation(len(items)).tolist()
    runs = [order[i:i + 16] for i in range(0, len(order), 16)]
    runs = [runs[i] for i in rng.permutation(len(runs))]
    for batch, run in zip(batches, runs, strict=True):
        assert batch.keys == sorted(run, key=lambda k: len(items[k][1]))  # stable by length
        np.testing.assert_array_equal(batch.mask, np.sign(batch.inputs))
        assert batch.inputs.shape == (len(run), max(len(items[k][1]) for k in run))
    again = padded_batches(items, batch_size=16, rng=np.random.default_rng(3))
    assert [b.keys for b in again] == [b.keys for b in batches]
    assert padded_batches([], batch_size=4, rng=np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        padded_batches(items, batch_size=0, rng=np.random.default_rng(0))


# ---- packed batches (training) ------------------------------------------------------------------

def _unpack(batch):
    """Each sequence of a PackedBatch as (inputs, targets) lists, read back through carry."""
    out = []
    for row in range(batch.inputs.shape[0]):
        real = int(np.count_nonzero(batch.inputs[row]))
        assert not batch.inputs[row, real:].any()  # padding only after the row's last sequence
        starts = [t for t in range(real) if batch.carry[row, t] == 0.0]
        assert starts[:1] == [0]
        assert (batch.carry[row, real:] == 1.0).all()
        for a, b in zip(starts, starts[1:] + [real]):
            out.append((batch.inputs[row, a:b].tolist(), batch.targets[row, a:b].tolist()))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=80), st.integers(0, 2**32 - 1))
def test_pack_rows_holds_every_pair_once_whole_with_its_state_restart(lengths, seed):
    rng = np.random.default_rng(seed)
    pairs = [_item(i, n - 1, rng)[1:] for i, n in enumerate(lengths)]
    batch = pack_rows(pairs)
    assert batch.inputs.dtype == batch.targets.dtype == np.int32
    assert batch.carry.dtype == np.float32
    assert batch.inputs.shape == batch.targets.shape == batch.carry.shape
    assert batch.inputs.shape[1] == max(lengths)  # rows as long as the longest pair
    assert batch.inputs.shape[0] <= len(pairs)
    assert len(batch) == len(pairs) and batch.tokens == sum(lengths)
    assert sorted(_unpack(batch)) == sorted((x.tolist(), y.tolist()) for x, y in pairs)
    # first-fit decreasing: no two rows could have been merged into one
    fill = np.count_nonzero(batch.inputs, axis=1)
    assert all(a + b > max(lengths) for i, a in enumerate(fill) for b in fill[i + 1:])


def test_pack_rows_fills_rows_first_fit_decreasing():
    pairs = [_item(i, n - 1)[1:] for i, n in enumerate([5, 3, 2, 4, 1])]
    batch = pack_rows(pairs)
    assert batch.carry.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 1, 1, 0, 1]]
    assert batch.padding_fraction == 0.0
    assert pack_rows(pairs[:2]).padding_fraction == pytest.approx(2 / 10)


@pytest.mark.parametrize("pairs, message", [
    ([], "no pairs"),
    ([(np.zeros(0, np.int32), np.zeros(0, np.int32))], "no positions"),
    ([(np.ones(3, np.int32), np.ones(2, np.int32))], "pair 0: inputs have 3 positions"),
])
def test_pack_rows_refuses_what_it_cannot_pack(pairs, message):
    with pytest.raises(ValueError, match=message):
        pack_rows(pairs)


def test_packed_batches_are_the_plain_loops_batches_in_its_order():
    """One shuffle, cut into consecutive batches: the plain loop's batches, same order."""
    items = _corpus(500)
    batches = packed_batches(items, batch_size=16, rng=np.random.default_rng(3))
    order = np.random.default_rng(3).permutation(len(items))
    for b, start in zip(batches, range(0, len(items), 16)):
        chosen = [items[i] for i in order[start:start + 16]]
        assert sorted(_unpack(b)) == sorted((x.tolist(), y.tolist()) for _, x, y in chosen)
    padded = sum(pad_batch([(x, y) for _, x, y in (items[i] for i in order[s:s + 16])]).inputs.size
                 for s in range(0, len(items), 16))
    assert sum(b.inputs.size for b in batches) < 0.6 * padded  # geometric lengths: far less padding
    again = packed_batches(items, batch_size=16, rng=np.random.default_rng(3))
    assert all((a.inputs == b.inputs).all() for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        packed_batches(items, batch_size=0, rng=np.random.default_rng(3))


def _padded_cost(batches, call_cost):
    return sum(b.inputs.size + call_cost for b in batches)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12), st.integers(1, 64),
       st.integers(1, 6), st.integers(0, 40))
def test_call_cost_cut_is_the_cheapest_of_every_cut(lengths, max_tokens, max_batch_size,
                                                    call_cost):
    """Brute force over every cut of the sorted items: none within the caps costs less."""
    from itertools import combinations

    items = [_item(i, n) for i, n in enumerate(lengths)]
    batches = list(bucketed_batches(items, max_tokens=max_tokens, max_batch_size=max_batch_size,
                                    call_cost=call_cost))
    seen = _collect(batches)
    assert sorted(k for k, _, _ in seen) == list(range(len(items)))
    for b in batches:
        assert len(b.keys) <= max_batch_size
        if b.inputs.size > max_tokens:
            assert len(b.keys) == 1 and b.lengths[0] > max_tokens
    sizes = sorted(n + 1 for n in lengths)  # an item of n words has n + 1 positions
    fitting = [n for n in sizes if n <= max_tokens]
    cheapest = None
    m = len(fitting)
    for k in range(m):
        for cuts in combinations(range(1, m), k):
            bounds = [0, *cuts, m]
            runs = [fitting[a:b] for a, b in zip(bounds, bounds[1:])]
            if all(len(r) <= max_batch_size and len(r) * r[-1] <= max_tokens for r in runs):
                cost = sum(len(r) * r[-1] + call_cost for r in runs)
                cheapest = cost if cheapest is None else min(cheapest, cost)
    long_cost = sum(n + call_cost for n in sizes[m:])
    assert _padded_cost(batches, call_cost) == (cheapest or 0) + long_cost


def test_call_cost_splits_mixed_lengths_that_greedy_pads_together():
    items = [_item(i, n - 1) for i, n in enumerate([3, 3, 3, 3, 40])]
    greedy = list(bucketed_batches(items, max_tokens=1000, max_batch_size=8))
    cut = list(bucketed_batches(items, max_tokens=1000, max_batch_size=8, call_cost=32))
    assert [b.inputs.shape for b in greedy] == [(5, 40)]  # 200 padded positions
    assert [b.inputs.shape for b in cut] == [(4, 3), (1, 40)]  # 52 + 2 calls
    assert list(bucketed_batches(items, max_tokens=1000, max_batch_size=8, call_cost=500)) \
        [0].inputs.shape == (5, 40)  # a call dearer than the padding: one batch
