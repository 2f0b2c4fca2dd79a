"""The benchopt ``simulated`` quadratic bilevel problem (task T3), with closed forms.

Definition (benchopt/benchmark_bilevel, ``datasets/simulated.py`` and ``benchmark_utils/gen_matrices.py``)::

    g(x, y) = (1/n_inner) sum_i [ 1/2 y^T A_i y + 1/2 x^T B_i x + x^T C_i y + a_i^T y + b_i^T x ]
    f(x, y) = (1/n_outer) sum_j [ 1/2 y^T F_j y + 1/2 x^T H_j x + x^T K_j y + f_j^T y + h_j^T x ]

with y in R^{d_in} (benchopt's inner variable z) and x in R^{d_out}. Every per-sample matrix is rank one and
is stored as its factors, so a sample is a few vectors and the paper instance (n_inner = 32768, d_in = 100)
takes a few MB instead of the GB of dense per-sample Hessians::

    A_i = u_i u_i^T,   B_i = w_i w_i^T,   C_i = p_i q_i^T     (C_i is d_out x d_in)

Generation of one level (``gen_matrices``; n samples, Hessian bounds L_yy and L_xx, cross bound L_cross, mu):

- u_i = S xi_i with xi_i ~ N(0, I_{d_in}), S = U diag(logspace(log10(mu)/2, log10(L_yy)/2, d_in)) U^T, U the
  left singular vectors of a Gaussian d_in x 1 matrix: E[A_i] = S^2 has spectrum in [mu, L_yy];
- w_i the same in dimension d_out with one zero in the square-root spectrum: E[B_i] is PSD with one zero
  eigenvalue and the others in [mu, L_xx];
- p_i = U_c D_c zeta_i and q_i = V_c^T zeta_i with one zeta_i ~ N(0, I_{d_in}), where U_c D_c V_c^T is the
  SVD of a Gaussian d_out x d_in matrix with its singular values replaced by
  logspace(log10(mu), log10(L_cross), min(d_in, d_out)): E[C_i] = U_c D_c V_c^T;
- a_i ~ N(0, I_{d_in}), b_i ~ N(0, I_{d_out}).

The inner level uses (L_inner_inner, L_outer_inner, L_cross_inner), the outer level (L_inner_outer,
L_outer_outer, L_cross_outer); mu (benchopt's ``mu_inner``) is shared. As in benchopt, generation is retried
(at most ``max_tries`` times) until the value function h(x) = f(x, y*(x)) is strongly convex: lambda_min of
its (constant) Hessian >= 1e-12. Two deliberate differences from the reference code: (1) the random stream is
torch's (``torch.Generator`` seeded with random_state, all draws in float64 on the CPU, then cast), not JAX's,
so the numbers differ from benchopt's for the same seed; (2) retries draw new matrices (benchopt never
advances its key, so its retries are identical) and the check uses the exact Hessian of h, J^T F J + H + K J +
(K J)^T with J = -A^{-1} C^T (benchopt halves the last two terms).

Closed forms, from the full-batch means (A, B, C, a, b) of g and (F, H, K, f, h) of f::

    y*(x)  = -A^{-1}(a + C^T x)
    v*(x)  = A^{-1} grad_y f(x, y*(x))       (the library's sign: v solves grad_yy g v = grad_y f)
    grad h = grad_x f(x, y*(x)) - C v*(x)    (C = grad_xy g, d_out x d_in)

and the benchopt metric ``value`` = ||grad h(x)||^2. ``func`` = h(x) is evaluated on the full outer data
(benchopt's ``func`` reads outer sample 0 only, a bug not reproduced). Benchopt's initial point is y0 = 0,
x0 = -2 * 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mbbo.problem import MultiBlockProblem, RowSampler
from mbbo.validation import check_int, check_positive

__all__ = [
    "BATCH_KEYS",
    "BenchoptQuadratic",
    "QuadraticLevel",
    "QuadraticMeans",
    "inner_loss",
    "make_benchopt_quadratic",
    "outer_loss",
    "quadratic_loss",
]

BATCH_KEYS = ("u", "w", "p", "q", "lin_y", "lin_x")
"""Keys of a batch dict: rank-1 factors u (A = u u^T), w (B = w w^T), p, q (C = p q^T), linear terms."""


def quadratic_loss(x: Tensor, y: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Mean over the batch rows of 1/2 (u^T y)^2 + 1/2 (w^T x)^2 + (p^T x)(q^T y) + lin_y^T y + lin_x^T x.

    ``x``: (d_out,), ``y``: (d_in,), batch tensors of shape (b, .) (see :data:`BATCH_KEYS`). Pure and
    vmap-friendly: vmap over blocks with batches of shape (B, b, .) and variables of shape (B, d).
    """
    uy = batch["u"] @ y
    wx = batch["w"] @ x
    px = batch["p"] @ x
    qy = batch["q"] @ y
    per_sample = 0.5 * uy * uy + 0.5 * wx * wx + px * qy + batch["lin_y"] @ y + batch["lin_x"] @ x
    return per_sample.mean()


