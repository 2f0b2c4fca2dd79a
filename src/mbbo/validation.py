"""Hyper-parameter checks shared by the building blocks: ValueError naming the parameter, value and range."""

from __future__ import annotations

import math


def interval(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """The allowed range as text, e.g. `(0.0, inf)`."""
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def check_real(name: str, value: object, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> None:
    """A finite real (not a bool) in the given interval."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        if low is not None and (value < low or (low_open and value == low)):
            ok = False
        if high is not None and (value > high or (high_open and value == high)):
            ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number in {interval(low, high, low_open, high_open)}, got {value!r}")


def check_int(name: str, value: object, low: int = 0) -> None:
    """An integer (not a bool) >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer in [{low}, inf), got {value!r}")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """One of a fixed set of names."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
