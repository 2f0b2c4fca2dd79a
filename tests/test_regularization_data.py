from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.func import grad, vmap

from mbbo.tasks.regularization_data import (
    RegularizationData,
    accuracy,
    hypergradient,
    initial_point,
    inner_loss,
    inner_solution,
    log_loss,
    make_regularization_data,
    outer_loss,
    value,
)

DT = torch.float64


def synthetic(n: int = 120, d: int = 5, seed: int = 0, labels01: bool = False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = np.where(X @ w + 0.5 * rng.normal(size=n) > 0, 1, -1)
    if labels01:
        y = (y + 1) // 2
    return X, y


@pytest.fixture(scope="module")
def data() -> RegularizationData:
    X, y = synthetic()
    Xt, yt = synthetic(40, seed=1)
    return make_regularization_data(X, y, Xt, yt, dtype=DT)


# ---------------------------------------------------------------------------------------------------------- #
# losses


def test_losses_by_hand(data):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, generator=gen, dtype=DT)
    z = torch.randn(5, generator=gen, dtype=DT)
    batch = data.train_batch(torch.tensor([0, 3, 7]))
    margins = batch["y"] * (batch["X"] @ z)
    logistic = torch.log1p(torch.exp(-margins)).mean()
    torch.testing.assert_close(log_loss(z, batch["X"], batch["y"]), logistic)
    torch.testing.assert_close(inner_loss(x, z, batch), logistic + 0.5 * (torch.exp(x) * z**2).sum())
    torch.testing.assert_close(inner_loss(x.abs(), z, batch, "lin"), logistic + 0.5 * (x.abs() * z**2).sum())
    torch.testing.assert_close(outer_loss(None, z, data.val_batch()), log_loss(z, data.X_val, data.y_val))
    # stable for huge margins (softplus, no overflow)
    big = {"X": torch.tensor([[1e4]], dtype=DT), "y": torch.tensor([-1.0], dtype=DT)}
    torch.testing.assert_close(
        log_loss(torch.ones(1, dtype=DT), big["X"], big["y"]), torch.tensor(1e4, dtype=DT)
    )
    with pytest.raises(ValueError, match="parametrization must be one of 'exp', 'lin', got 'log'"):
        inner_loss(x, z, batch, "log")  # type: ignore[arg-type]


def test_losses_vmap_over_blocks(data):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, data.n_train, (4, 6), generator=gen)
    batch = data.train_batch(idx)
    xs, zs = torch.randn(4, 5, generator=gen, dtype=DT), torch.randn(4, 5, generator=gen, dtype=DT)
    gz = vmap(grad(inner_loss, argnums=1))(xs, zs, batch)
    gx = vmap(grad(inner_loss, argnums=0))(xs, zs, batch)
    for k in range(4):
        one = {key: t[k] for key, t in batch.items()}
        torch.testing.assert_close(gz[k], grad(inner_loss, argnums=1)(xs[k], zs[k], one))
        torch.testing.assert_close(gx[k], 0.5 * torch.exp(xs[k]) * zs[k] ** 2)


def test_accuracy():
    X = torch.tensor([[1.0], [-1.0], [0.0], [2.0]])
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert accuracy(torch.ones(1), X, y) == 0.75


# ---------------------------------------------------------------------------------------------------------- #
# data


def test_split_labels_sparse_and_bias():
    X, y = synthetic(100, labels01=True)
    d = make_regularization_data(sp.csr_matrix(X), y, val_fraction=0.25, seed=3, add_bias=True)
    assert d.X_train.dtype == torch.float32
    assert (d.n_train, d.X_val.shape[0]) == (75, 25) and d.n_features == 6
    assert torch.all(d.X_train[:, -1] == 1)
    assert set(d.y_train.unique().tolist()) == {-1.0, 1.0}  # {0, 1} mapped to {-1, +1}
    # disjoint and complete: the rows (without the bias) are a permutation of X
    rows = torch.cat([d.X_train[:, :-1], d.X_val[:, :-1]]).double()
    ref = torch.as_tensor(X).float().double()
    assert torch.equal(rows[rows[:, 0].argsort()], ref[ref[:, 0].argsort()])
    same = make_regularization_data(X, y, val_fraction=0.25, seed=3, add_bias=True)
    assert torch.equal(same.X_train, d.X_train)
    other = make_regularization_data(X, y, val_fraction=0.25, seed=4)
    assert not torch.equal(other.X_train, d.X_train[:, :-1])
    with pytest.raises(ValueError, match="no test part"):
        d.test_batch()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda X, y: make_regularization_data(X, y[:-1]), "X has 120 rows but y has 119 labels"),
        (lambda X, y: make_regularization_data(X, y + 2), r"labels must be in \{-1, \+1\} or \{0, 1\}"),
        (lambda X, y: make_regularization_data(X[:, 0], y), r"X must be a 2-D array"),
        (lambda X, y: make_regularization_data(X, y, val_fraction=1.0), r"^val_fraction must be in \(0, 1\)"),
        (lambda X, y: make_regularization_data(X, y, X[:, :2], y), "X_test has 2 features but X has 5"),
        (lambda X, y: make_regularization_data(X, y, X), "pass both X_test and y_test"),
        (lambda X, y: make_regularization_data(X, np.ones_like(y)), "single class"),
        (lambda X, y: make_regularization_data(np.full_like(X, np.nan), y), "numeric and finite"),
    ],
)
def test_validation(call, match):
    X, y = synthetic()
    with pytest.raises(ValueError, match=match):
        call(X, y)


