"""Argument checks for the public API, written once.

Each check returns the value in its plain Python type and raises
:class:`~lmonnx.errors.ArgumentTypeError` (a ``TypeError``) for a wrong type or
:class:`~lmonnx.errors.InvalidArgumentError` (a ``ValueError``) for a value out of range, with
a message that names the argument (``name``: a parameter such as ``"batch_size"`` or a flag
such as ``"--epochs"``) and what it got.  ``bool`` is never an integer here (``True`` as a
batch size is a bug at the caller), NumPy integers and floats are.

Check at public boundaries only (constructors and functions users call); internal code trusts
what a boundary checked.
"""

from __future__ import annotations

import math
import numbers

from lmonnx.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["check_int", "check_optional_int", "check_real", "check_choice", "check_bool"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def check_int(name: str, value, *, low: int | None = 1, high: int | None = None,
              why: str = "") -> int:
    """``value`` as an ``int`` when it is an integer in ``[low, high]`` (None: unbounded).

    ``why`` is added to the message in parentheses (``"0 = never"``)."""
    wanted = " ".join(part for part in ("an integer", _range_text(low, high)) if part)
    wanted += f" ({why})" if why else ""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be {wanted}; got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidArgumentError(f"{name} must be {wanted}; got {value}")
    return value


def check_optional_int(name: str, value, *, low: int | None = 1, high: int | None = None,
                       why: str = "") -> int | None:
    """None, or :func:`check_int` of ``value``."""
    return None if value is None else check_int(name, value, low=low, high=high, why=why)


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, why: str = "") -> float:
    """``value`` as a finite ``float`` within the bounds (``*_open``: the bound itself is
    excluded).  NaN and infinities are always refused."""
    extra = f" ({why})" if why else ""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    wanted = f"a finite number{' ' + ' and '.join(parts) if parts else ''}{extra}"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be {wanted}; got {value!r}")
    value = float(value)
    if (not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))):
        raise InvalidArgumentError(f"{name} must be {wanted}; got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    """``value`` when it is one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(str, choices))}; "
                                   f"got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` when it is ``True`` or ``False`` (a NumPy bool too)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False; got {value!r}")
