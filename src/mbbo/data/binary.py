"""Preparation of binary classification data for the hyper-parameter tasks T1 and T2.

Everything random here is drawn from `numpy.random.default_rng(seed)`, so equal seeds give equal results.

Rounding rule of the splits: a split of `n` rows with fraction `f` gives `ceil(f * n)` rows to the held-out
part (validation or test) and the rest to training; this is scikit-learn's `train_test_split` rule and
reproduces the sizes of tasks.md exactly (a8a: 22,696 -> 18,156 / 4,540; w8a: 49,749 -> 39,799 / 9,950).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

from mbbo.data.errors import DataError

__all__ = [
    "ImbalancedNoisy",
    "add_bias_column",
    "held_out_size",
    "make_imbalanced_noisy",
    "split_indices",
    "temperatures",
    "train_validation_split",
]


class ImbalancedNoisy(NamedTuple):
    """Result of `make_imbalanced_noisy`.

    Attributes:
        X: the remaining rows (a new array, in their original order).
        y: their labels in {-1, +1}, after flipping.
        kept: indices of the remaining rows in the input arrays.
        flipped: boolean mask over the remaining rows, True where the label was flipped.
    """

    X: np.ndarray
    y: np.ndarray
    kept: np.ndarray
    flipped: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# parameter checks
# ---------------------------------------------------------------------------------------------------------


def _check_seed(seed: int) -> int:
    """A seed must be a non-negative integer (numpy's `default_rng` rule)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    """Check `value` lies in the interval from 0 to 1 whose ends are open as requested."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def _check_xy(X: np.ndarray, y: np.ndarray) -> None:
    """X must be 2-D, y 1-D, with one label per row."""
    if np.ndim(X) != 2:
        raise ValueError(f"X must be a 2-D array, got shape {np.shape(X)}")
    if np.ndim(y) != 1 or len(y) != len(X):
        raise ValueError(
            f"y must be a 1-D array with one label per row of X ({len(X)} rows), got shape {np.shape(y)}"
        )


# ---------------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------------


def held_out_size(n: int, fraction: float) -> int:
    """Rows given to the held-out part when splitting `n` rows with `fraction`: `ceil(fraction * n)`.

    The product is rounded to 9 decimals first so that e.g. `0.2 * 10` counts as exactly 2.
    """
    return math.ceil(round(fraction * n, 9))


def split_indices(
    n: int, validation_fraction: float = 0.2, *, seed: int, what: str = "validation"
) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint (train, held-out) row indices covering `range(n)`, each sorted ascending.

    The held-out part has `held_out_size(n, validation_fraction)` rows; `what` names it in errors.

    Raises:
        ValueError: `n` is not a non-negative integer or `validation_fraction` is not in (0, 1).
        DataError: one of the two parts would be empty (the message names it).
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    fraction = _check_fraction("validation_fraction", validation_fraction, low_open=True, high_open=True)
    rng = np.random.default_rng(_check_seed(seed))
    n_held = held_out_size(int(n), fraction)
    for part, size in ((what, n_held), ("train", n - n_held)):
        if size < 1:
            raise DataError(
                f"the {part} split would be empty: {n} rows with {what} fraction {fraction} "
                f"give {n - n_held} train rows and {n_held} {what} rows"
            )
    perm = rng.permutation(int(n))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def train_validation_split(
    X: np.ndarray, y: np.ndarray, validation_fraction: float = 0.2, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split rows into disjoint train and validation parts: `(X_tr, y_tr, X_val, y_val)`.

    The validation part has `ceil(validation_fraction * n)` rows chosen uniformly at random with
    `default_rng(seed)`; both parts keep the rows' original order.

    Raises:
        ValueError: bad shapes, `validation_fraction` not in (0, 1), or a bad seed.
        DataError: a split would be empty.
    """
    _check_xy(X, y)
    train, val = split_indices(len(X), validation_fraction, seed=seed)
    return X[train], y[train], X[val], y[val]


# ---------------------------------------------------------------------------------------------------------
# features, temperatures, T2 corruption
# ---------------------------------------------------------------------------------------------------------


def add_bias_column(X: np.ndarray) -> np.ndarray:
    """Prepend a column of ones: a model `w` on the result has `d + 1` entries, `w[0]` being the bias."""
    if np.ndim(X) != 2:
        raise ValueError(f"X must be a 2-D array, got shape {np.shape(X)}")
    X = np.asarray(X)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return np.hstack([np.ones((X.shape[0], 1), dtype=dtype), X.astype(dtype, copy=False)])


def temperatures(m: int, seed: int, low: float = 1.0, high: float = 11.0) -> np.ndarray:
    """`m` loss temperatures drawn uniformly from `[low, high)` with `default_rng(seed)` (float64).

    T1 uses `m = 100` on `[1, 11]`.

    Raises:
        ValueError: `m < 1`, a bad seed, non-finite bounds or `low >= high`.
    """
    if isinstance(m, bool) or not isinstance(m, Integral) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    rng = np.random.default_rng(_check_seed(seed))
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if not low < high:
        raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
    return rng.uniform(float(low), float(high), size=int(m))


def make_imbalanced_noisy(
    X: np.ndarray,
    y: np.ndarray,
    *,
    remove_positive_fraction: float = 0.8,
    flip_probability: float,
    seed: int,
) -> ImbalancedNoisy:
    """T2's corruption of a training split: remove positives, then flip labels at random.

    First `round(remove_positive_fraction * n_pos)` of the `n_pos` rows labelled +1 are removed, chosen
    uniformly at random; then each remaining label is flipped (+1 <-> -1) independently with probability
    `flip_probability`. Both draws come from one `default_rng(seed)`, in that order. Apply it to the
    training split only: validation and test stay clean.

    Raises:
        ValueError: bad shapes, labels outside {-1, +1}, `remove_positive_fraction` or `flip_probability`
            outside [0, 1], or a bad seed.
        DataError: no positive row would remain in the training split.
    """
    _check_xy(X, y)
    r = _check_fraction("remove_positive_fraction", remove_positive_fraction, low_open=False, high_open=False)
    p = _check_fraction("flip_probability", flip_probability, low_open=False, high_open=False)
    rng = np.random.default_rng(_check_seed(seed))
    y = np.asarray(y)
    bad = np.setdiff1d(np.unique(y), [-1, 1])
    if bad.size:
        raise ValueError(f"y must hold labels in {{-1, +1}}, found {bad.tolist()}")
    kept = _drop_positives(y, r, rng)
    flipped = rng.random(kept.size) < p
    y_new = np.where(flipped, -y[kept], y[kept])
    return ImbalancedNoisy(X=np.asarray(X)[kept], y=y_new, kept=kept, flipped=flipped)


def _drop_positives(y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices kept after removing `round(r * n_pos)` random positives; DataError if none is left."""
    positives = np.flatnonzero(y == 1)
    n_remove = round(r * positives.size)
    if positives.size - n_remove < 1:
        raise DataError(
            f"the training split would have no positive rows: it has {positives.size} and "
            f"remove_positive_fraction={r} removes {n_remove}"
        )
    removed = rng.choice(positives, size=n_remove, replace=False)
    mask = np.ones(y.size, dtype=bool)
    mask[removed] = False
    return np.flatnonzero(mask)
