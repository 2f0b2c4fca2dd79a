"""Tests of the T1/T2 preparation: splits, bias column, temperatures, imbalance and label noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mbbo.data.binary import (
    add_bias_column,
    held_out_size,
    make_imbalanced_noisy,
    split_indices,
    temperatures,
    train_validation_split,
)
from mbbo.data.errors import DataError
from mbbo.data.libsvm import load_libsvm_file


@pytest.fixture(scope="module")
def a8a_train(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_libsvm_file(shared_data / "libsvm" / "a8a", 123)


@pytest.fixture(scope="module")
def a8a_split(a8a_train: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    return train_validation_split(*a8a_train, seed=0)


def _toy(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Rows identified by their first column; labels alternate +1 / -1."""
    X = np.column_stack([np.arange(n, dtype=float), np.zeros(n)])
    y = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    return X, y


# --- splits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "held"), [(22_696, 0.2, 4_540), (49_749, 0.2, 9_950), (10, 0.2, 2), (569, 0.2, 114)]
)
def test_held_out_size_rounds_up(n: int, fraction: float, held: int) -> None:
    assert held_out_size(n, fraction) == held


def test_a8a_split_sizes_and_disjoint(a8a_split: tuple[np.ndarray, ...]) -> None:
    X_tr, y_tr, X_val, y_val = a8a_split
    assert (X_tr.shape, y_tr.shape) == ((18_156, 123), (18_156,))
    assert (X_val.shape, y_val.shape) == ((4_540, 123), (4_540,))
    assert int((y_tr == 1).sum() + (y_val == 1).sum()) == 5_506


def test_w8a_split_sizes(shared_data: Path) -> None:
    X, y = load_libsvm_file(shared_data / "libsvm" / "w8a", 300)
    X_tr, _, X_val, _ = train_validation_split(X, y, 0.2, seed=3)
    assert (len(X_tr), len(X_val)) == (39_799, 9_950)


def test_split_indices_partition_and_determinism() -> None:
    train, val = split_indices(22_696, seed=7)
    assert (len(train), len(val)) == (18_156, 4_540)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(22_696))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, again_val = split_indices(22_696, seed=7)
    np.testing.assert_array_equal(again_train, train)
    np.testing.assert_array_equal(again_val, val)
    assert not np.array_equal(split_indices(22_696, seed=8)[1], val)


def test_train_validation_split_keeps_rows_with_labels() -> None:
    X, y = _toy()
    X_tr, y_tr, X_val, y_val = train_validation_split(X, y, 0.3, seed=1)
    assert (len(X_tr), len(X_val)) == (35, 15)
    ids_tr, ids_val = X_tr[:, 0].astype(int), X_val[:, 0].astype(int)
    assert set(ids_tr).isdisjoint(ids_val) and len(set(ids_tr) | set(ids_val)) == 50
    np.testing.assert_array_equal(y_tr, y[ids_tr])
    np.testing.assert_array_equal(y_val, y[ids_val])


