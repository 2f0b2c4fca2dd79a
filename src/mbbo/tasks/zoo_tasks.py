"""Single-block (m = 1) tasks of the solver-zoo comparison with benchopt/benchmark_bilevel: T3, T4 and T5.

Registered in :data:`mbbo.tasks.registry.TASKS` (importing this module registers them):

- ``benchopt_quadratic`` (T3): benchopt's ``simulated`` quadratic (:mod:`mbbo.tasks.benchopt_quadratic`),
  rank-1 per-sample Hessians, mini-batches of ``batch_size`` rows (default 64) on both levels. Defaults are
  benchopt's dataset defaults (n_inner = n_outer = 1024, d_in = d_out = 100); the paper instance
  (``config/quadratics_021424``) is ``--set n_inner=32768 d_out=10``. Metrics, exact, from the full-batch
  matrices: ``grad_norm_sq`` = ||grad h(x)||^2 (benchopt's ``value``), ``value`` = h(x) = f(x, y*(x)) (benchopt's
  ``func``, here on the full outer data), ``inner_distance`` = ||y - y*(x)||^2.
- ``cleaning`` (T4): data hyper-cleaning (:mod:`mbbo.tasks.cleaning_data`) on scikit-learn's digits or an ``.npz``
  file (``--set data_path=FILE.npz`` or ``--dataset FILE.npz``), one weight sigma(x_j) per training row (sparse
  x: a mini-batch touches only its rows of x). Metrics: ``test_accuracy``, ``test_error``, ``val_loss`` (the
  upper objective f(W) at the current lower iterate, full validation set), ``weight_clean`` /
  ``weight_corrupted`` (mean sigma(x_j) on the rows whose label is intact / wrong), and where the exact lower
  solution is affordable (``exact_metrics``; automatic when d K <= 2000, e.g. digits: 64 x 10) ``grad_norm_sq``
  = ||grad h(x)||^2, ``value`` = h(x) = f(W*(x)) and ``lower_error`` = ||W - W*(x)||.
- ``regularization`` (T5): per-feature ridge selection (:mod:`mbbo.tasks.regularization_data`) on a LIBSVM binary
  set (default a8a; ``--dataset NAME --data-dir DIR``; ijcnn1 if you have the files; ``breast_cancer`` is
  embedded). Metrics: ``val_loss`` (f(z) at the current z), ``test_loss``, ``test_accuracy``, and the closed
  forms ``grad_norm_sq`` = ||grad h(x)||^2, ``value`` = h(x), ``lower_error`` = ||z - z*(x)||.

The closed-form metrics are computed in float64 from a float64 copy of the data, whatever the run's dtype, so
a float32 run is measured exactly (benchopt evaluates in float32, which floors ||grad h||^2 near 1e-12..1e-14).
The exact lower solutions of T4/T5 are warm-started from the previous evaluation's.

Every single-block algorithm fits (m = 1); the multi-block ones fit with ``--set block_batch=1``. Algorithms
that do not fit a built problem say why through their ``unsuitable_for`` (e.g. fo_itd_bio on T4/T5, whose upper
loss does not depend on x).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mbbo.problem import Batch, MultiBlockProblem, RowSampler
from mbbo.tasks import cleaning_data as cd
from mbbo.tasks import regularization_data as rd
from mbbo.tasks.benchopt_quadratic import BenchoptQuadratic, make_benchopt_quadratic
from mbbo.tasks.registry import TaskSpec, register_task
from mbbo.validation import check_int, check_positive

__all__ = [
    "EXACT_DIM_LIMIT",
    "BenchoptQuadraticEvaluator",
    "BenchoptQuadraticSettings",
    "CleaningEvaluator",
    "CleaningSettings",
    "RegularizationEvaluator",
    "RegularizationSettings",
    "build_benchopt_quadratic",
    "build_cleaning",
    "build_regularization",
    "pack_level",
    "packed_quadratic_loss",
    "paper_instance",
]

EXACT_DIM_LIMIT = 2000
"""T4: with `exact_metrics=None`, the closed-form metrics are computed when d K <= this (digits: 640)."""


def _epoch(n_rows: int, batch_size: int) -> int:
    """ceil(n / b): one epoch draws as many rows as the lower level has."""
    return max(1, math.ceil(n_rows / batch_size))


# ---------------------------------------------------------------------------------------------------------
# T3: benchopt's simulated quadratic
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BenchoptQuadraticSettings:
    """Settings of `benchopt_quadratic` (names as benchopt's ``simulated`` dataset; its defaults).

    Attributes:
        n_inner, n_outer: samples of g and f.
        d_in, d_out: dimensions of the lower variable y (benchopt's inner z) and of x.
        mu: lower end of every spectrum (benchopt's ``mu_inner``).
        L_inner_inner, L_outer_inner, L_inner_outer, L_outer_outer, L_cross_inner, L_cross_outer: upper ends of
            the spectra of grad_yy g, grad_xx g, grad_yy f, grad_xx f and the cross terms of g and f.
        random_state: seed of the instance.
        batch_size: rows per mini-batch on both levels (benchopt: 64).
    """

    n_inner: int = 1024
    n_outer: int = 1024
    d_in: int = 100
    d_out: int = 100
    mu: float = 0.1
    L_inner_inner: float = 1.0
    L_outer_inner: float = 1.0
    L_inner_outer: float = 1.0
    L_outer_outer: float = 1.0
    L_cross_inner: float = 0.1
    L_cross_outer: float = 0.1
    random_state: int = 2442
    batch_size: int = 64

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        for name in ("n_inner", "n_outer", "d_in", "d_out", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("mu", "L_inner_inner", "L_outer_inner", "L_inner_outer", "L_outer_outer", "L_cross_inner",
                     "L_cross_outer"):
            check_positive(name, getattr(self, name))
        check_int("random_state", self.random_state, low=-(2**63))


def paper_instance(**changes: Any) -> BenchoptQuadraticSettings:
    """The instance of benchopt's ``config/quadratics_021424*.yml``: n_inner 32768, n_outer 1024, d_in 100,
    d_out 10, mu 0.1, L_cross 0.1, the other L = 1 (benchopt's defaults), batch 64."""
    settings = BenchoptQuadraticSettings(n_inner=32768, n_outer=1024, d_in=100, d_out=10)
    return dataclasses.replace(settings, **changes)


def pack_level(level: Any) -> Tensor:
    """One (n, 3 d_in + 3 d_out) row table [u | q | lin_y | w | p | lin_x] of a level's per-sample data
    (a :class:`~mbbo.tasks.benchopt_quadratic.QuadraticLevel`): a mini-batch is one row gather, not six."""
    return torch.cat([level.u, level.q, level.lin_y, level.w, level.p, level.lin_x], dim=1).contiguous()


def packed_quadratic_loss(x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
    """:func:`mbbo.tasks.benchopt_quadratic.quadratic_loss` on packed rows (b, 3 d_in + 3 d_out)::

        mean_i 1/2 (u_i^T y)^2 + 1/2 (w_i^T x)^2 + (p_i^T x)(q_i^T y) + lin_y_i^T y + lin_x_i^T x

    The column blocks are strided views multiplied in place (measured: as fast as or faster than a batched
    (b, 3, d) product, whose backward is slower, at batch 64).
    """
    d_in, d_out = y.shape[0], x.shape[0]
    u, q, lin_y = rows[:, :d_in], rows[:, d_in:2 * d_in], rows[:, 2 * d_in:3 * d_in]
    w, p, lin_x = rows[:, 3 * d_in:3 * d_in + d_out], rows[:, 3 * d_in + d_out:3 * d_in + 2 * d_out], \
        rows[:, 3 * d_in + 2 * d_out:]
    uy, wx, px, qy = u @ y, w @ x, p @ x, q @ y
    return (0.5 * uy * uy + 0.5 * wx * wx + px * qy + lin_y @ y + lin_x @ x).mean()


def _quadratic_loss(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
    """g or f of the benchopt quadratic on one mini-batch of packed rows (the engine's loss signature)."""
    return packed_quadratic_loss(x, y, batch["rows"])


@dataclass
class BenchoptQuadraticEvaluator:
    """Exact metrics of the benchopt quadratic from a float64 copy of the instance.

    Attributes:
        quadratic: the instance in float64.
        batch_size: rows per mini-batch (for the epoch length).
    """

    quadratic: BenchoptQuadratic
    batch_size: int

    def iterations_per_epoch(self, block_batch: int = 1) -> int:
        """ceil(n_inner / batch_size)."""
        return _epoch(self.quadratic.n_inner, self.batch_size)

    @torch.no_grad()
    def metrics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """grad_norm_sq = ||grad h(x)||^2, value = h(x), inner_distance = ||y - y*(x)||^2."""
        q = self.quadratic
        x = x.to(device=q.device, dtype=torch.float64)
        y = y.to(device=q.device, dtype=torch.float64)
        return {
            "grad_norm_sq": float(q.grad_norm_sq(x)),
            "value": float(q.value(x)),
            "inner_distance": float((y - q.y_star(x)).pow(2).sum()),
        }

    def evaluate(self, algorithm: Any) -> dict[str, float]:
        """The metrics of the algorithm's current (x, y)."""
        return self.metrics(algorithm.x, algorithm.lower_variables()[0])


def benchopt_quadratic_problem(instance: BenchoptQuadratic, batch_size: int = 64) -> MultiBlockProblem:
    """The stochastic m = 1 problem of an instance: mini-batches of `batch_size` rows drawn uniformly with
    replacement on each level (SABA/SRBA cut the rows into fixed contiguous batches themselves); start y0 = 0,
    x0 = -2 * 1 (benchopt's). The per-sample data is packed into one row table per level (:func:`pack_level`,
    batch key ``rows``)."""
    lower = RowSampler({"rows": pack_level(instance.inner)}, batch_size)
    upper = RowSampler({"rows": pack_level(instance.outer)}, batch_size)
    return MultiBlockProblem(_quadratic_loss, _quadratic_loss, instance.x0(), instance.y0().unsqueeze(0),
                             lower, upper, name="benchopt_quadratic")


def build_benchopt_quadratic(settings: BenchoptQuadraticSettings, dtype: torch.dtype = torch.float64,
                             device: torch.device | str = "cpu"
                             ) -> tuple[MultiBlockProblem, BenchoptQuadraticEvaluator]:
    """Draw the instance (in float64, on the CPU), cast it for the problem, keep float64 for the metrics."""
    s = settings
    s.validate()
    exact = make_benchopt_quadratic(
        s.n_inner, s.n_outer, s.d_in, s.d_out, mu=s.mu, L_inner_inner=s.L_inner_inner,
        L_outer_inner=s.L_outer_inner, L_inner_outer=s.L_inner_outer, L_outer_outer=s.L_outer_outer,
        L_cross_inner=s.L_cross_inner, L_cross_outer=s.L_cross_outer, random_state=s.random_state,
        dtype=torch.float64,
    )
    exact = exact.to(torch.float64, device)
    instance = exact if dtype == torch.float64 else exact.to(dtype, device)
    return benchopt_quadratic_problem(instance, s.batch_size), BenchoptQuadraticEvaluator(exact, s.batch_size)


# ---------------------------------------------------------------------------------------------------------
# T4: data hyper-cleaning
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CleaningSettings:
    """Settings of `cleaning`.

    Attributes:
        data_path: ``"digits"`` (scikit-learn's, bundled) or the path of an ``.npz`` file with arrays ``X`` and
            ``y``.
        noise: probability that a training label is redrawn uniformly among the K classes.
        reg: ridge coefficient c of c ||W||^2 (benchopt: 0.2, stocBiO: 1e-3).
        val_size, test_size: fractions in (0, 1) or row counts of the validation and test parts.
        data_seed: seed of the split and of the corruption.
        batch_size: rows per mini-batch on both levels.
        x_init: initial value of every x_j (benchopt: -2, weight sigma(-2) = 0.12).
        standardize: standardise the features with the training mean and std.
        add_bias: append a constant feature.
        exact_metrics: compute grad_norm_sq / value / lower_error by Newton on the full data (forms a
            (dK)^2 Hessian); None: when d K <= EXACT_DIM_LIMIT.
    """

    data_path: str = "digits"
    noise: float = 0.5
    reg: float = cd.DEFAULT_REG
    val_size: int | float = 0.2
    test_size: int | float = 0.2
    data_seed: int = 0
    batch_size: int = 64
    x_init: float = -2.0
    standardize: bool = True
    add_bias: bool = False
    exact_metrics: bool | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting (the data file is checked when it is loaded)."""
        if not isinstance(self.data_path, str) or not self.data_path:
            raise ValueError(f"data_path must be 'digits' or the path of an .npz file, got {self.data_path!r}")
        if self.data_path != "digits" and Path(self.data_path).suffix != ".npz":
            raise ValueError(f"data_path must be 'digits' or an .npz file (arrays X and y), got {self.data_path!r}")
        if not (0.0 <= self.noise <= 1.0):
            raise ValueError(f"noise must be a probability in [0, 1], got {self.noise!r}")
        check_positive("reg", self.reg)
        check_int("batch_size", self.batch_size, 1)
        if not math.isfinite(self.x_init):
            raise ValueError(f"x_init must be finite, got {self.x_init!r}")


def _cast_cleaning(data: cd.CleaningData, dtype: torch.dtype) -> cd.CleaningData:
    """The same data with features in `dtype` (labels and masks unchanged)."""
    return dataclasses.replace(data, X_train=data.X_train.to(dtype), X_val=data.X_val.to(dtype),
                               X_test=data.X_test.to(dtype))


@dataclass
class CleaningEvaluator:
    """Metrics of hyper-cleaning from a float64 copy of the data (see the module docstring).

    Attributes:
        data: the data in float64.
        reg: ridge coefficient.
        batch_size: rows per mini-batch (for the epoch length).
        exact: whether the closed-form metrics are computed.
    """

    data: cd.CleaningData
    reg: float
    batch_size: int
    exact: bool
    _w_star: Tensor | None = dataclasses.field(default=None, repr=False)

    def iterations_per_epoch(self, block_batch: int = 1) -> int:
        """ceil(n_train / batch_size)."""
        return _epoch(self.data.n_train, self.batch_size)

    @torch.no_grad()
    def metrics(self, x: Tensor, W: Tensor) -> dict[str, float]:
        """The metrics at upper variable x (n_train,) and lower variable W (d, K)."""
        data = self.data
        x = x.to(device=data.X_train.device, dtype=torch.float64)
        W = W.to(device=data.X_train.device, dtype=torch.float64).reshape(data.n_features, data.n_classes)
        test_accuracy = cd.accuracy(W, data.X_test, data.y_test)
        weights = torch.sigmoid(x)
        corrupted = data.corrupted
        out = {
            "test_accuracy": test_accuracy,
            "test_error": 1.0 - test_accuracy,
            "val_loss": float(cd.outer_loss(None, W, data.val_batch())),
        }
        # mean weights of the intact / wrong labels (a key is left out when its set is empty, e.g. noise = 0)
        if bool((~corrupted).any()):
            out["weight_clean"] = float(weights[~corrupted].mean())
        if bool(corrupted.any()):
            out["weight_corrupted"] = float(weights[corrupted].mean())
        if self.exact and bool(torch.isfinite(x).all()):
            w_star = cd.inner_solution(x, data, self.reg, W0=self._w_star)
            if not bool(torch.isfinite(w_star).all()):  # a bad warm start: solve from zero
                w_star = cd.inner_solution(x, data, self.reg)
            self._w_star = w_star
            grad = cd.hypergradient(x, data, self.reg, W=w_star)
            out["grad_norm_sq"] = float(grad.pow(2).sum())
            out["value"] = float(cd.value(x, data, self.reg, W=w_star))
            out["lower_error"] = float(torch.linalg.vector_norm(W - w_star))
        return out

    def evaluate(self, algorithm: Any) -> dict[str, float]:
        """The metrics of the algorithm's current (x, W)."""
        return self.metrics(algorithm.x, algorithm.lower_variables()[0])


def cleaning_problem(data: cd.CleaningData, reg: float, batch_size: int, x_init: float = -2.0
                     ) -> MultiBlockProblem:
    """The m = 1 hyper-cleaning problem: sparse x (one value per training row), W0 = 0, x0 = x_init."""
    def lower_loss(x_rows: Tensor, W: Tensor, batch: Batch, block: Tensor) -> Tensor:
        return cd.inner_loss(x_rows, W, batch, reg)

    def upper_loss(x_rows: Any, W: Tensor, batch: Batch, block: Tensor) -> Tensor:
        return cd.outer_loss(None, W, batch)

    dtype, device = data.X_train.dtype, data.X_train.device
    x0 = torch.full((data.n_train,), float(x_init), dtype=dtype, device=device)
    W0 = torch.zeros(1, data.n_features, data.n_classes, dtype=dtype, device=device)
    lower = RowSampler({"X": data.X_train, "y": data.y_train}, batch_size)
    upper = RowSampler({"X": data.X_val, "y": data.y_val}, batch_size)
    return MultiBlockProblem(upper_loss, lower_loss, x0, W0, lower, upper, upper_depends_on_x=False,
                             sparse_x=True, name="cleaning")


def build_cleaning(settings: CleaningSettings, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> tuple[MultiBlockProblem, CleaningEvaluator]:
    """Load, split and corrupt the data (float64), cast it for the problem, keep float64 for the metrics."""
    s = settings
    s.validate()
    data64 = cd.make_cleaning_data(s.data_path, noise=s.noise, val_size=s.val_size, test_size=s.test_size,
                                   seed=s.data_seed, standardize=s.standardize, add_bias=s.add_bias,
                                   dtype=torch.float64, device=device)
    if data64.n_train < s.batch_size:
        raise ValueError(f"batch_size={s.batch_size} exceeds the {data64.n_train} training rows of "
                         f"{s.data_path}")
    exact = s.exact_metrics
    if exact is None:
        exact = data64.n_features * data64.n_classes <= EXACT_DIM_LIMIT
    data = data64 if dtype == torch.float64 else _cast_cleaning(data64, dtype)
    problem = cleaning_problem(data, s.reg, s.batch_size, s.x_init)
    return problem, CleaningEvaluator(data64, s.reg, s.batch_size, bool(exact))


# ---------------------------------------------------------------------------------------------------------
# T5: per-feature regularisation selection
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RegularizationSettings:
    """Settings of `regularization`.

    Attributes:
        dataset: a LIBSVM binary set (registered name, or any pair NAME / NAME.t in data_dir) or
            ``breast_cancer`` (embedded).
        data_dir: folder holding the files (None: the download cache).
        val_fraction: fraction of the training file held out for validation (a8a: 18,156 / 4,540).
        data_seed: seed of the split and of the initial point.
        batch_size: rows per mini-batch on both levels.
        parametrization: ``"exp"`` (ridge weights exp(x_k), benchopt's default) or ``"lin"`` (x_k > 0).
        add_bias: append a constant feature.
        init: ``"benchopt"`` (x0 = log U(0, 1), z0 ~ N(0, I), benchopt's ijcnn1) or ``"zeros"`` (x0 = 0, z0 = 0;
            with "lin", x0 = 1).
    """

    dataset: str = "a8a"
    data_dir: str | None = None
    val_fraction: float = 0.2
    data_seed: int = 0
    batch_size: int = 64
    parametrization: str = "exp"
    add_bias: bool = False
    init: str = "benchopt"

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not (0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_int("batch_size", self.batch_size, 1)
        if self.parametrization not in ("exp", "lin"):
            raise ValueError(f"parametrization must be 'exp' or 'lin', got {self.parametrization!r}")
        if self.init not in ("benchopt", "zeros"):
            raise ValueError(f"init must be 'benchopt' or 'zeros', got {self.init!r}")


@dataclass
class RegularizationEvaluator:
    """Metrics of T5 from a float64 copy of the data; z* by Newton, warm-started.

    Attributes:
        data: the data in float64.
        parametrization: "exp" or "lin".
        batch_size: rows per mini-batch (for the epoch length).
    """

    data: rd.RegularizationData
    parametrization: str
    batch_size: int
    _z_star: Tensor | None = dataclasses.field(default=None, repr=False)

    def iterations_per_epoch(self, block_batch: int = 1) -> int:
        """ceil(n_train / batch_size)."""
        return _epoch(self.data.n_train, self.batch_size)

    @torch.no_grad()
    def metrics(self, x: Tensor, z: Tensor) -> dict[str, float]:
        """The metrics at ridge parameters x (d,) and weights z (d,)."""
        data = self.data
        x = x.to(device=data.X_train.device, dtype=torch.float64)
        z = z.to(device=data.X_train.device, dtype=torch.float64)
        out = {"val_loss": float(rd.outer_loss(None, z, data.val_batch()))}
        if data.X_test is not None and data.y_test is not None:
            out["test_loss"] = float(rd.log_loss(z, data.X_test, data.y_test))
            out["test_accuracy"] = rd.accuracy(z, data.X_test, data.y_test)
        param: Any = self.parametrization
        weights_ok = bool(torch.isfinite(x).all()) and (param == "exp" or bool((x > 0).all()))
        if not weights_ok:  # "lin" left its domain (x_k <= 0): h is not defined there, no exact metrics
            return out
        z_star = rd.inner_solution(x, data, param, z0=self._z_star)
        if not bool(torch.isfinite(z_star).all()):
            z_star = rd.inner_solution(x, data, param)
        self._z_star = z_star
        grad = rd.hypergradient(x, data, param, z=z_star)
        out["grad_norm_sq"] = float(grad.pow(2).sum())
        out["value"] = float(rd.value(x, data, param, z=z_star))
        out["lower_error"] = float(torch.linalg.vector_norm(z - z_star))
        return out

    def evaluate(self, algorithm: Any) -> dict[str, float]:
        """The metrics of the algorithm's current (x, z)."""
        return self.metrics(algorithm.x, algorithm.lower_variables()[0])


def regularization_problem(data: rd.RegularizationData, batch_size: int, parametrization: str = "exp",
                           init: str = "benchopt", seed: int = 0) -> MultiBlockProblem:
    """The m = 1 problem: dense x (one ridge parameter per feature), z the logistic weights."""
    param: Any = parametrization

    def lower_loss(x: Tensor, z: Tensor, batch: Batch, block: Tensor) -> Tensor:
        return rd.inner_loss(x, z, batch, param)

    def upper_loss(x: Any, z: Tensor, batch: Batch, block: Tensor) -> Tensor:
        return rd.outer_loss(None, z, batch)

    dtype, device, d = data.X_train.dtype, data.X_train.device, data.n_features
    if init == "benchopt":
        x0, z0 = rd.initial_point(d, torch.Generator().manual_seed(seed), dtype=dtype, device=device)
        if parametrization == "lin":
            x0 = torch.exp(x0)  # the same ridge weights U(0, 1) under x -> x
    else:
        fill = 0.0 if parametrization == "exp" else 1.0
        x0 = torch.full((d,), fill, dtype=dtype, device=device)
        z0 = torch.zeros(d, dtype=dtype, device=device)
    lower = RowSampler(data.train_batch(), batch_size)
    upper = RowSampler(data.val_batch(), batch_size)
    return MultiBlockProblem(upper_loss, lower_loss, x0, z0.unsqueeze(0), lower, upper, upper_depends_on_x=False,
                             name="regularization")


def build_regularization(settings: RegularizationSettings, dtype: torch.dtype = torch.float64,
                         device: torch.device | str = "cpu"
                         ) -> tuple[MultiBlockProblem, RegularizationEvaluator]:
    """Load the LIBSVM pair, split train / validation (float64), cast for the problem."""
    from mbbo.data.libsvm import load_binary_dataset

    s = settings
    s.validate()
    ds = load_binary_dataset(s.dataset, data_dir=s.data_dir)
    data64 = rd.make_regularization_data(ds.X_train, ds.y_train, ds.X_test, ds.y_test, val_fraction=s.val_fraction,
                                         seed=s.data_seed, add_bias=s.add_bias, dtype=torch.float64, device=device)
    if data64.n_train < s.batch_size:
        raise ValueError(f"batch_size={s.batch_size} exceeds the {data64.n_train} training rows of {s.dataset}")
    if dtype == torch.float64:
        data = data64
    else:
        data = rd.RegularizationData(*(None if t is None else t.to(dtype) for t in dataclasses.astuple(data64)))
    problem = regularization_problem(data, s.batch_size, s.parametrization, s.init, s.data_seed)
    return problem, RegularizationEvaluator(data64, s.parametrization, s.batch_size)


# ---------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------

ZOO_NOTE = "m = 1: every single-block algorithm fits; multi-block ones with block_batch=1"


def _probe_fits(make_probe: Any) -> Any:
    """A `TaskSpec.fits` check that asks the algorithm's `unsuitable_for` about a tiny problem of the task's
    structure (same losses, samplers and sparsity, a few synthetic rows), so that misfits are reported before
    any data is loaded and `mbbo list` shows only what fits."""
    cache: dict[str, MultiBlockProblem] = {}

    def fits(name: str, cls: type, settings: Any) -> str | None:
        if "problem" not in cache:
            cache["problem"] = make_probe()
        unsuitable = getattr(cls, "unsuitable_for", None)
        reason = unsuitable(cache["problem"]) if callable(unsuitable) else None
        return f"{cls.name}: {reason}" if reason else None

    return fits


def _cleaning_probe() -> MultiBlockProblem:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    rows = torch.arange(4)
    data = cd.CleaningData(X_train=X, y_train=y, y_train_clean=y, replaced=y > 1, X_val=X, y_val=y, X_test=X,
                           y_test=y, n_classes=2, classes=(0, 1), noise=0.0, train_rows=rows, val_rows=rows,
                           test_rows=rows)
    return cleaning_problem(data, cd.DEFAULT_REG, 2)


def _regularization_probe() -> MultiBlockProblem:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    return regularization_problem(rd.RegularizationData(X, y, X, y), 2, init="zeros")


register_task(TaskSpec(
    name="benchopt_quadratic",
    description=("T3: benchopt's 'simulated' quadratic (rank-1 per-sample Hessians, spectra in [mu, L], batch 64), "
                 "exact ||grad h||^2 from the full-batch matrices; paper instance: --set n_inner=32768 d_out=10. "
                 + ZOO_NOTE),
    settings_cls=BenchoptQuadraticSettings,
    builder=build_benchopt_quadratic,
    metrics=("grad_norm_sq", "value", "inner_distance"),
))

register_task(TaskSpec(
    name="cleaning",
    description=("T4: data hyper-cleaning, one weight per training row (sparse x), multinomial logistic lower "
                 "level; digits by default or --set data_path=FILE.npz (arrays X, y). " + ZOO_NOTE),
    settings_cls=CleaningSettings,
    builder=build_cleaning,
    metrics=("test_accuracy", "test_error", "val_loss", "weight_clean", "weight_corrupted", "grad_norm_sq",
             "value", "lower_error"),
    dataset_setting="data_path",
    fits=_probe_fits(_cleaning_probe),
))

register_task(TaskSpec(
    name="regularization",
    description=("T5: per-feature ridge selection for logistic regression (benchopt's ijcnn1 task) on a LIBSVM "
                 "binary set (default a8a, --dataset/--data-dir); exact ||grad h||^2 by Newton. " + ZOO_NOTE),
    settings_cls=RegularizationSettings,
    builder=build_regularization,
    metrics=("val_loss", "test_loss", "test_accuracy", "grad_norm_sq", "value", "lower_error"),
    dataset_setting="dataset",
    data_dir_setting="data_dir",
    fits=_probe_fits(_regularization_probe),
))
