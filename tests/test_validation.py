import math

import pytest

from mbbo.validation import check_int, check_real, interval


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