def inner_loss(x: Tensor, y: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """g on a batch of inner samples (rows of ``BenchoptQuadratic.inner``); the formula of quadratic_loss."""
    return quadratic_loss(x, y, batch)


def outer_loss(x: Tensor, y: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """f on a batch of outer samples (rows of ``BenchoptQuadratic.outer``); the formula of quadratic_loss."""
    return quadratic_loss(x, y, batch)


@dataclass(frozen=True)
class QuadraticLevel:
    """Per-sample data of one level: rows are samples (see :data:`BATCH_KEYS`)."""

    u: Tensor  # (n, d_in)
    w: Tensor  # (n, d_out)
    p: Tensor  # (n, d_out)
    q: Tensor  # (n, d_in)
    lin_y: Tensor  # (n, d_in)
    lin_x: Tensor  # (n, d_out)

    @property
    def n_samples(self) -> int:
        return self.u.shape[0]

    def batch(self, idx: Tensor | slice | None = None) -> dict[str, Tensor]:
        """The batch dict of the rows ``idx`` (all rows if None); tensor indices may have any shape."""
        if idx is None:
            idx = slice(None)
        return {f.name: getattr(self, f.name)[idx] for f in fields(self)}

    def means(self) -> QuadraticMeans:
        """Full-batch matrices (computed in float64, returned in the data's dtype)."""
        n = self.n_samples
        u, w, p, q = (t.double() for t in (self.u, self.w, self.p, self.q))
        out = QuadraticMeans(
            hess_yy=u.T @ u / n,
            hess_xx=w.T @ w / n,
            cross=p.T @ q / n,
            lin_y=self.lin_y.double().mean(0),
            lin_x=self.lin_x.double().mean(0),
        )
        return out.to(self.u.dtype)

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> QuadraticLevel:
        return QuadraticLevel(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )

    def dense_hessians(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample dense matrices (A_i, B_i, C_i) of the rows ``idx`` (for tests and small batches)."""
        u, w, p, q = self.u[idx], self.w[idx], self.p[idx], self.q[idx]
        return (
            u.unsqueeze(-1) * u.unsqueeze(-2),
            w.unsqueeze(-1) * w.unsqueeze(-2),
            p.unsqueeze(-1) * q.unsqueeze(-2),
        )


@dataclass(frozen=True)
class QuadraticMeans:
    """Full-batch quadratic 1/2 y^T hess_yy y + 1/2 x^T hess_xx x + x^T cross y + lin_y^T y + lin_x^T x."""

    hess_yy: Tensor  # (d_in, d_in)
    hess_xx: Tensor  # (d_out, d_out)
    cross: Tensor  # (d_out, d_in)
    lin_y: Tensor  # (d_in,)
    lin_x: Tensor  # (d_out,)

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> QuadraticMeans:
        return QuadraticMeans(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )

    def value(self, x: Tensor, y: Tensor) -> Tensor:
        """Full-batch value, row-wise for x (..., d_out), y (..., d_in)."""
        return (
            0.5 * ((y @ self.hess_yy) * y).sum(-1)
            + 0.5 * ((x @ self.hess_xx) * x).sum(-1)
            + ((x @ self.cross) * y).sum(-1)
            + y @ self.lin_y
            + x @ self.lin_x
        )

    def grad_y(self, x: Tensor, y: Tensor) -> Tensor:
        return y @ self.hess_yy + x @ self.cross + self.lin_y

    def grad_x(self, x: Tensor, y: Tensor) -> Tensor:
        return x @ self.hess_xx + y @ self.cross.T + self.lin_x


class BenchoptQuadratic:
    """An instance of the benchopt ``simulated`` problem: per-sample data and closed forms (see module doc).

    Attributes: ``inner`` / ``outer`` (:class:`QuadraticLevel`, per-sample rank-1 factors), ``inner_means`` /
    ``outer_means`` (:class:`QuadraticMeans`, full-batch matrices), ``config`` (generation parameters),
    ``n_tries`` (generation attempts used). Closed forms accept x of shape (d_out,) or (..., d_out).
    """

    def __init__(
        self, inner: QuadraticLevel, outer: QuadraticLevel, config: dict[str, object], n_tries: int = 1
    ):
        if inner.u.shape[1] != outer.u.shape[1] or inner.w.shape[1] != outer.w.shape[1]:
            raise ValueError("inner and outer levels must have the same d_in and d_out")
        self.inner = inner
        self.outer = outer
        self.config = dict(config)
        self.n_tries = n_tries
        self.inner_means = inner.means()
        self.outer_means = outer.means()
        self._chol = torch.linalg.cholesky(self.inner_means.hess_yy)

    # sizes ----------------------------------------------------------------------------------------------
    @property
    def n_inner(self) -> int:
        return self.inner.n_samples

    @property
    def n_outer(self) -> int:
        return self.outer.n_samples

    @property
    def d_in(self) -> int:
        return self.inner.u.shape[1]

    @property
    def d_out(self) -> int:
        return self.inner.w.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.u.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.u.device

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> BenchoptQuadratic:
        return BenchoptQuadratic(
            self.inner.to(dtype, device), self.outer.to(dtype, device), self.config, self.n_tries
        )

    # data access ----------------------------------------------------------------------------------------
    def inner_batch(self, idx: Tensor | slice | None = None) -> dict[str, Tensor]:
        """Gathered rows of the inner data, for :func:`inner_loss`."""
        return self.inner.batch(idx)

    def outer_batch(self, idx: Tensor | slice | None = None) -> dict[str, Tensor]:
        """Gathered rows of the outer data, for :func:`outer_loss`."""
        return self.outer.batch(idx)

    def x0(self) -> Tensor:
        """benchopt's initial upper variable, -2 * 1."""
        return torch.full((self.d_out,), -2.0, dtype=self.dtype, device=self.device)

    def y0(self) -> Tensor:
        """benchopt's initial lower variable, 0."""
        return torch.zeros(self.d_in, dtype=self.dtype, device=self.device)

    def problem(self, batch_size: int = 64, outer_batch_size: int | None = None) -> MultiBlockProblem:
        """The engine's m = 1 problem: uniform mini-batches of the per-sample rows (benchopt: batch 64)."""
        return MultiBlockProblem(
            lambda x, y, batch, block: outer_loss(x, y, batch),
            lambda x, y, batch, block: inner_loss(x, y, batch),
            self.x0(), self.y0().unsqueeze(0), RowSampler(self.inner_batch(), batch_size),
            RowSampler(self.outer_batch(), outer_batch_size or batch_size), name="benchopt_quadratic")

    # closed forms ---------------------------------------------------------------------------------------
    def _solve_inner_hessian(self, rhs: Tensor) -> Tensor:
        """A^{-1} rhs, row-wise on (..., d_in), by the cached Cholesky factor."""
        flat = rhs.reshape(-1, self.d_in).T
        return torch.cholesky_solve(flat, self._chol).T.reshape(rhs.shape)

    def y_star(self, x: Tensor) -> Tensor:
        """y*(x) = -A^{-1}(a + C^T x)."""
        return -self._solve_inner_hessian(self.inner_means.lin_y + x @ self.inner_means.cross)

    def value(self, x: Tensor) -> Tensor:
        """h(x) = f(x, y*(x)) on the full outer data."""
        return self.outer_means.value(x, self.y_star(x))

    def v_star(self, x: Tensor) -> Tensor:
        """v*(x) = A^{-1} grad_y f(x, y*(x)) (the solution of the linear system, library sign convention)."""
        return self._solve_inner_hessian(self.outer_means.grad_y(x, self.y_star(x)))

    def hypergradient(self, x: Tensor) -> Tensor:
        """grad h(x) = grad_x f(x, y*) - C v*."""
        y = self.y_star(x)
        v = self._solve_inner_hessian(self.outer_means.grad_y(x, y))
        return self.outer_means.grad_x(x, y) - v @ self.inner_means.cross.T

    def grad_norm_sq(self, x: Tensor) -> Tensor:
        """benchopt's metric ``value``: ||grad h(x)||^2."""
        return self.hypergradient(x).pow(2).sum(-1)

    def value_hessian(self) -> Tensor:
        """The constant Hessian of h: J^T F J + H + K J + (K J)^T with J = dy*/dx = -A^{-1} C^T."""
        return _value_hessian(self.inner_means, self.outer_means)

    def metrics(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """benchopt's metrics: value = ||grad h||^2, func = h(x), inner_distance = ||y* - y||^2."""
        with torch.no_grad():
            out = {"value": float(self.grad_norm_sq(x)), "func": float(self.value(x))}
            if y is not None:
                out["inner_distance"] = float((self.y_star(x) - y).pow(2).sum())
        return out


def _value_hessian(inner: QuadraticMeans, outer: QuadraticMeans) -> Tensor:
    jac = -torch.linalg.solve(inner.hess_yy, inner.cross.T)  # (d_in, d_out)
    kj = outer.cross @ jac
    hess = jac.T @ outer.hess_yy @ jac + outer.hess_xx + kj + kj.T
    return 0.5 * (hess + hess.T)


def _sqrt_spectrum_factor(dim: int, mu: float, upper: float, gen: torch.Generator, zero: bool) -> Tensor:
    """U diag(sqrt spectrum) U^T with U from the SVD of a Gaussian dim x 1 matrix (float64)."""
    basis, _, _ = torch.linalg.svd(torch.randn(dim, 1, generator=gen, dtype=torch.float64))
    n_pos = dim - 1 if zero else dim
    diag = torch.logspace(math.log10(mu) / 2, math.log10(upper) / 2, n_pos, dtype=torch.float64)
    if zero:
        diag = torch.cat([torch.zeros(1, dtype=torch.float64), diag])
    return (basis * diag) @ basis.T


def _gen_level(
    n: int, d_in: int, d_out: int, l_yy: float, l_xx: float, l_cross: float, mu: float, gen: torch.Generator
) -> QuadraticLevel:
    f64 = torch.float64
    s_y = _sqrt_spectrum_factor(d_in, mu, l_yy, gen, zero=False)
    u = torch.randn(n, d_in, generator=gen, dtype=f64) @ s_y
    s_x = _sqrt_spectrum_factor(d_out, mu, l_xx, gen, zero=True)
    w = torch.randn(n, d_out, generator=gen, dtype=f64) @ s_x
    uc, _, vh = torch.linalg.svd(torch.randn(d_out, d_in, generator=gen, dtype=f64))  # full matrices
    k = min(d_in, d_out)
    dc = torch.zeros(d_out, d_in, dtype=f64)
    dc[:k, :k] = torch.diag(torch.logspace(math.log10(mu), math.log10(l_cross), k, dtype=f64))
    zeta = torch.randn(n, d_in, generator=gen, dtype=f64)
    p = zeta @ (uc @ dc).T
    q = zeta @ vh.T
    lin_y = torch.randn(n, d_in, generator=gen, dtype=f64)
    lin_x = torch.randn(n, d_out, generator=gen, dtype=f64)
    return QuadraticLevel(u=u, w=w, p=p, q=q, lin_y=lin_y, lin_x=lin_x)


def make_benchopt_quadratic(
    n_inner: int = 1024,
    n_outer: int = 1024,
    d_in: int = 100,
    d_out: int = 100,
    *,
    mu: float = 0.1,
    L_inner_inner: float = 1.0,
    L_outer_inner: float = 1.0,
    L_inner_outer: float = 1.0,
    L_outer_outer: float = 1.0,
    L_cross_inner: float = 0.1,
    L_cross_outer: float = 0.1,
    random_state: int = 2442,
    max_tries: int = 20,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> BenchoptQuadratic:
    """Generate an instance of benchopt's ``simulated`` problem (defaults: benchopt's dataset defaults).

    The paper instance (``config/quadratics_021424.yml``) is n_inner=32768, n_outer=1024, d_in=100, d_out=10.
    Parameter names follow benchopt: L_inner_inner bounds grad_yy g, L_outer_inner grad_xx g, L_inner_outer
    grad_yy f, L_outer_outer grad_xx f, L_cross_* the cross terms; mu (benchopt's ``mu_inner``) is the lower
    end of every spectrum. The data is drawn in float64 on the CPU and then cast, so float32 and float64
    instances of one seed are the same problem up to rounding. Raises ``RuntimeError`` if no strongly convex
    value function was found in ``max_tries`` draws.
    """
    for name, value in (("n_inner", n_inner), ("n_outer", n_outer), ("d_in", d_in), ("d_out", d_out)):
        check_int(name, value, 1)
    check_int("max_tries", max_tries, 1)
    for name, value in (
        ("mu", mu),
        ("L_inner_inner", L_inner_inner),
        ("L_outer_inner", L_outer_inner),
        ("L_inner_outer", L_inner_outer),
        ("L_outer_outer", L_outer_outer),
        ("L_cross_inner", L_cross_inner),
        ("L_cross_outer", L_cross_outer),
    ):
        check_positive(name, value)
    if not isinstance(random_state, int) or isinstance(random_state, bool):
        raise ValueError(f"random_state must be an integer, got {random_state!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    config: dict[str, object] = {
        "n_inner": n_inner,
        "n_outer": n_outer,
        "d_in": d_in,
        "d_out": d_out,
        "mu": mu,
        "L_inner_inner": L_inner_inner,
        "L_outer_inner": L_outer_inner,
        "L_inner_outer": L_inner_outer,
        "L_outer_outer": L_outer_outer,
        "L_cross_inner": L_cross_inner,
        "L_cross_outer": L_cross_outer,
        "random_state": random_state,
    }
    gen = torch.Generator().manual_seed(random_state)
    min_eig = float("nan")
    for attempt in range(1, max_tries + 1):
        inner = _gen_level(n_inner, d_in, d_out, L_inner_inner, L_outer_inner, L_cross_inner, mu, gen)
        outer = _gen_level(n_outer, d_in, d_out, L_inner_outer, L_outer_outer, L_cross_outer, mu, gen)
        min_eig = float(torch.linalg.eigvalsh(_value_hessian(inner.means(), outer.means())).min())
        if min_eig >= 1e-12:
            config["min_eig_value_hessian"] = min_eig
            return BenchoptQuadratic(inner.to(dtype, device), outer.to(dtype, device), config, attempt)
    raise RuntimeError(
        f"no instance with a strongly convex value function in max_tries={max_tries} draws "
        f"(last smallest eigenvalue of the Hessian of h: {min_eig:.3g}); change random_state or the spectra"
    )
