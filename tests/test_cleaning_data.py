from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from mbbo.tasks.cleaning_data import (
    DEFAULT_REG,
    CleaningData,
    accuracy,
    corrupt_labels,
    cross_entropy,
    hypergradient,
    inner_loss,
    inner_solution,
    load_npz_arrays,
    make_cleaning_data,
    outer_loss,
    value,
)

DT = torch.float64


@pytest.fixture(scope="module")
def digits() -> CleaningData:
    return make_cleaning_data(noise=0.5, seed=0, dtype=DT)


@pytest.fixture
def small_npz(tmp_path):
    gen = np.random.default_rng(0)
    n, k = 45, 3
    y = np.array(["cat", "dog", "emu"])[np.arange(n) % k]
    centers = gen.normal(size=(k, 2, 2)) * 2
    X = centers[np.arange(n) % k] + gen.normal(size=(n, 2, 2))  # (n, 2, 2) images, flattened to 4 features
    path = tmp_path / "small.npz"
    np.savez(path, X=X, y=y)
    return path


# ---------------------------------------------------------------------------------------------------------- #
# data


def test_digits_split_standardisation_and_corruption(digits):
    assert digits.n_classes == 10 and digits.classes == tuple(range(10))
    assert (digits.n_train, digits.X_val.shape[0], digits.X_test.shape[0]) == (1079, 359, 359)
    assert digits.n_features == 64
    rows = torch.cat([digits.train_rows, digits.val_rows, digits.test_rows])
    assert torch.equal(rows.sort().values, torch.arange(1797))  # disjoint and complete
    mean, std = digits.X_train.mean(0), digits.X_train.std(0, unbiased=False)
    assert float(mean.abs().max()) < 1e-12
    assert torch.all(((std - 1).abs() < 1e-12) | (std == 0))  # constant pixels are only centred
    assert int((std == 0).sum()) >= 1
    # validation / test use the training statistics, so they are not exactly standardised
    assert float(digits.X_val.mean(0).abs().max()) > 1e-6
    # corruption: about half of the rows redrawn; changed labels only where redrawn; val / test clean
    frac = float(digits.replaced.double().mean())
    assert 0.45 < frac < 0.56
    assert not torch.any(digits.corrupted & ~digits.replaced)
    assert 0.38 < float(digits.corrupted.double().mean()) < 0.52  # about 0.5 * 9/10
    assert torch.equal(digits.y_train[~digits.replaced], digits.y_train_clean[~digits.replaced])
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target)
    assert torch.equal(digits.y_train_clean, target[digits.train_rows])
    assert torch.equal(digits.y_test, target[digits.test_rows])


def test_reproducible_seed_dtype_and_bias():
    a = make_cleaning_data(noise=0.3, seed=4)
    b = make_cleaning_data(noise=0.3, seed=4)
    c = make_cleaning_data(noise=0.3, seed=5)
    assert a.X_train.dtype == torch.float32
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.train_rows, b.train_rows)
    assert not torch.equal(a.train_rows, c.train_rows)
    clean = make_cleaning_data(noise=0.0, seed=4, add_bias=True, val_size=100, test_size=200)
    assert torch.equal(clean.y_train, clean.y_train_clean) and not clean.replaced.any()
    assert clean.n_features == 65 and torch.all(clean.X_train[:, -1] == 1)
    assert (clean.X_val.shape[0], clean.X_test.shape[0]) == (100, 200)


def test_corrupt_labels_uniform_over_classes():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(20000, dtype=torch.int64)
    noisy, replaced = corrupt_labels(y, 1.0, 4, gen)
    assert replaced.all()
    freq = torch.bincount(noisy, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.full((4,), 0.25, dtype=DT), atol=0.015, rtol=0)
    noisy, replaced = corrupt_labels(y, 0.2, 4, gen)
    assert abs(float(replaced.double().mean()) - 0.2) < 0.015
    assert torch.all(noisy[~replaced] == 0)
    with pytest.raises(ValueError, match=r"^noise must be a probability in \[0, 1\], got 1.5$"):
        corrupt_labels(y, 1.5, 4)
    with pytest.raises(ValueError, match=r"^n_classes must be an integer in \[2, inf\), got 1$"):
        corrupt_labels(y, 0.1, 1)


