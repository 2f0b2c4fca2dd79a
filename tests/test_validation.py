import math

import pytest

from mbbo.validation import (
    check_choice,
    check_flag,
    check_int,
    check_nonnegative,
    check_optional,
    check_positive,
    check_real,
    check_unit,
    interval,
)


def test_interval_text() -> None:
    assert interval(0.0, None, low_open=True) == "(0.0, inf)"
    assert interval(None, 1.0) == "(-inf, 1.0]"


def test_check_real_and_int() -> None:
    check_real("lr", 0.5, 0.0, 1.0)
    for bad in (0.0, 2.0, math.nan, True, "x"):
        with pytest.raises(ValueError, match=r"lr must be a finite number in \(0.0, 1.0\]"):
            check_real("lr", bad, 0.0, 1.0, low_open=True)
    check_int("steps", 3, 1)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, inf\)"):
            check_int("steps", bad, 1)


def test_check_int_with_an_upper_bound() -> None:
    check_int("block_batch", 4, 1, 4)
    with pytest.raises(ValueError, match=r"block_batch must be an integer in \[1, 4\], got 5"):
        check_int("block_batch", 5, 1, 4)


def test_the_named_ranges() -> None:
    check_positive("lr", 1e-9)
    check_nonnegative("power", 0.0)
    check_unit("beta", 1.0)
    for check, bad, text in ((check_positive, 0.0, r"\(0.0, inf\)"), (check_nonnegative, -1e-9, r"\[0.0, inf\)"),
                             (check_unit, 0.0, r"\(0.0, 1.0\]"), (check_unit, True, r"\(0.0, 1.0\]")):
        with pytest.raises(ValueError, match=rf"w must be a finite number in {text}, got {bad!r}"):
            check(name="w", value=bad)


def test_check_flag_and_optional() -> None:
    check_flag("lazy", False)
    for bad in (0, 1, "yes", None):
        with pytest.raises(ValueError, match=r"lazy must be True or False"):
            check_flag("lazy", bad)
    check_optional(check_int, "batch_size", None, 1)
    check_optional(check_choice, "mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, inf\), got 0"):
        check_optional(check_int, "batch_size", 0, 1)
    with pytest.raises(ValueError, match=r"mode must be one of 'a', 'b', got 'c'"):
        check_optional(check_choice, "mode", "c", ("a", "b"))
