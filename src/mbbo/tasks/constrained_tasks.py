"""Tasks with a constrained lower level (constrained.md section 5), for `sflcb`, `blocc`, `lv_hba` and `penalty`:

- ``svm_slack``: SVM hyper-parameter optimisation with one slack bound C_i per training sample as the upper
  variable (the BLOCC/SFLCB harness). Lower: min_{w, b} 1/2 (||w||^2 + 0.01 b^2) s.t.
  1 - C_i - s_i (w^T a_i + b) <= 0 for the 500 training rows; upper: sum_val exp(1 - s (w^T a + b)) + 1/2 ||C||^2;
  C starts U(1, 5). Data: LIBSVM ``diabetes`` (8 features expanded to 45: 1, the features, their squares and the
  28 pairwise products) or ``fourclass`` (2 features), a seeded shuffle split 500 / 150 / rest (train / validation
  / test). Metrics: ``test_accuracy`` (of the model the method reports, `lower_variables()`), ``test_accuracy_<m>``
  and ``violation_<m>`` = max_i max(h_i(C, model), 0) for every model m of `reported_models()`, ``violation`` and
  ``val_loss`` (the upper objective at the reported model).
- ``toy_sflcb``: SFLCB's toy, min_{x in [0, 3]} f(x, y*) with y* = argmin_y (y - 2x)^2 s.t. y <= x (so y* = x) and
  f(x, y) = e^(2 - y) / (2 + cos 6x) + 1/2 log((4x - 2)^2 + 1); the answer is the minimiser of f(x, x) on a grid of
  3,000,001 points. ``starts`` random starts x0 ~ U(0, 3), y0 ~ U(0, 3) from ``data_seed``, solved at once as one
  separable problem. Metrics: ``distance`` = mean |x_i - x_grid|, ``fraction_found`` = share of starts within 1e-2
  of x_grid, ``objective_gap`` = mean f(x_i, x_i) - f(x_grid, x_grid), ``violation``.
- ``toy_coupled``: an LV-HBA-style coupled linear toy with a closed-form optimum: x, y in R^n,
  f = 1/2 ||x - B y||^2 + 1/2 ||A y - 1||^2, g = 1/2 y^T A^T A y - x^T A y + 1^T B y, constraint 1^T x + 1^T y = 0
  (two rows, <= 0 and >= 0). A (square, well conditioned) and B are drawn from ``data_seed``; the authors' A is
  n x 2n (g then not strongly convex): square A makes y*(x) affine and unique, so F(x) = f(x, y*(x)) is a convex
  quadratic whose minimiser x* is one linear solve. Metrics: ``distance`` = ||x - x*||, ``objective_gap`` =
  F(x) - F(x*), ``lower_error`` = ||model - y*(x)||, ``violation``.

Only the constrained methods fit these tasks (the allow-list), and they fit nothing else (`constrained_only`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.constrained import Box, ConstrainedProblem, LinearConstraint, violation
from mbbo.data.libsvm import LIBSVM_SINGLE, load_single_libsvm
from mbbo.problem import Batch, FullBatch
from mbbo.tasks.registry import TaskSpec, register_task
from mbbo.validation import check_int

__all__ = ["CONSTRAINED_ALGORITHMS", "CoupledToySettings", "SFLCBToySettings", "SVMSlackSettings",
           "build_svm_slack", "build_toy_coupled", "build_toy_sflcb", "expand_quadratic", "sflcb_toy_answer",
           "sflcb_toy_basin", "sflcb_toy_upper",
           "svm_split"]

CONSTRAINED_ALGORITHMS = ("sflcb", "blocc", "lv_hba", "penalty")
_REASON = "its lower level is constrained, h(x, y) <= 0: the unconstrained methods would ignore h"


def _models(algorithm: Any) -> dict[str, Tensor]:
    models = getattr(algorithm, "reported_models", None)
    return models() if callable(models) else {"y": algorithm.lower_variables()[0]}


class FullBatchEvaluator:
    """Base of the evaluators here: full-batch methods, one iteration is one epoch."""

    def iterations_per_epoch(self, block_batch: int = 1) -> int:
        return 1


# ---------------------------------------------------------------------------------------------------------
# svm_slack
# ---------------------------------------------------------------------------------------------------------


def expand_quadratic(X: Tensor) -> Tensor:
    """[1, x, x^2, x_i x_j (i < j)]: d features -> 1 + 2d + d(d-1)/2 (diabetes: 8 -> 45)."""
    i, j = torch.triu_indices(X.shape[1], X.shape[1], offset=1)
    return torch.cat([torch.ones_like(X[:, :1]), X, X * X, X[:, i] * X[:, j]], dim=1)


def svm_split(n_rows: int, seed: int, n_train: int = 500, n_val: int = 150) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded shuffle cut into (train, validation, test) row indices."""
    if n_train + n_val >= n_rows:
        raise ValueError(f"n_train + n_val = {n_train + n_val} must be below the {n_rows} rows of the data set")
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