@pytest.mark.parametrize(
    ("n", "fraction", "split"), [(1, 0.5, "train"), (5, 1e-12, "validation"), (0, 0.2, "validation")]
)
def test_empty_split_is_a_data_error(n: int, fraction: float, split: str) -> None:
    with pytest.raises(DataError, match=f"the {split} split would be empty: {n} rows"):
        split_indices(n, fraction, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.2"])
def test_bad_validation_fraction(fraction: object) -> None:
    X, y = _toy()
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\), got"):
        train_validation_split(X, y, fraction, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        split_indices(10, seed=seed)  # type: ignore[arg-type]


def test_bad_shapes() -> None:
    X, y = _toy()
    with pytest.raises(ValueError, match="y must be a 1-D array"):
        train_validation_split(X, y[:-1], seed=0)
    with pytest.raises(ValueError, match="X must be a 2-D array"):
        train_validation_split(y, y, seed=0)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        split_indices(-3, seed=0)


# --- bias column and temperatures -----------------------------------------------------------------------


def test_add_bias_column() -> None:
    X = np.arange(6, dtype=np.float32).reshape(3, 2)
    Xb = add_bias_column(X)
    assert Xb.shape == (3, 3) and Xb.dtype == np.float32
    np.testing.assert_array_equal(Xb[:, 0], 1.0)
    np.testing.assert_array_equal(Xb[:, 1:], X)
    assert add_bias_column(np.zeros((2, 4), dtype=int)).dtype == np.float64
    with pytest.raises(ValueError, match="X must be a 2-D array"):
        add_bias_column(np.zeros(3))


def test_temperatures() -> None:
    s = temperatures(100, seed=0)
    assert s.shape == (100,) and s.dtype == np.float64
    assert s.min() >= 1.0 and s.max() < 11.0
    np.testing.assert_array_equal(s, temperatures(100, 0))
    assert not np.array_equal(s, temperatures(100, 1))
    assert abs(temperatures(100_000, 2, low=-1.0, high=3.0).mean() - 1.0) < 0.02
    assert temperatures(1, 0).shape == (1,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 0}, "m must be an integer >= 1, got 0"),
        ({"m": 2.0}, "m must be an integer >= 1"),
        ({"low": 5.0, "high": 5.0}, "low must be < high, got low=5.0, high=5.0"),
        ({"low": float("nan")}, "low must be a finite real number"),
        ({"high": float("inf")}, "high must be a finite real number"),
        ({"seed": -2}, "seed must be a non-negative integer"),
    ],
)
def test_bad_temperature_parameters(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"m": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        temperatures(**args)  # type: ignore[arg-type]


# --- T2: imbalance and label noise ----------------------------------------------------------------------


def test_imbalance_without_noise(a8a_split: tuple[np.ndarray, ...]) -> None:
    X_tr, y_tr = a8a_split[0], a8a_split[1]
    n_pos = int((y_tr == 1).sum())
    out = make_imbalanced_noisy(X_tr, y_tr, flip_probability=0.0, seed=0)
    assert int((out.y == 1).sum()) == n_pos - round(0.8 * n_pos)
    assert int((out.y == -1).sum()) == int((y_tr == -1).sum())
    assert not out.flipped.any()
    np.testing.assert_array_equal(out.X, X_tr[out.kept])
    np.testing.assert_array_equal(out.y, y_tr[out.kept])


def test_label_noise_rate(a8a_split: tuple[np.ndarray, ...]) -> None:
    X_tr, y_tr = a8a_split[0], a8a_split[1]
    out = make_imbalanced_noisy(X_tr, y_tr, remove_positive_fraction=0.5, flip_probability=0.3, seed=4)
    assert abs(out.flipped.mean() - 0.3) < 0.02
    np.testing.assert_array_equal(out.y[out.flipped], -y_tr[out.kept][out.flipped])
    np.testing.assert_array_equal(out.y[~out.flipped], y_tr[out.kept][~out.flipped])
    again = make_imbalanced_noisy(X_tr, y_tr, remove_positive_fraction=0.5, flip_probability=0.3, seed=4)
    np.testing.assert_array_equal(again.kept, out.kept)
    np.testing.assert_array_equal(again.y, out.y)


def test_removing_all_positives_is_a_data_error() -> None:
    X, y = _toy(10)
    with pytest.raises(DataError, match="training split would have no positive rows: it has 5"):
        make_imbalanced_noisy(X, y, remove_positive_fraction=1.0, flip_probability=0.1, seed=0)
    with pytest.raises(DataError, match="training split would have no positive rows: it has 0"):
        make_imbalanced_noisy(X, -np.ones(10), remove_positive_fraction=0.0, flip_probability=0.1, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remove_positive_fraction": 1.2}, r"remove_positive_fraction must be in \[0, 1\], got 1.2"),
        ({"remove_positive_fraction": -0.1}, r"remove_positive_fraction must be in \[0, 1\]"),
        ({"flip_probability": 1.01}, r"flip_probability must be in \[0, 1\], got 1.01"),
        ({"flip_probability": float("nan")}, r"flip_probability must be in \[0, 1\]"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_noise_parameters(kwargs: dict[str, object], message: str) -> None:
    X, y = _toy()
    args: dict[str, object] = {"flip_probability": 0.1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_imbalanced_noisy(X, y, **args)  # type: ignore[arg-type]


def test_noise_requires_plus_minus_one_labels() -> None:
    X, _ = _toy(4)
    with pytest.raises(ValueError, match=r"labels in \{-1, \+1\}, found \[0.0\]"):
        make_imbalanced_noisy(X, np.array([0.0, 1.0, 1.0, -1.0]), flip_probability=0.1, seed=0)
