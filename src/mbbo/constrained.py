"""Bilevel problems with a constrained lower level (m = 1):

    min_{x in X} f(x, y*(x)),    y*(x) = argmin_{y in Y} { g(x, y) : h(x, y) <= 0 },    h: R^dx x R^dy -> R^k.

`ConstrainedProblem` is a `MultiBlockProblem` with one block plus the constraint h, written for one point like f
and g: `h(x, y, data) -> (k,)`, with `data` the problem's fixed `constraint_data` (e.g. the training rows of an
SVM's margin constraints). A `LinearConstraint` h(x, y) = G_x x + G_y y - c is given by its matrices; the methods
that solve QPs (SFLCB's warm start, LV-HBA's joint projection, the penalty method's projections) need that form.
X and Y are optional boxes [low, high] (closed convex sets with cheap projections, and half-spaces for the QPs).

`ConstraintOracles` evaluates h and the products with its Jacobians, h^T mu -> (grad_x h^T mu, grad_y h^T mu)
(one vjp), counted like the other oracles. `exact_lower_solve` solves the lower QP for a g quadratic in y.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, vjp

from mbbo.problem import Batch, MultiBlockProblem
from mbbo.qp import QPInfeasibleError, QPResult, project_halfspaces, solve_qp

__all__ = ["Box", "ConstrainedProblem", "ConstraintOracles", "LinearConstraint", "exact_lower_solve",
           "violation"]

ConstraintFn = Callable[[Any, Any, Batch], Tensor]


@dataclass(frozen=True)
class LinearConstraint:
    """h(x, y) = G_x x + G_y y - c <= 0 on the flat variables: G_x (k, d_x), G_y (k, d_y), c (k,)."""

    G_x: Tensor
    G_y: Tensor
    c: Tensor

    def __post_init__(self) -> None:
        k = self.c.shape[0] if self.c.dim() == 1 else -1
        if k < 0 or self.G_x.dim() != 2 or self.G_y.dim() != 2 or self.G_x.shape[0] != k or self.G_y.shape[0] != k:
            raise ValueError(f"LinearConstraint: need G_x (k, d_x), G_y (k, d_y), c (k,); got G_x "
                             f"{tuple(self.G_x.shape)}, G_y {tuple(self.G_y.shape)}, c {tuple(self.c.shape)}")

    def __call__(self, x: Tensor, y: Tensor, data: Batch) -> Tensor:
        return self.G_x @ x.reshape(-1) + self.G_y @ y.reshape(-1) - self.c


@dataclass(frozen=True)
class Box:
    """The closed box [low, high] (either bound may be None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and not self.low <= self.high:
            raise ValueError(f"Box: need low <= high, got low={self.low!r}, high={self.high!r}")

    def project(self, v: Tensor) -> Tensor:
        return v.clamp(self.low, self.high)

    def halfspaces(self, dim: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Rows (G, c) with {v : G v <= c} = the box in R^dim."""
        eye = torch.eye(dim, dtype=like.dtype, device=like.device)
        rows, rhs = [], []
        if self.high is not None:
            rows.append(eye)
            rhs.append(torch.full((dim,), float(self.high), dtype=like.dtype, device=like.device))
        if self.low is not None:
            rows.append(-eye)
            rhs.append(torch.full((dim,), -float(self.low), dtype=like.dtype, device=like.device))
        if not rows:
            return like.new_zeros(0, dim), like.new_zeros(0)
        return torch.cat(rows), torch.cat(rhs)


def violation(h: Tensor) -> float:
    """max_i max(h_i, 0): the largest constraint violation."""
    return float(h.clamp_min(0).max()) if h.numel() else 0.0


class ConstrainedProblem(MultiBlockProblem):
    """A single-block bilevel problem whose lower level has the constraints h(x, y) <= 0 (module docstring).

    Args (besides `MultiBlockProblem`'s, with y0 of leading dimension 1):
        constraint: h(x, y, data) -> (k,) (x and y as the losses receive them), or a `LinearConstraint`.
        constraint_data: fixed tensors passed to h as `data`.
        x_set, y_set: optional boxes X and Y.

    Checked at construction (ValueError with the reason): h returns a 1-D tensor; every row of h depends on y
    (else that row constrains x alone and the lower problem cannot satisfy it); for a linear h, the lower
    feasible set {y in Y : h(x0, y) <= 0} is not empty.
    """

    def __init__(self, upper_loss: Any, lower_loss: Any, x0: Tensor, y0: Tensor, lower_sampler: Any,
                 upper_sampler: Any, *, constraint: ConstraintFn | LinearConstraint,
                 constraint_data: Batch | None = None, x_set: Box | None = None, y_set: Box | None = None,
                 **kwargs: Any) -> None:
        super().__init__(upper_loss, lower_loss, x0, y0, lower_sampler, upper_sampler, **kwargs)
        if self.num_blocks != 1:
            raise ValueError(f"ConstrainedProblem has one lower problem; y0 holds {self.num_blocks} blocks")
        self.constraint = constraint
        self.linear = constraint if isinstance(constraint, LinearConstraint) else None
        self.constraint_data = dict(constraint_data or {})
        self.x_set = x_set
        self.y_set = y_set
        if x_set is not None:
            self.x0 = x_set.project(self.x0)
        self.num_constraints = self._check_constraint()

    # --- evaluation on flat variables -----------------------------------------------------------------
    def h(self, x: Tensor, y: Tensor) -> Tensor:
        """h(x, y) for flat x (d_x,) and y (d_y,)."""
        if self.linear is not None:
            return self.linear(x, y, self.constraint_data)
        return self.constraint(self.x_layout.unflatten(x), self.y_for_loss(y), self.constraint_data)

    def project_x(self, x: Tensor) -> Tensor:
        return x if self.x_set is None else self.x_set.project(x)

    def project_y(self, y: Tensor) -> Tensor:
        return y if self.y_set is None else self.y_set.project(y)

    # --- half-space forms (linear h) ------------------------------------------------------------------
    def lower_halfspaces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(G, c) with {y in Y : h(x, y) <= 0} = {y : G y <= c}."""
        lin = self._need_linear("lower_halfspaces")
        G, c = lin.G_y, lin.c - lin.G_x @ x
        if self.y_set is not None:
            Gb, cb = self.y_set.halfspaces(self.dim_y, c)
            G, c = torch.cat([G, Gb]), torch.cat([c, cb])
        return G, c

    def joint_halfspaces(self) -> tuple[Tensor, Tensor]:
        """(G, c) with {(x, y) in X x Y : h(x, y) <= 0} = {v = (x, y) : G v <= c} (LV-HBA's set C)."""
        lin = self._need_linear("joint_halfspaces")
        G, c = torch.cat([lin.G_x, lin.G_y], dim=1), lin.c
        for box, offset, dim in ((self.x_set, 0, self.dim_x), (self.y_set, self.dim_x, self.dim_y)):
            if box is not None:
                Gb, cb = box.halfspaces(dim, c)
                pad = Gb.new_zeros(Gb.shape[0], self.dim_x + self.dim_y)
                pad[:, offset:offset + dim] = Gb
                G, c = torch.cat([G, pad]), torch.cat([c, cb])
        return G, c

    def project_lower(self, x: Tensor, y: Tensor) -> QPResult:
        """Projection of y onto {y in Y : h(x, y) <= 0}, with the multipliers of its rows (h rows first)."""
        G, c = self.lower_halfspaces(x)
        return project_halfspaces(y, G, c)

    def project_joint(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Projection of (x, y) onto C = {(x, y) in X x Y : h(x, y) <= 0}."""
        G, c = self.joint_halfspaces()
        p = project_halfspaces(torch.cat([x, y]), G, c).solution
        return p[:self.dim_x], p[self.dim_x:]

    def _need_linear(self, what: str) -> LinearConstraint:
        if self.linear is None:
            raise ValueError(f"{what} needs a LinearConstraint h(x, y) = G_x x + G_y y - c; {self.name} has a "
                             "general constraint function")
        return self.linear

    # --- checks ---------------------------------------------------------------------------------------
    def _check_constraint(self) -> int:
        x, y = self.x0, self.y0[0]
        try:
            value = self.h(x, y)
        except (RuntimeError, IndexError, ValueError) as err:
            raise ValueError(f"constraint h failed at (x0, y0) with x of shape {tuple(x.shape)} and y of shape "
                             f"{tuple(y.shape)}: {err}") from err
        if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() == 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"constraint h must return a 1-D tensor of shape (k,) with k >= 1 (one entry per "
                             f"constraint h_i(x, y) <= 0), got {shape}")
        gen = torch.Generator(device=y.device).manual_seed(0)
        probe = y + torch.randn(y.shape, generator=gen, dtype=y.dtype, device=y.device)
        free = torch.ones(value.shape[0], dtype=torch.bool, device=y.device)
        for point in (y, probe):
            jac = jacrev(lambda y_: self.h(x, y_))(point)
            free &= (jac == 0).all(dim=1)
        if bool(free.any()):
            rows = free.nonzero().flatten().tolist()
            raise ValueError(f"constraint rows {rows[:10]}{' ...' if len(rows) > 10 else ''} of h do not depend on "
                             "y: a constraint on x alone belongs to the upper level (the set X), not to h")
        if self.linear is not None:
            try:
                self.project_lower(x, y)
            except QPInfeasibleError as err:
                raise ValueError(f"the lower-level constraints are infeasible at the initial x0: no y in Y has "
                                 f"h(x0, y) <= 0 ({err})") from None
        return int(value.shape[0])


class ConstraintOracles:
    """Counted oracles of h: values and the products h^T mu -> (grad_x h^T mu, grad_y h^T mu) from one vjp.

    Counts: `h` (one evaluation of h at one point), `h_vjp` (one product, which includes the value)."""

    def __init__(self, problem: ConstrainedProblem) -> None:
        self.problem = problem
        self.counts: Counter[str] = Counter({"h": 0, "h_vjp": 0})

    def value(self, x: Tensor, y: Tensor) -> Tensor:
        self.counts["h"] += 1
        return self.problem.h(x, y)

    def products(self, x: Tensor, y: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h(x, y), grad_x h(x, y)^T mu, grad_y h(x, y)^T mu)."""
        self.counts["h_vjp"] += 1
        lin = self.problem.linear
        if lin is not None:  # G_x^T mu, G_y^T mu directly: no autograd graph
            return lin(x, y, self.problem.constraint_data), lin.G_x.T @ mu, lin.G_y.T @ mu
        value, pullback = vjp(self.problem.h, x, y)
        gx, gy = pullback(mu)
        return value, gx, gy

    def y_product(self, x: Tensor, y: Tensor, mu: Tensor) -> Tensor:
        """grad_y h(x, y)^T mu only (inner loops over y)."""
        lin = self.problem.linear
        if lin is None:
            return self.products(x, y, mu)[2]
        self.counts["h_vjp"] += 1
        return lin.G_y.T @ mu

    def jacobians(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(grad_x h (k, d_x), grad_y h (k, d_y)), for small problems and tests."""
        return jacrev(self.problem.h, argnums=(0, 1))(x, y)


def exact_lower_solve(problem: ConstrainedProblem, x: Tensor, g_hessian: Tensor, g_grad_at_zero: Tensor
                      ) -> QPResult:
    """The lower problem at x as a QP, for g quadratic in y: g(x, y) = 1/2 y^T H y + q^T y + const with
    H = `g_hessian`, q = `g_grad_at_zero` = grad_y g(x, 0); returns (y*(x), multipliers of h (and of the Y
    box rows, after h's))."""
    G, c = problem.lower_halfspaces(x)
    return solve_qp(g_hessian, g_grad_at_zero, G, c)