def test_initial_point_is_benchopts():
    x0, z0 = initial_point(1000, torch.Generator().manual_seed(0), dtype=DT)
    assert torch.all(x0 < 0)  # log of U(0, 1)
    assert abs(float(torch.exp(x0).mean()) - 0.5) < 0.05 and abs(float(z0.std()) - 1.0) < 0.1


# ---------------------------------------------------------------------------------------------------------- #
# exact solution and hypergradient


@pytest.mark.parametrize("parametrization", ["exp", "lin"])
def test_inner_solution_and_hypergradient_vs_finite_differences(data, parametrization):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, generator=gen, dtype=DT) - 2.0
    if parametrization == "lin":
        x = torch.exp(x)
    z = inner_solution(x, data, parametrization)
    g = grad(inner_loss, argnums=1)(x, z, data.train_batch(), parametrization)
    assert float(g.abs().max()) < 1e-10
    hg = hypergradient(x, data, parametrization, z=z)
    eps = 1e-6
    fd = torch.stack(
        [
            (value(x + eps * e, data, parametrization) - value(x - eps * e, data, parametrization))
            / (2 * eps)
            for e in torch.eye(5, dtype=DT)
        ]
    )
    torch.testing.assert_close(hg, fd, rtol=1e-6, atol=1e-9)
    assert float(hg.abs().max()) > 1e-6  # a non-trivial gradient: the comparison is meaningful


def test_hypergradient_matches_autograd_through_newton_system(data):
    """grad h = -(grad_xz g) v with v solving grad_zz g v = grad_z f: check against torch.func oracles."""
    x = torch.full((5,), -1.0, dtype=DT)
    z = inner_solution(x, data)
    batch = data.train_batch()
    hess = torch.func.hessian(inner_loss, argnums=1)(x, z, batch)
    gz_f = grad(outer_loss, argnums=1)(None, z, data.val_batch())
    v = torch.linalg.solve(hess, gz_f)
    jv = grad(lambda xx: grad(inner_loss, argnums=1)(xx, z, batch) @ v)(x)
    torch.testing.assert_close(hypergradient(x, data, z=z), -jv)


def test_lin_parametrization_needs_positive_weights(data):
    with pytest.raises(ValueError, match="ridge weights must be positive"):
        inner_solution(torch.zeros(5, dtype=DT), data, "lin")


def test_a8a_at_real_size(shared_data):
    from sklearn.datasets import load_svmlight_file

    X, y = load_svmlight_file(str(shared_data / "libsvm" / "a8a"), n_features=123)
    Xt, yt = load_svmlight_file(str(shared_data / "libsvm" / "a8a.t"), n_features=123)
    d = make_regularization_data(X, y, Xt, yt, dtype=DT)
    assert (d.n_train, d.X_val.shape[0], d.X_test.shape[0], d.n_features) == (18156, 4540, 9865, 123)
    x = torch.full((123,), -4.0, dtype=DT)
    z = inner_solution(x, d)
    g = grad(inner_loss, argnums=1)(x, z, d.train_batch())
    assert float(g.abs().max()) < 1e-8
    hg = hypergradient(x, d, z=z)
    assert hg.shape == (123,) and torch.isfinite(hg).all()
    assert 0.3 < float(value(x, d, z=z)) < 0.4
    assert accuracy(z, d.X_test, d.y_test) > 0.83
    # mini-batch losses run on gathered rows of the real data, in float32 too
    d32 = make_regularization_data(X, y, dtype=torch.float32)
    idx = torch.randint(0, d32.n_train, (10, 32), generator=torch.Generator().manual_seed(0))
    out = vmap(inner_loss)(x.float().expand(10, 123), torch.zeros(10, 123), d32.train_batch(idx))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((10,), float(np.log(2.0))))
