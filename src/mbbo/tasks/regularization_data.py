"""Data and loss functions of task T5, per-feature regularisation selection (benchopt ``ijcnn1``; stocBiO's
20 Newsgroups experiment uses the same model with one weight per feature).

Binary logistic regression with one ridge weight per feature, labels y in {-1, +1}::

    g(x, z) = (1/n) sum_j log(1 + exp(-y_j a_j^T z)) + 1/2 sum_k exp(x_k) z_k^2     (lower, training rows)
    f(z)    = (1/m) sum_{i in val} log(1 + exp(-y_i a_i^T z))                       (upper, validation rows)

``parametrization="lin"`` replaces exp(x_k) by x_k (benchopt's ``reg_parametrization='lin'``; then x > 0).
The task spec names ijcnn1, which cannot be downloaded here: any LIBSVM binary file works (a8a in the tests).
This module takes arrays (dense or scipy sparse), e.g. from the LIBSVM loader::

    ds = mbbo.data.libsvm.load_binary_dataset("a8a", data_dir=...)
    data = make_regularization_data(ds.X_train, ds.y_train, ds.X_test, ds.y_test)

splits the training rows into disjoint train / validation parts (validation = ceil(0.2 n) rows by default, as
in task T1: a8a 18,156 / 4,540) and keeps the optional test set. Features are used as they are (benchopt does
not rescale ijcnn1).

Batches are dicts ``{"X": (b, d), "y": (b,)}`` of gathered rows (y as +-1 in the feature dtype). Losses are
pure and vmap-friendly. Closed forms for the metric ||grad h||^2 (benchopt's ``value``):
:func:`inner_solution` (damped Newton, d x d Hessian) and :func:`hypergradient` by implicit differentiation,

    grad h(x) = -(grad_xz g) v = -(exp(x) * z*) * v,   v = (grad_zz g)^{-1} grad_z f(z*)   ("exp")

(grad_xz g is diagonal: d/dx_k of exp(x_k) z_k is exp(x_k) z_k; with "lin" it is z_k.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RegularizationData",
    "accuracy",
    "hypergradient",
    "initial_point",
    "inner_loss",
    "inner_solution",
    "log_loss",
    "make_regularization_data",
    "outer_loss",
    "value",
]

Parametrization = Literal["exp", "lin"]


def _reg_weights(x: Tensor, parametrization: Parametrization) -> Tensor:
    if parametrization == "exp":
        return torch.exp(x)
    if parametrization == "lin":
        return x
    raise ValueError(f"parametrization must be one of 'exp', 'lin', got {parametrization!r}")


def log_loss(z: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """Mean logistic loss mean_j log(1 + exp(-y_j a_j^T z)) (computed with softplus, stable)."""
    return torch.nn.functional.softplus(-y * (X @ z)).mean()


def inner_loss(
    x: Tensor, z: Tensor, batch: dict[str, Tensor], parametrization: Parametrization = "exp"
) -> Tensor:
    """g on a batch: mean logistic loss + 1/2 sum_k exp(x_k) z_k^2 (or x_k z_k^2 / 2 with "lin")."""
    return log_loss(z, batch["X"], batch["y"]) + 0.5 * (_reg_weights(x, parametrization) * z * z).sum()


def outer_loss(x: Tensor | None, z: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """f on a (validation) batch: the mean logistic loss. ``x`` is ignored (f does not depend on x)."""
    return log_loss(z, batch["X"], batch["y"])


def accuracy(z: Tensor, X: Tensor, y: Tensor) -> float:
    """Fraction of rows with sign(a^T z) = y (a score of exactly 0 counts as +1)."""
    with torch.no_grad():
        pred = torch.where(X @ z >= 0, 1.0, -1.0)
        return float((pred == y).to(torch.float64).mean())


@dataclass(frozen=True)
class RegularizationData:
    """Train / validation (/ test) tensors for T5; labels are +-1 in the feature dtype."""

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor | None = None
    y_test: Tensor | None = None

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]

    def train_batch(self, idx: Tensor | None = None) -> dict[str, Tensor]:
        """Gathered training rows (all if None); idx may have any shape, e.g. (B, b) for B blocks."""
        if idx is None:
            return {"X": self.X_train, "y": self.y_train}
        return {"X": self.X_train[idx], "y": self.y_train[idx]}

    def val_batch(self, idx: Tensor | None = None) -> dict[str, Tensor]:
        if idx is None:
            return {"X": self.X_val, "y": self.y_val}
        return {"X": self.X_val[idx], "y": self.y_val[idx]}

    def test_batch(self) -> dict[str, Tensor]:
        if self.X_test is None or self.y_test is None:
            raise ValueError("this data set has no test part (pass X_test and y_test)")
        return {"X": self.X_test, "y": self.y_test}


def _dense(X: Any, where: str) -> np.ndarray:
    if hasattr(X, "toarray"):  # scipy sparse
        X = X.toarray()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{where}: X must be a 2-D array (n, d), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or not np.all(np.isfinite(X)):
        raise ValueError(f"{where}: X must be numeric and finite")
    return X


def _pm_one(y: Any, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    values = set(np.unique(y).tolist())
    if values <= {-1, 1} and values:
        return y.astype(np.float64)
    if values <= {0, 1} and values:
        return np.where(y == 1, 1.0, -1.0)
    raise ValueError(f"{where}: labels must be in {{-1, +1}} or {{0, 1}}, got values {sorted(values)[:5]}")


def make_regularization_data(
    X: Any,
    y: Any,
    X_test: Any | None = None,
    y_test: Any | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    add_bias: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RegularizationData:
    """Split (X, y) into disjoint train / validation rows (shuffled with ``seed``); convert to dense tensors.

    X may be a numpy array or a scipy sparse matrix (e.g. from ``sklearn.datasets.load_svmlight_file``);
    labels in {-1, +1} or {0, 1}. ``add_bias`` appends a constant-1 feature. Both classes must appear in the
    training part.
    """
    Xd = _dense(X, "X")
    yd = _pm_one(y, "y")
    if Xd.shape[0] != yd.shape[0]:
        raise ValueError(f"X has {Xd.shape[0]} rows but y has {yd.shape[0]} labels")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, float | int)
        or not 0 < val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    n = Xd.shape[0]
    n_val = math.ceil(round(val_fraction * n, 9))  # as mbbo.data.binary.held_out_size: a8a 18156 / 4540
    if n_val < 1 or n - n_val < 2:
        raise ValueError(
            f"val_fraction={val_fraction!r} on {n} rows leaves no usable train / validation split"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    train, val = perm[: n - n_val], perm[n - n_val :]
    if np.unique(yd[train]).size < 2:
        raise ValueError("the training part has a single class; need both labels")

    def tx(a: np.ndarray) -> Tensor:
        if add_bias:
            a = np.concatenate([a, np.ones((a.shape[0], 1), dtype=a.dtype)], axis=1)
        return torch.as_tensor(a, dtype=dtype, device=device)

    def ty(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    Xt = yt = None
    if (X_test is None) != (y_test is None):
        raise ValueError("pass both X_test and y_test, or neither")
    if X_test is not None:
        Xtd, ytd = _dense(X_test, "X_test"), _pm_one(y_test, "y_test")
        if Xtd.shape[1] != Xd.shape[1]:
            raise ValueError(f"X_test has {Xtd.shape[1]} features but X has {Xd.shape[1]}")
        if Xtd.shape[0] != ytd.shape[0]:
            raise ValueError(f"X_test has {Xtd.shape[0]} rows but y_test has {ytd.shape[0]} labels")
        Xt, yt = tx(Xtd), ty(ytd)
    return RegularizationData(tx(Xd[train]), ty(yd[train]), tx(Xd[val]), ty(yd[val]), Xt, yt)


def initial_point(
    n_features: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """benchopt's ijcnn1 initialisation: x0 = log U(0, 1) (per feature), z0 ~ N(0, I). Returns (x0, z0)."""
    x0 = torch.log(torch.rand(n_features, generator=generator, dtype=torch.float64))
    z0 = torch.randn(n_features, generator=generator, dtype=torch.float64)
    return x0.to(dtype=dtype, device=device), z0.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------
