"""The one vocabulary of hyper-parameter checks (algorithms, building blocks, tasks, federated and ranking code):
each raises ValueError naming the parameter, the value and the allowed range. Booleans are not numbers here:
`True` for a float or an integer is rejected."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


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


def check_int(name: str, value: object, low: int = 0, high: int | None = None) -> None:
    """An integer (not a bool) in [low, high] (high None: no upper bound)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in [{low}, {'inf)' if high is None else f'{high}]'}, "
                         f"got {value!r}")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """One of a fixed set of names."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def check_positive(name: str, value: object) -> None:
    """A finite real > 0 (not a bool)."""
    check_real(name, value, 0.0, None, low_open=True)


def check_nonnegative(name: str, value: object) -> None:
    """A finite real >= 0 (not a bool): schedule exponents, weights that may vanish."""
    check_real(name, value, 0.0, None)


def check_unit(name: str, value: object) -> None:
    """A weight in (0, 1] (momentum, averaging and variance-reduction weights)."""
    check_real(name, value, 0.0, 1.0, low_open=True)


def check_flag(name: str, value: object) -> None:
    """True or False (not 0 / 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_optional(check: Callable[..., None], name: str, value: object, *args: Any, **kwargs: Any) -> None:
    """`check(name, value, ...)` unless value is None (an optional hyper-parameter left unset)."""
    if value is not None:
        check(name, value, *args, **kwargs)
