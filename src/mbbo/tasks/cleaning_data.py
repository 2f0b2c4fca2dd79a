"""Data and losses of task T4, data hyper-cleaning (Franceschi et al. 2017; stocBiO; benchopt ``mnist``).

Problem, with per-sample weights sigma(x_j) on the training rows and a linear multinomial model W (d x K)::

    g(x, W) = (1/n) sum_j sigma(x_j) CE(W; a_j, noisy_j) + reg * ||W||_F^2       (lower level)
    f(W)    = (1/m) sum_{i in val} CE(W; a_i, y_i)                                (upper level, clean labels)
    CE(W; a, y) = logsumexp(W^T a) - (W^T a)_y

The ridge has no 1/2, as in benchopt (``reg`` = 0.2, the default here); stocBiO's hyper-cleaning code uses
reg = 1e-3. There is no intercept (benchopt's model is linear); ``add_bias=True`` appends a constant feature.

Data: scikit-learn's bundled ``digits`` (8x8 images, 10 classes, 1797 rows, no download) by default, or any
``.npz`` file with arrays ``X`` (n x ..., flattened to n x d) and ``y`` (n labels of any type). The rows are
shuffled with a fixed seed and split into disjoint train / validation / test parts; features are standardised
with the training mean and standard deviation (constant features are only centred). Every training label is
replaced, with probability ``noise``, by a class drawn uniformly from all K classes (it may land on the true
class, so the expected fraction of wrong labels is noise * (K - 1) / K, as in benchopt); ``replaced`` is that
corruption mask, ``corrupted`` the mask of labels that actually differ. Validation and test labels stay clean.

Batches are dicts of gathered rows: ``{"X": (b, d), "y": (b,) int64, "idx": (b,) int64}``. The loss functions
take ``x_batch``, the upper variable *restricted to the batch rows* (x[batch["idx"]]), so the hypergradient of
a mini-batch touches only its b coordinates of x (keep it as (idx, values) and index_add into the dense x).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CleaningData",
    "accuracy",
    "corrupt_labels",
    "cross_entropy",
    "hypergradient",
    "inner_loss",
    "inner_solution",
    "load_npz_arrays",
    "make_cleaning_data",
    "outer_loss",
    "value",
]

DEFAULT_REG = 0.2
"""benchopt's ridge coefficient for data cleaning (stocBiO uses 1e-3)."""


# ----------------------------------------------------------------------------------------------------------
# loss functions