# exact lower-level solution and hypergradient


def _grad_hess(
    x: Tensor, z: Tensor, X: Tensor, y: Tensor, parametrization: Parametrization
) -> tuple[Tensor, Tensor]:
    n = X.shape[0]
    lam = _reg_weights(x, parametrization)
    margin = y * (X @ z)
    s = torch.sigmoid(-margin)  # d/dm softplus(-m) = -sigmoid(-m)
    grad = -(X.T @ (y * s)) / n + lam * z
    curv = s * (1 - s) / n
    hess = X.T @ (curv.unsqueeze(-1) * X) + torch.diag(lam)
    return grad, 0.5 * (hess + hess.T)


def inner_solution(
    x: Tensor,
    data: RegularizationData,
    parametrization: Parametrization = "exp",
    *,
    z0: Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> Tensor:
    """z*(x) = argmin_z g(x, z) on the full training part, by damped Newton (Armijo backtracking on g).

    Stops after a Newton step of norm <= tol (1 + ||z||), taken in full. Forms the d x d Hessian (d = 123
    for a8a, 300 for w8a).
    """
    X, y = data.X_train, data.y_train
    x = x.to(X.dtype)
    if not bool((_reg_weights(x, parametrization) > 0).all()):
        raise ValueError("the ridge weights must be positive (x > 0 with parametrization='lin')")
    z = torch.zeros(data.n_features, dtype=X.dtype, device=X.device) if z0 is None else z0.clone()
    batch = data.train_batch()
    loss = inner_loss(x, z, batch, parametrization)
    for _ in range(max_iter):
        grad, hess = _grad_hess(x, z, X, y, parametrization)
        step = torch.cholesky_solve(grad.unsqueeze(-1), torch.linalg.cholesky(hess)).squeeze(-1)
        if float(torch.linalg.vector_norm(step)) <= tol * (1.0 + float(torch.linalg.vector_norm(z))):
            z = z - step  # last full Newton step: error O(||step||^2) by quadratic convergence
            break
        t = 1.0
        while True:
            candidate = z - t * step
            new_loss = inner_loss(x, candidate, batch, parametrization)
            slack = 1e-14 * abs(float(loss))  # rounding of the loss values near the solution
            if new_loss <= loss - 1e-4 * t * (grad @ step) + slack or t < 1e-10:
                break
            t *= 0.5
        z, loss = candidate, new_loss
    return z


def value(
    x: Tensor, data: RegularizationData, parametrization: Parametrization = "exp", z: Tensor | None = None
) -> Tensor:
    """h(x) = f(z*(x)), the validation log-loss at the lower-level solution (z* computed unless given)."""
    z = inner_solution(x, data, parametrization) if z is None else z
    return outer_loss(None, z, data.val_batch())


def hypergradient(
    x: Tensor, data: RegularizationData, parametrization: Parametrization = "exp", z: Tensor | None = None
) -> Tensor:
    """grad h(x) = -(grad_xz g) v, v = (grad_zz g)^{-1} grad_z f, all at z*(x) (computed unless given)."""
    z = inner_solution(x, data, parametrization) if z is None else z
    x = x.to(z.dtype)
    _, hess = _grad_hess(x, z, data.X_train, data.y_train, parametrization)
    Xv, yv = data.X_val, data.y_val
    grad_f = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ z)))) / Xv.shape[0]
    v = torch.cholesky_solve(grad_f.unsqueeze(-1), torch.linalg.cholesky(hess)).squeeze(-1)
    cross_diag = torch.exp(x) * z if parametrization == "exp" else z
    return -cross_diag * v
