"""The one windowed stepper: every position run once, in order, in windows of at most
``window``, the state of each window handed to the next."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from lmonnx.windows import CarriedWindows


def _running_sum(values):
    """A 'model' whose state is the running sum: its outputs over windows equal one pass."""
    def run(part, state):
        total = 0 if state is None else state
        out = total + np.cumsum(values[part])
        return out, int(out[-1])
    return run


@given(length=st.integers(0, 200), window=st.integers(1, 64))
def test_windows_cover_every_position_once_in_order_and_carry_the_state(length, window):
    values = np.arange(1, length + 1)
    windows = CarriedWindows(length, window)
    parts, outs = [], []
    for part, out in windows.run_all(_running_sum(values)):
        parts.append(part)
        outs.append(out)
    assert windows.done and windows.start == length
    assert len(parts) == windows.windows
    assert [p.start for p in parts] == list(range(0, length, window))
    assert all(0 < p.stop - p.start <= window for p in parts)
    assert parts[-1].stop == length if parts else length == 0
    one_pass = np.cumsum(values)
    assert np.array_equal(np.concatenate(outs) if outs else np.empty(0), one_pass)
    assert windows.state == (int(one_pass[-1]) if length else None)


def test_a_given_start_state_is_the_first_window_s():
    seen = []
    CarriedWindows(3, 2, state="s0").step(lambda part, state: (seen.append(state), "s1"))
    assert seen == ["s0"]


def test_stepping_past_the_end_is_an_error():
    windows = CarriedWindows(2, 5)
    windows.step(lambda part, state: (None, state))
    with pytest.raises(RuntimeError, match="all 2 positions"):
        windows.step(lambda part, state: (None, state))


@pytest.mark.parametrize("length, window, error", [(-1, 4, ValueError), (3, 0, ValueError),
                                                    (3, 1.5, TypeError)])
def test_bad_sizes_are_refused(length, window, error):
    with pytest.raises(error):
        CarriedWindows(length, window)