def cross_entropy(W: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """Per-sample multinomial cross-entropy logsumexp(X W) - (X W)_y, shape (b,). W: (d, K), X: (b, d)."""
    logits = X @ W
    picked = torch.gather(logits, -1, y.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


def inner_loss(x_batch: Tensor, W: Tensor, batch: dict[str, Tensor], reg: float = DEFAULT_REG) -> Tensor:
    """g on a batch: mean_j sigmoid(x_j) CE(W; a_j, y_j) + reg ||W||^2, with x_batch = x[batch["idx"]] (b,).

    Pure and vmap-friendly (vmap over blocks of gathered batches).
    """
    weights = torch.sigmoid(x_batch)
    return (weights * cross_entropy(W, batch["X"], batch["y"])).mean() + reg * (W * W).sum()


def outer_loss(x_batch: Tensor | None, W: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """f on a (validation) batch: mean CE(W; a_i, y_i). ``x_batch`` is ignored (f does not depend on x)."""
    return cross_entropy(W, batch["X"], batch["y"]).mean()


def accuracy(W: Tensor, X: Tensor, y: Tensor) -> float:
    """Fraction of rows whose arg-max class is y (the error rate is 1 - accuracy)."""
    with torch.no_grad():
        return float(((X @ W).argmax(dim=-1) == y).to(torch.float64).mean())


# ----------------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class CleaningData:
    """Standardised, split and corrupted data for hyper-cleaning (see the module docstring)."""

    X_train: Tensor
    y_train: Tensor  # noisy labels (what the lower level sees)
    y_train_clean: Tensor
    replaced: Tensor  # bool corruption mask: the label was redrawn
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int
    classes: tuple[object, ...]  # original label values, class k <-> classes[k]
    noise: float
    train_rows: Tensor  # row indices of each part in the source arrays (after flattening)
    val_rows: Tensor
    test_rows: Tensor

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def corrupted(self) -> Tensor:
        """Bool mask of training labels that differ from the clean ones."""
        return self.y_train != self.y_train_clean

    def train_batch(self, idx: Tensor | None = None) -> dict[str, Tensor]:
        """Gathered training rows (all if None) with their indices; idx may have any shape (e.g. (B, b))."""
        if idx is None:
            idx = torch.arange(self.n_train, device=self.X_train.device)
        return {"X": self.X_train[idx], "y": self.y_train[idx], "idx": idx}

    def val_batch(self, idx: Tensor | None = None) -> dict[str, Tensor]:
        if idx is None:
            idx = torch.arange(self.X_val.shape[0], device=self.X_val.device)
        return {"X": self.X_val[idx], "y": self.y_val[idx], "idx": idx}

    def test_batch(self) -> dict[str, Tensor]:
        idx = torch.arange(self.X_test.shape[0], device=self.X_test.device)
        return {"X": self.X_test, "y": self.y_test, "idx": idx}


def load_npz_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``X`` (n x ..., flattened to 2-D) and ``y`` (n,) from an ``.npz`` file, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    try:
        archive = np.load(p, allow_pickle=False)
    except (OSError, EOFError, ValueError) as err:  # what np.load raises for files it cannot read
        raise ValueError(f"{p} is not a readable .npz file: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{p} is a .npy array, not an .npz archive with arrays 'X' and 'y'")
    with archive:
        keys = set(archive.files)
        missing = [k for k in ("X", "y") if k not in keys]
        if missing:
            raise ValueError(
                f"{p}: missing array(s) {missing}; the file has {sorted(keys)}, needs 'X' and 'y'"
            )
        try:
            X, y = np.asarray(archive["X"]), np.asarray(archive["y"])
        except ValueError as err:  # object arrays need pickle, which is refused
            raise ValueError(f"{p}: arrays 'X' and 'y' must be plain (non-object) arrays: {err}") from err
    return X, y


def _check_arrays(X: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if X.ndim < 2:
        raise ValueError(f"{where}: X must have shape (n, d) or (n, ...), got {X.shape}")
    y = np.squeeze(y) if y.ndim > 1 and max(y.shape[1:]) == 1 else y
    if y.ndim != 1:
        raise ValueError(f"{where}: y must be one label per row, shape (n,), got {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    X = X.reshape(X.shape[0], -1)
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{where}: X must be numeric, got dtype {X.dtype}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{where}: X contains NaN or infinite values")
    if np.unique(y).size < 2:
        raise ValueError(f"{where}: need at least 2 classes, got {np.unique(y).size}")
    return X, y


def _split_sizes(n: int, val_size: float | int, test_size: float | int) -> tuple[int, int, int]:
    def count(name: str, size: float | int) -> int:
        if isinstance(size, bool) or not isinstance(size, int | float):
            raise ValueError(f"{name} must be a fraction in (0, 1) or a row count in [1, n), got {size!r}")
        if isinstance(size, float):
            if not 0.0 < size < 1.0:
                raise ValueError(
                    f"{name} must be a fraction in (0, 1) or a row count in [1, n), got {size!r}"
                )
            return max(1, round(size * n))
        if not 1 <= size < n:
            raise ValueError(f"{name} must be a fraction in (0, 1) or a row count in [1, {n}), got {size!r}")
        return size

    n_val, n_test = count("val_size", val_size), count("test_size", test_size)
    n_train = n - n_val - n_test
    if n_train < 2:
        raise ValueError(
            f"val_size={val_size!r} and test_size={test_size!r} leave {n_train} of {n} rows to train"
        )
    return n_train, n_val, n_test


def corrupt_labels(
    y: Tensor, noise: float, n_classes: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Replace each label, with probability ``noise``, by a class drawn uniformly in {0, ..., n_classes - 1}.

    Returns (noisy labels, bool mask of the replaced rows). A replaced label can equal the original one.
    """
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a probability in [0, 1], got {noise!r}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer in [2, inf), got {n_classes!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    replaced = torch.rand(y.shape, generator=generator, device=device) < noise
    random_labels = torch.randint(0, n_classes, y.shape, generator=generator, device=device)
    noisy = torch.where(replaced, random_labels, y.to(device))
    return noisy.to(y.device), replaced.to(y.device)


def make_cleaning_data(
    source: str | Path = "digits",
    *,
    noise: float = 0.5,
    val_size: float | int = 0.2,
    test_size: float | int = 0.2,
    seed: int = 0,
    standardize: bool = True,
    add_bias: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> CleaningData:
    """Build T4 data from scikit-learn's ``"digits"`` (default) or from a ``.npz`` file path.

    ``val_size`` / ``test_size``: fractions of all rows in (0, 1) or row counts; the rest is the training set.
    ``seed`` fixes both the split and the corruption (one torch.Generator on the CPU, split first).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(noise, int | float) and not isinstance(noise, bool) and 0.0 <= noise <= 1.0):
        raise ValueError(f"noise must be a probability in [0, 1], got {noise!r}")
    if isinstance(source, str) and source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        X_np, y_np = _check_arrays(np.asarray(bunch.data), np.asarray(bunch.target), "digits")
    else:
        X_np, y_np = _check_arrays(*load_npz_arrays(source), str(source))

    classes, y_codes = np.unique(y_np, return_inverse=True)
    n = X_np.shape[0]
    n_train, n_val, _ = _split_sizes(n, val_size, test_size)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).numpy()
    parts = np.split(perm, [n_train, n_train + n_val])

    X64 = X_np.astype(np.float64)
    if standardize:
        mean = X64[parts[0]].mean(axis=0)
        std = X64[parts[0]].std(axis=0)
        std[std == 0] = 1.0
        X64 = (X64 - mean) / std
    if add_bias:
        X64 = np.concatenate([X64, np.ones((n, 1))], axis=1)

    def tx(rows: np.ndarray) -> Tensor:
        return torch.as_tensor(X64[rows], dtype=dtype, device=device)

    def ty(rows: np.ndarray) -> Tensor:
        return torch.as_tensor(y_codes[rows], dtype=torch.int64, device=device)

    y_clean = ty(parts[0])
    y_noisy, replaced = corrupt_labels(y_clean.cpu(), float(noise), len(classes), gen)
    return CleaningData(
        X_train=tx(parts[0]),
        y_train=y_noisy.to(device),
        y_train_clean=y_clean,
        replaced=replaced.to(device),
        X_val=tx(parts[1]),
        y_val=ty(parts[1]),
        X_test=tx(parts[2]),
        y_test=ty(parts[2]),
        n_classes=len(classes),
        classes=tuple(c.item() if hasattr(c, "item") else c for c in classes),
        noise=float(noise),
        train_rows=torch.as_tensor(parts[0], dtype=torch.int64),
        val_rows=torch.as_tensor(parts[1], dtype=torch.int64),
        test_rows=torch.as_tensor(parts[2], dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------------------
# exact lower-level solution and hypergradient (small problems: the Hessian is formed, (dK)^2 entries)


def _inner_grad_hess(x: Tensor, W: Tensor, X: Tensor, y: Tensor, reg: float) -> tuple[Tensor, Tensor]:
    n, d = X.shape
    k = W.shape[1]
    w = torch.sigmoid(x) / n
    probs = torch.softmax(X @ W, dim=-1)
    resid = probs - torch.nn.functional.one_hot(y, k).to(W.dtype)
    grad = X.T @ (w.unsqueeze(-1) * resid) + 2 * reg * W
    # per-sample softmax Hessians S_j = diag(p_j) - p_j p_j^T, weighted
    s = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    z = (w.view(n, 1, 1, 1) * X.view(n, d, 1, 1) * s.view(n, 1, k, k)).reshape(n, d * k * k)
    hess = (z.T @ X).reshape(d, k, k, d).permute(0, 1, 3, 2).reshape(d * k, d * k)
    hess = 0.5 * (hess + hess.T) + 2 * reg * torch.eye(d * k, dtype=W.dtype, device=W.device)
    return grad, hess


def inner_solution(
    x: Tensor,
    data: CleaningData,
    reg: float = DEFAULT_REG,
    *,
    W0: Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> Tensor:
    """W*(x) = argmin_W g(x, W) on the full training set, by damped Newton (backtracking on g).

    Stops after a Newton step of norm <= tol (1 + ||W||), taken in full. Forms the (dK x dK) Hessian: fine
    for digits (d K = 640), not for MNIST.
    """
    if not reg > 0:
        raise ValueError(f"reg must be in (0, inf) for a strongly convex lower level, got {reg!r}")
    batch = data.train_batch()
    X, y = batch["X"], batch["y"]
    d, k = data.n_features, data.n_classes
    W = torch.zeros(d, k, dtype=X.dtype, device=X.device) if W0 is None else W0.clone()
    x = x.to(X.dtype)
    loss = inner_loss(x, W, batch, reg)
    for _ in range(max_iter):
        grad, hess = _inner_grad_hess(x, W, X, y, reg)
        step = torch.linalg.solve(hess, grad.reshape(-1)).reshape(d, k)
        if float(torch.linalg.vector_norm(step)) <= tol * (1.0 + float(torch.linalg.vector_norm(W))):
            W = W - step  # last full Newton step: error O(||step||^2) by quadratic convergence
            break
        t = 1.0
        while True:
            candidate = W - t * step
            new_loss = inner_loss(x, candidate, batch, reg)
            slack = 1e-14 * abs(float(loss))  # rounding of the loss values near the solution
            if new_loss <= loss - 1e-4 * t * (grad * step).sum() + slack or t < 1e-10:
                break
            t *= 0.5
        W, loss = candidate, new_loss
    return W


def value(x: Tensor, data: CleaningData, reg: float = DEFAULT_REG, W: Tensor | None = None) -> Tensor:
    """h(x) = f(W*(x)) on the full validation set (W* computed unless given)."""
    W = inner_solution(x, data, reg) if W is None else W
    return outer_loss(None, W, data.val_batch())


def hypergradient(x: Tensor, data: CleaningData, reg: float = DEFAULT_REG, W: Tensor | None = None) -> Tensor:
    """grad h(x) = -(grad_xW g) v with v = (grad_WW g)^{-1} grad_W f at W*(x), shape (n_train,).

    Component j: -(1/n) sigma'(x_j) <grad_W CE_j, V> = -(1/n) sigma'(x_j) sum_k (a_j^T V)_k (p_jk - [y_j=k]).
    """
    W = inner_solution(x, data, reg) if W is None else W
    batch = data.train_batch()
    X, y = batch["X"], batch["y"]
    x = x.to(X.dtype)
    _, hess = _inner_grad_hess(x, W, X, y, reg)
    val = data.val_batch()
    probs_val = torch.softmax(val["X"] @ W, dim=-1)
    onehot_val = torch.nn.functional.one_hot(val["y"], data.n_classes).to(W.dtype)
    grad_f = val["X"].T @ (probs_val - onehot_val) / val["X"].shape[0]
    factor = torch.linalg.cholesky(hess)
    v = torch.cholesky_solve(grad_f.reshape(-1, 1), factor).reshape(W.shape)
    probs = torch.softmax(X @ W, dim=-1)
    resid = probs - torch.nn.functional.one_hot(y, data.n_classes).to(W.dtype)
    inner = ((X @ v) * resid).sum(-1)
    sig = torch.sigmoid(x)
    return -(sig * (1 - sig)) * inner / X.shape[0]
