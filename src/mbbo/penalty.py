"""Penalty (value-function) reformulation of bilevel problems: the penalty gradient, penalty schedules and
lower-level projections, shared by the fully first-order methods (F2SA and its projected variant; reusable by
any penalty / Lagrangian method).

The penalty function of Kwon, Kwon, Wright & Nowak (ICML 2023; ICLR 2024) is::

    L_lambda(x) = min_y [ f(x, y) + lambda g(x, y) ] - lambda min_z g(x, z)

(ICLR'24 writes it with sigma = 1/lambda as psi_sigma = min_y [sigma f + g] - min_z g, i.e. L_lambda / lambda). By
Danskin's theorem its gradient needs first-order information only::

    grad L_lambda(x) = grad_x f(x, y_lambda) + lambda (grad_x g(x, y_lambda) - grad_x g(x, z*)),

y_lambda = argmin_y f + lambda g, z* = y*(x) = argmin_z g, and it approaches the hypergradient,
||grad L_lambda(x) - grad F(x)|| = O(1/lambda) (Kwon et al. 2023, Lemma 3.1) for a strongly convex lower level.

Schedules give lambda_k, k = 0, 1, ... Each is a frozen, validated dataclass with ``value(k)`` (closed form or
sum) and ``advance(lam, k) -> lambda_{k+1}`` (used by the algorithms, which keep the current value in their
state, so that a schedule may be changed between iterations and a run resumes bit-identically):

- :class:`ConstantPenalty`: lambda_k = lambda0;
- :class:`IncrementPenalty`: lambda_{k+1} = lambda_k + delta (k + 1)^(-p) (benchopt's F2SA with p = 1/7, so that
  lambda_k grows like k^(6/7));
- :class:`PowerPenalty`: lambda_k = lambda0 (k + k0)^p / k0^p (the rate of the F2SA paper, p = 1/7, which is
  lambda_k = gamma_k / alpha_k for step sizes alpha_k ~ k^(-5/7), gamma_k ~ k^(-4/7)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from mbbo.projections import project_ball
from mbbo.validation import check_nonnegative, check_positive

__all__ = [
    "ConstantPenalty",
    "IncrementPenalty",
    "PenaltySchedule",
    "PowerPenalty",
    "Projection",
    "as_projection",
    "make_penalty_schedule",
    "penalty_gradient",
]

Projection = Callable[[Tensor], Tensor]


def penalty_gradient(gx_f: Tensor, gx_g_y: Tensor, gx_g_z: Tensor, lam: float) -> Tensor:
    """grad_x f(x, y) + lambda (grad_x g(x, y) - grad_x g(x, z)): the gradient of the penalty function at (y, z).

    With y = argmin f + lambda g and z = argmin g it is the exact gradient of L_lambda (Danskin); with iterates it
    is F2SA's upper direction. The two x-gradients of g should come from the same mini-batch, so that their
    difference is O(||y - z||) = O(1/lambda) and the lambda factor does not amplify the sampling noise.
    """
    return gx_f + lam * (gx_g_y - gx_g_z)


class PenaltySchedule(Protocol):
    """lambda_k for k = 0, 1, ...; ``advance(lam, k)`` returns lambda_{k+1} from lambda_k = lam."""

    def value(self, k: int) -> float: ...

    def advance(self, lam: float, k: int) -> float: ...


@dataclass(frozen=True)
class ConstantPenalty:
    """lambda_k = lambda0."""

    lambda0: float = 1.0

    def __post_init__(self) -> None:
        check_positive("lambda0", self.lambda0)

    def value(self, k: int) -> float:
        return float(self.lambda0)

    def advance(self, lam: float, k: int) -> float:
        return float(lam)


@dataclass(frozen=True)
class IncrementPenalty:
    """lambda_0 = lambda0, lambda_{k+1} = lambda_k + delta (k + 1)^(-power).

    benchopt's F2SA (benchopt/benchmark_bilevel ``solvers/f2sa.py``: ``lmbda += d_lmbda`` with the scheduler
    ``delta_lmbda / (k + 1)^(1/7)``): defaults lambda0 = 1, delta = 0.1, power = 1/7, so lambda_k ~ k^(6/7).
    """

    lambda0: float = 1.0
    delta: float = 0.1
    power: float = 1.0 / 7.0

    def __post_init__(self) -> None:
        check_positive("lambda0", self.lambda0)
        check_nonnegative("delta", self.delta)
        check_nonnegative("power", self.power)

    def value(self, k: int) -> float:
        lam = float(self.lambda0)
        for j in range(k):
            lam = self.advance(lam, j)
        return lam

    def advance(self, lam: float, k: int) -> float:
        return float(lam + self.delta * (k + 1) ** (-self.power))


@dataclass(frozen=True)
class PowerPenalty:
    """lambda_k = lambda0 ((k + k0) / k0)^power, so lambda_0 = lambda0.

    The growth of the F2SA paper (Kwon et al., ICML 2023): lambda_k ~ k^(1/7), the ratio gamma_k / alpha_k of
    step sizes alpha_k ~ k^(-5/7) (y) and gamma_k ~ k^(-4/7) (z).
    """

    lambda0: float = 1.0
    power: float = 1.0 / 7.0
    k0: float = 1.0

    def __post_init__(self) -> None:
        check_positive("lambda0", self.lambda0)
        check_nonnegative("power", self.power)
        check_positive("k0", self.k0)

    def value(self, k: int) -> float:
        return float(self.lambda0 * ((k + self.k0) / self.k0) ** self.power)

    def advance(self, lam: float, k: int) -> float:
        return self.value(k + 1)


SCHEDULES = ("benchopt", "paper", "constant")


def make_penalty_schedule(kind: str, lambda0: float, delta: float = 0.1, power: float = 1.0 / 7.0
                          ) -> PenaltySchedule:
    """``"benchopt"`` -> IncrementPenalty(lambda0, delta, power); ``"paper"`` -> PowerPenalty(lambda0, power);
    ``"constant"`` -> ConstantPenalty(lambda0)."""
    if kind == "benchopt":
        return IncrementPenalty(lambda0, delta, power)
    if kind == "paper":
        return PowerPenalty(lambda0, power)
    if kind == "constant":
        return ConstantPenalty(lambda0)
    raise ValueError(f"lambda_schedule must be one of {SCHEDULES}, got {kind!r}")


def as_projection(spec: Projection | float | int | None) -> Projection | None:
    """A projection onto the lower-level constraint set Y from a callable (used as is), a radius R (the ball
    {||y|| <= R}, row-wise) or None (no constraint)."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool) and math.isfinite(spec) and spec > 0:
        radius = float(spec)
        return lambda v: project_ball(v, radius)
    raise ValueError(f"the lower-level projection must be a callable, a radius in (0, inf) or None, got {spec!r}")