@dataclass
class SVMSlackSettings:
    """Settings of `svm_slack`: data set (diabetes, fourclass), data directory (None: the checksummed cache),
    split sizes and the seed of the split and of C's initialisation U(c_low, c_high)."""

    dataset: str = "diabetes"
    data_dir: str | None = None
    n_train: int = 500
    n_val: int = 150
    data_seed: int = 0
    c_low: float = 1.0
    c_high: float = 5.0

    def validate(self) -> None:
        if self.dataset not in LIBSVM_SINGLE:
            raise ValueError(f"dataset must be one of {sorted(LIBSVM_SINGLE)}, got {self.dataset!r}")
        check_int("n_train", self.n_train, 1)
        check_int("n_val", self.n_val, 1)
        if not (math.isfinite(self.c_low) and math.isfinite(self.c_high) and self.c_low <= self.c_high):
            raise ValueError(f"need finite c_low <= c_high, got c_low={self.c_low!r}, c_high={self.c_high!r}")


def _svm_lower(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
    return 0.5 * (y[:-1].pow(2).sum() + 0.01 * y[-1] ** 2)


def _svm_upper(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
    margins = batch["s"] * (batch["a"] @ y[:-1] + y[-1])
    return torch.exp(1.0 - margins).sum() + 0.5 * x.pow(2).sum()


@dataclass
class SVMSlackEvaluator(FullBatchEvaluator):
    """Test accuracy, constraint violation and validation loss of each reported model."""

    problem: ConstrainedProblem
    test_a: Tensor
    test_s: Tensor
    val: Batch

    @torch.no_grad()
    def evaluate(self, algorithm: Any) -> dict[str, float]:
        x = algorithm.x
        out: dict[str, float] = {}
        for i, (name, model) in enumerate(_models(algorithm).items()):
            acc = float(((self.test_a @ model[:-1] + model[-1]).sign() == self.test_s).double().mean())
            viol = violation(self.problem.h(x, model))
            out[f"test_accuracy_{name}"], out[f"violation_{name}"] = acc, viol
            if i == 0:
                out["test_accuracy"], out["violation"] = acc, viol
                out["val_loss"] = float(_svm_upper(x, model, self.val, x.new_zeros((), dtype=torch.long)))
        return out


def build_svm_slack(settings: SVMSlackSettings, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu") -> tuple[ConstrainedProblem, SVMSlackEvaluator]:
    s = settings
    s.validate()
    X_np, labels_np = load_single_libsvm(s.dataset, s.data_dir)
    X = torch.as_tensor(X_np, dtype=dtype, device=device)
    labels = torch.as_tensor(labels_np, dtype=dtype, device=device)
    if s.dataset == "diabetes":
        X = expand_quadratic(X)
    train, val, test = svm_split(X.shape[0], s.data_seed, s.n_train, s.n_val)
    a_tr, s_tr = X[train], labels[train]
    gen = torch.Generator().manual_seed(s.data_seed)
    c0 = (s.c_low + (s.c_high - s.c_low) * torch.rand(s.n_train, generator=gen, dtype=torch.float64)).to(dtype)
    y0 = torch.zeros(1, X.shape[1] + 1, dtype=dtype, device=device)
    G_y = -torch.cat([s_tr[:, None] * a_tr, s_tr[:, None]], dim=1)
    eye = torch.eye(s.n_train, dtype=dtype, device=device)
    constraint = LinearConstraint(-eye, G_y, -torch.ones(s.n_train, dtype=dtype, device=device))
    val_batch = {"a": X[val], "s": labels[val]}
    problem = ConstrainedProblem(
        _svm_upper, _svm_lower, c0.to(device), y0, FullBatch({"a": a_tr[:1]}), FullBatch(val_batch),
        constraint=constraint, name=f"svm_slack_{s.dataset}")
    return problem, SVMSlackEvaluator(problem, X[test], labels[test], val_batch)


# ---------------------------------------------------------------------------------------------------------
# toy_sflcb
# ---------------------------------------------------------------------------------------------------------

TOY_GRID_POINTS = 3_000_001


def sflcb_toy_upper(x: Tensor, y: Tensor) -> Tensor:
    """f(x, y) = e^(2 - y) / (2 + cos 6x) + 1/2 log((4x - 2)^2 + 1) (elementwise)."""
    return torch.exp(2.0 - y) / (2.0 + torch.cos(6.0 * x)) + 0.5 * torch.log((4.0 * x - 2.0) ** 2 + 1.0)


def sflcb_toy_answer() -> tuple[float, float]:
    """(x_grid, f(x_grid, x_grid)): the minimiser of f(x, x) on a uniform grid of [0, 3]."""
    grid = torch.linspace(0.0, 3.0, TOY_GRID_POINTS, dtype=torch.float64)
    values = sflcb_toy_upper(grid, grid)
    best = int(values.argmin())
    return float(grid[best]), float(values[best])


def sflcb_toy_basin() -> tuple[float, float]:
    """The open interval of starts from which gradient flow on the hyper-objective F(x) = f(x, x) reaches the grid
    minimiser: F is nonconvex on [0, 3] (local minima near 0.149, 0.986, 2.020, 2.991), so a first-order method
    started outside this interval stops at another local minimum. Its ends are the grid's local maxima of F next to
    the minimiser (or the ends of [0, 3])."""
    grid = torch.linspace(0.0, 3.0, TOY_GRID_POINTS, dtype=torch.float64)
    values = sflcb_toy_upper(grid, grid)
    best = int(values.argmin())
    rising = torch.diff(values) > 0  # rising[i]: F increases from grid[i] to grid[i + 1]
    rises_before = torch.nonzero(rising[:best]).flatten()
    falls_after = torch.nonzero(~rising[best:]).flatten()
    left = int(rises_before[-1]) + 1 if len(rises_before) else 0
    right = best + int(falls_after[0]) if len(falls_after) else len(grid) - 1
    return float(grid[left]), float(grid[right])


@dataclass
class SFLCBToySettings:
    """Settings of `toy_sflcb`: the number of independent random starts solved at once (the problem is the sum
    of `starts` separable copies, so each start follows exactly the iteration it would follow alone) and the
    seed of the starts."""

    starts: int = 1
    data_seed: int = 0

    def validate(self) -> None:
        check_int("starts", self.starts, 1)


FOUND_TOLERANCE = 1e-2


@dataclass
class SFLCBToyEvaluator(FullBatchEvaluator):
    """Per start i: |x_i - x_grid|; reported: `distance` (mean over starts), `fraction_found` (share of starts
    within 1e-2 of x_grid), `basin_fraction` (share of starts x0_i inside `sflcb_toy_basin()`, what exact
    hypergradient flow would find), `found_in_basin` (share of those starts within 1e-2; NaN-free: 0 when no start
    is in the basin), `objective_gap` (mean f(x_i, x_i) - f(x_grid, x_grid)), `violation`."""

    problem: ConstrainedProblem
    x_grid: float
    f_grid: float
    in_basin: Tensor  # bool per start: x0_i inside the grid minimiser's basin

    @torch.no_grad()
    def evaluate(self, algorithm: Any) -> dict[str, float]:
        x = algorithm.x.to(torch.float64)
        model = next(iter(_models(algorithm).values()))
        dist = (x - self.x_grid).abs()
        found = dist < FOUND_TOLERANCE
        basin = self.in_basin.to(found.device)
        return {"distance": float(dist.mean()), "fraction_found": float(found.double().mean()),
                "basin_fraction": float(basin.double().mean()),
                "found_in_basin": float(found[basin].double().mean()) if bool(basin.any()) else 0.0,
                "objective_gap": float(sflcb_toy_upper(x, x).mean()) - self.f_grid,
                "violation": violation(self.problem.h(algorithm.x, model))}


def build_toy_sflcb(settings: SFLCBToySettings, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu") -> tuple[ConstrainedProblem, SFLCBToyEvaluator]:
    settings.validate()
    n = settings.starts
    gen = torch.Generator().manual_seed(settings.data_seed)
    start = (3.0 * torch.rand(2, n, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)
    eye = torch.eye(n, dtype=dtype, device=device)
    one = torch.ones(1, 1, dtype=dtype, device=device)
    problem = ConstrainedProblem(
        lambda x, y, b, k: sflcb_toy_upper(x, y).sum(), lambda x, y, b, k: ((y - 2.0 * x) ** 2).sum(),
        start[0], start[1].view(1, n), FullBatch({"one": one}), FullBatch({"one": one}),
        constraint=LinearConstraint(-eye, eye, torch.zeros(n, dtype=dtype, device=device)),
        x_set=Box(0.0, 3.0), name="toy_sflcb")
    x_grid, f_grid = sflcb_toy_answer()
    low, high = sflcb_toy_basin()
    x0 = start[0].to(torch.float64)
    return problem, SFLCBToyEvaluator(problem, x_grid, f_grid, (x0 > low) & (x0 < high))


# ---------------------------------------------------------------------------------------------------------
# toy_coupled
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CoupledToySettings:
    """Settings of `toy_coupled`: dimension n of x and y, seed of A, B and x0."""

    dim: int = 20
    data_seed: int = 0

    def validate(self) -> None:
        check_int("dim", self.dim, 1)


@dataclass
class DistanceEvaluator(FullBatchEvaluator):
    """Distance to the known answer x*, objective gap F(x) - F(x*), lower error ||model - y*(x)|| and the
    constraint violation of the reported model."""

    problem: ConstrainedProblem
    answer: Tensor
    objective: Any
    best_value: float
    lower_solution: Any

    @torch.no_grad()
    def evaluate(self, algorithm: Any) -> dict[str, float]:
        x = algorithm.x.to(torch.float64)
        model = next(iter(_models(algorithm).values()))
        return {"distance": float(torch.linalg.vector_norm(x - self.answer)),
                "objective_gap": float(self.objective(x)) - self.best_value,
                "lower_error": float(torch.linalg.vector_norm(model.to(torch.float64) - self.lower_solution(x))),
                "violation": violation(self.problem.h(algorithm.x, model))}


@dataclass(frozen=True)
class CoupledToy:
    """The coupled linear toy's matrices (float64) and closed forms: y*(x) = M x + m, x* and F(x*)."""

    A: Tensor
    B: Tensor

    def lower_map(self) -> tuple[Tensor, Tensor]:
        """(M, m) with y*(x) = M x + m, from the KKT system of min g s.t. 1^T y = -1^T x."""
        n = self.A.shape[0]
        ones = torch.ones(n, 1, dtype=self.A.dtype)
        kkt = torch.cat([torch.cat([self.A.T @ self.A, ones], 1), torch.cat([ones.T, ones.new_zeros(1, 1)], 1)])
        rhs_x = torch.cat([self.A.T, -ones.T])
        rhs_c = torch.cat([-self.B.T @ ones[:, 0], ones.new_zeros(1)])
        return torch.linalg.solve(kkt, rhs_x)[:n], torch.linalg.solve(kkt, rhs_c)[:n]

    def lower_solution(self, x: Tensor) -> Tensor:
        M, m = self.lower_map()
        return M @ x + m

    def objective(self, x: Tensor) -> Tensor:
        y = self.lower_solution(x)
        return 0.5 * (x - self.B @ y).pow(2).sum() + 0.5 * (self.A @ y - 1.0).pow(2).sum()

    def optimum(self) -> Tensor:
        M, m = self.lower_map()
        n = M.shape[0]
        U, u = torch.eye(n, dtype=M.dtype) - self.B @ M, -self.B @ m
        V, w = self.A @ M, self.A @ m - 1.0
        return -torch.linalg.solve(U.T @ U + V.T @ V, U.T @ u + V.T @ w)


def build_toy_coupled(settings: CoupledToySettings, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> tuple[ConstrainedProblem, DistanceEvaluator]:
    settings.validate()
    n = settings.dim
    gen = torch.Generator().manual_seed(settings.data_seed)
    A = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    B = 0.5 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    toy = CoupledToy(A, B)
    A_, B_ = A.to(dtype=dtype, device=device), B.to(dtype=dtype, device=device)

    def upper(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
        return 0.5 * (x - B_ @ y).pow(2).sum() + 0.5 * (A_ @ y - 1.0).pow(2).sum()

    def lower(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
        Ay = A_ @ y
        return 0.5 * Ay.pow(2).sum() - x @ Ay + B_.sum(0) @ y

    row = torch.ones(1, n, dtype=dtype, device=device)
    constraint = LinearConstraint(torch.cat([row, -row]), torch.cat([row, -row]), row.new_zeros(2))
    one = torch.ones(1, 1, dtype=dtype, device=device)
    problem = ConstrainedProblem(upper, lower, x0.to(dtype=dtype, device=device), torch.zeros(1, n, dtype=dtype,
                                 device=device), FullBatch({"one": one}), FullBatch({"one": one}),
                                 constraint=constraint, name="toy_coupled")
    x_star = toy.optimum().to(device)
    best = float(toy.objective(x_star.cpu()))
    evaluator = DistanceEvaluator(problem, x_star, lambda x: toy.objective(x.cpu()), best,
                                  lambda x: toy.lower_solution(x.cpu()).to(x.device))
    return problem, evaluator


# ---------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------

_COMMON: dict[str, Any] = {"algorithms": CONSTRAINED_ALGORITHMS, "algorithms_reason": _REASON}

register_task(TaskSpec(
    name="svm_slack",
    description=("SVM with per-sample slack bounds C as the upper variable and margin constraints coupling C and "
                 "(w, b) (BLOCC/SFLCB harness; diabetes 45 features, fourclass; 500/150/rest)"),
    settings_cls=SVMSlackSettings,
    builder=build_svm_slack,
    metrics=("test_accuracy", "violation", "val_loss", "test_accuracy_<model>", "violation_<model>"),
    dataset_setting="dataset",
    data_dir_setting="data_dir",
    **_COMMON,
))

register_task(TaskSpec(
    name="toy_sflcb",
    description="SFLCB's 1-D toy with the coupled constraint y <= x on [0, 3]; answer by grid search",
    settings_cls=SFLCBToySettings,
    builder=build_toy_sflcb,
    metrics=("distance", "fraction_found", "objective_gap", "violation"),
    **_COMMON,
))

register_task(TaskSpec(
    name="toy_coupled",
    description="LV-HBA-style coupled linear toy (1^T x + 1^T y = 0) with a closed-form optimum",
    settings_cls=CoupledToySettings,
    builder=build_toy_coupled,
    metrics=("distance", "objective_gap", "lower_error", "violation"),
    **_COMMON,
))