def test_npz_source(small_npz):
    X, y = load_npz_arrays(small_npz)
    assert X.shape == (45, 2, 2)
    data = make_cleaning_data(small_npz, noise=0.0, val_size=0.2, test_size=9, dtype=DT)
    assert data.classes == ("cat", "dog", "emu") and data.n_classes == 3
    assert data.n_features == 4 and (data.n_train, data.X_val.shape[0], data.X_test.shape[0]) == (27, 9, 9)
    # labels are the codes of the original strings
    codes = torch.as_tensor(np.unique(y, return_inverse=True)[1])
    assert torch.equal(data.y_train_clean, codes[data.train_rows])


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        make_cleaning_data(tmp_path / "nope.npz")
    p = tmp_path / "nokey.npz"
    np.savez(p, X=np.zeros((4, 2)), labels=np.arange(4))
    with pytest.raises(
        ValueError, match=r"missing array\(s\) \['y'\]; the file has \['X', 'labels'\], needs"
    ):
        make_cleaning_data(p)
    p = tmp_path / "mismatch.npz"
    np.savez(p, X=np.zeros((4, 2)), y=np.arange(5))
    with pytest.raises(ValueError, match="X has 4 rows but y has 5 labels"):
        make_cleaning_data(p)
    p = tmp_path / "oneclass.npz"
    np.savez(p, X=np.zeros((10, 2)), y=np.ones(10))
    with pytest.raises(ValueError, match="need at least 2 classes, got 1"):
        make_cleaning_data(p)
    p = tmp_path / "vector.npz"
    np.savez(p, X=np.zeros(10), y=np.arange(10) % 2)
    with pytest.raises(ValueError, match=r"X must have shape \(n, d\)"):
        make_cleaning_data(p)
    p = tmp_path / "text.npz"
    p.write_text("not a zip file")
    with pytest.raises(ValueError, match=r"not a readable \.npz file"):
        make_cleaning_data(p)
    p = tmp_path / "array.npy"
    np.save(p, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"is a \.npy array, not an \.npz archive"):
        make_cleaning_data(p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": -0.1}, r"^noise must be a probability in \[0, 1\], got -0.1$"),
        ({"val_size": 1.5}, r"^val_size must be a fraction in \(0, 1\) or a row count"),
        (
            {"test_size": 0},
            r"^test_size must be a fraction in \(0, 1\) or a row count in \[1, 1797\), got 0$",
        ),
        ({"val_size": 0.5, "test_size": 0.5}, r"leave 1 of 1797 rows to train"),
        ({"seed": "a"}, r"^seed must be an integer"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cleaning_data(**kwargs)


# ---------------------------------------------------------------------------------------------------------- #
# losses


def test_losses_match_torch_cross_entropy(digits):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 10, generator=gen, dtype=DT) * 0.1
    idx = torch.tensor([3, 10, 500, 7])
    batch = digits.train_batch(idx)
    x_full = torch.randn(digits.n_train, generator=gen, dtype=DT)
    x_b = x_full[batch["idx"]]
    ce = F.cross_entropy(batch["X"] @ W, batch["y"], reduction="none")
    torch.testing.assert_close(cross_entropy(W, batch["X"], batch["y"]), ce)
    expected = (torch.sigmoid(x_b) * ce).mean() + DEFAULT_REG * W.pow(2).sum()
    torch.testing.assert_close(inner_loss(x_b, W, batch), expected)
    torch.testing.assert_close(inner_loss(x_b, W, batch, reg=1e-3), expected - (0.2 - 1e-3) * W.pow(2).sum())
    val = digits.val_batch()
    torch.testing.assert_close(outer_loss(None, W, val), F.cross_entropy(val["X"] @ W, val["y"]))
    # the gradient in x touches only the batch coordinates: d g / d x_j = sigma'(x_j) CE_j / b
    gx = grad(inner_loss)(x_b, W, batch)
    sig = torch.sigmoid(x_b)
    torch.testing.assert_close(gx, sig * (1 - sig) * ce / 4)


def test_losses_vmap_over_blocks(digits):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, digits.n_train, (3, 5), generator=gen)
    batch = digits.train_batch(idx)
    xs = torch.randn(digits.n_train, generator=gen, dtype=DT)[idx]
    Ws = torch.randn(3, 64, 10, generator=gen, dtype=DT) * 0.1
    gW = vmap(grad(inner_loss, argnums=1))(xs, Ws, batch)
    for k in range(3):
        one = {key: t[k] for key, t in batch.items()}
        torch.testing.assert_close(gW[k], grad(inner_loss, argnums=1)(xs[k], Ws[k], one))


def test_accuracy():
    W = torch.eye(2, dtype=DT)
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]], dtype=DT)
    assert accuracy(W, X, torch.tensor([0, 1, 1, 1])) == 0.75


# ---------------------------------------------------------------------------------------------------------- #
# exact lower-level solution and hypergradient


def test_inner_solution_is_stationary_and_cleaning_helps(digits):
    x = torch.zeros(digits.n_train, dtype=DT)
    W = inner_solution(x, digits)
    g = grad(inner_loss, argnums=1)(x, W, digits.train_batch())
    assert float(g.abs().max()) < 1e-9
    acc_noisy = accuracy(W, digits.X_test, digits.y_test)
    # oracle weights (drop the corrupted rows) give a better model: the bilevel problem is meaningful
    oracle = torch.where(digits.corrupted, -10.0, 10.0).to(DT)
    acc_clean = accuracy(inner_solution(oracle, digits), digits.X_test, digits.y_test)
    assert acc_clean > acc_noisy and acc_clean > 0.85


def test_hypergradient_matches_finite_differences(small_npz):
    data = make_cleaning_data(small_npz, noise=0.4, seed=1, dtype=DT)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(data.n_train, generator=gen, dtype=DT)
    reg = 0.05
    hg = hypergradient(x, data, reg)
    assert hg.shape == (data.n_train,)
    eps = 1e-5
    for _ in range(3):
        u = torch.randn(data.n_train, generator=gen, dtype=DT)
        fd = (value(x + eps * u, data, reg) - value(x - eps * u, data, reg)) / (2 * eps)
        assert float(hg @ u) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
    j = 5
    e = torch.zeros(data.n_train, dtype=DT)
    e[j] = 1.0
    fd_j = (value(x + eps * e, data, reg) - value(x - eps * e, data, reg)) / (2 * eps)
    assert float(hg[j]) == pytest.approx(float(fd_j), rel=1e-6, abs=1e-10)


def test_inner_solution_rejects_non_strongly_convex(digits):
    with pytest.raises(ValueError, match=r"reg must be in \(0, inf\)"):
        inner_solution(torch.zeros(digits.n_train, dtype=DT), digits, reg=0.0)
