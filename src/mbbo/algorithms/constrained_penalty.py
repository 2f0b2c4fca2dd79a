"""The penalty method of Kwon, Kwon, Wright, Nowak (ICLR 2024: "On penalty methods for nonconvex bilevel
optimization and first-order stochastic approximation") for a constrained lower level, as a named configuration
of `f2sa_projected` (`mbbo.algorithms.f2sa`) plus a sigma schedule. [template]

Verified (the paper's abstract): the penalty psi_sigma(x) = (min_y [sigma f + g] - min_y g) / sigma is O(sigma)-close
to the hyper-objective under a proximal error bound, minimised by a first-order double-loop method. Reconstructed
here (constrained.md section 4): projected F2SA with lambda = 1/sigma (the lambda-scaled form of `mbbo.penalty`):

    for t = 1..T:  y <- Proj_{S(x)}(y - alpha_k (f_y(x, y) + lambda_k g_y(x, y)))
                   z <- Proj_{S(x)}(z - gamma_k g_y(x, z))
    x <- Proj_X( x - beta_k [ f_x(x, y) + lambda_k (g_x(x, y) - g_x(x, z))
                              + h_x(x, y)^T mu_y - lambda_k h_x(x, z)^T mu_z ] )

with S(x) = {y in Y : h(x, y) <= 0}. The paper's Y is a fixed closed convex set; with coupled constraints the set
depends on x and Danskin's theorem adds the multiplier terms h_x^T mu. They are not in the template: this module
adds them, estimating the multipliers from the projections' own multipliers (p = Proj(v) = v - G^T nu; at a fixed
point of the projected step of size s on phi, nu / s are the KKT multipliers of min phi s.t. h <= 0):
mu_y = nu_y / alpha_k, mu_z = nu_z / gamma_k, from the last inner step. Also reconstructed: the sigma schedule
(sigma_k = 1 / lambda_k with the F2SA paper's lambda_k = lambda0 (k+1)^(1/7) by default, `lambda_schedule`), the
step sizes (F2SA's), and T = 10. `lower_variables()` is z (the estimate of y*(x)); `reported_models()` gives z, y.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.constrained_base import constrained_misfit, counted_constraint_oracles
from mbbo.algorithms.f2sa import (
    F2SA,
    F2SAProjectedConfig,
    penalty_direction,
    penalty_lower_loop,
    start_penalty_iterates,
)
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.constrained import ConstrainedProblem
from mbbo.penalty import Projection
from mbbo.problem import MultiBlockProblem
from mbbo.state import UNSET

__all__ = ["PenaltyConfig", "PenaltyMethod"]


@dataclass
class PenaltyConfig(F2SAProjectedConfig):
    """`f2sa_projected` with the problem's lower set S(x) = {y in Y : h(x, y) <= 0} as the projection
    (`projection` must stay None) and the F2SA paper's lambda = 1/sigma growth."""

    projection: Projection | float | None = None
    lambda_schedule: str = "paper"
    shared_x_sample: bool = False  # full-batch tasks: same values; avoids vmapping g_x over points (see grads_g)

    def validate(self, problem: MultiBlockProblem) -> None:
        if self.projection is not None:
            raise ValueError("projection must be None for the penalty method: it projects onto the problem's "
                             f"constraint set S(x) = {{y in Y : h(x, y) <= 0}}, got {self.projection!r}")
        super(F2SAProjectedConfig, self).validate(problem)


class PenaltyMethod(SingleBlockAlgorithm):
    """Penalty method (Kwon et al., ICLR 2024) as projected F2SA onto the coupled lower set [template]."""

    @dataclass
    class State(F2SA.State):
        mu_y: Tensor = UNSET  # multiplier estimates of the projections of y and z
        mu_z: Tensor = UNSET

    name = "penalty"
    constrained_only: ClassVar[bool] = True  # fits constrained tasks only (task registry)
    Config = PenaltyConfig
    problem: ConstrainedProblem

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_penalty_iterates(self, None)
        self.h_oracles = counted_constraint_oracles(self)
        pb = self.problem
        self.x = pb.project_x(self.x)
        self.y = pb.project_lower(self.x, self.y).solution
        self.z = self.y.clone()
        k = pb.num_constraints
        self.mu_y = torch.zeros(k, dtype=self.y.dtype, device=self.y.device)
        self.mu_z = torch.zeros_like(self.mu_y)

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        return constrained_misfit(problem, super().unsuitable_for(problem), "its projections onto "
                                  "{y : h(x, y) <= 0} need a linear constraint (LinearConstraint)")

    def project_lower(self, x: Tensor, y: Tensor, z: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
        """Projections onto S(x) and the multiplier estimates nu / step (module docstring)."""
        k = self.problem.num_constraints
        proj_y, proj_z = self.problem.project_lower(x, y), self.problem.project_lower(x, z)
        self.mu_y = proj_y.multipliers[:k] / alpha
        self.mu_z = proj_z.multipliers[:k] / gamma
        return proj_y.solution, proj_z.solution

    def step(self) -> None:
        """F2SA's iteration with the projections onto S(x), Danskin's multiplier terms h_x^T mu in the x direction
        and the projection of x onto X."""
        cfg, k, lam, x = self.config, self.iteration, self.lam, self.x
        alpha, gamma, beta = cfg.step_sizes(k)
        self.y, self.z = penalty_lower_loop(self, x, self.y, self.z, lam, alpha, gamma,
                                            lambda x_, y, z: self.project_lower(x_, y, z, alpha, gamma))
        _, hx_y, _ = self.h_oracles.products(x, self.y, self.mu_y)
        _, hx_z, _ = self.h_oracles.products(x, self.z, self.mu_z)
        direction = penalty_direction(self, x, self.y, self.z, lam) + hx_y - lam * hx_z
        self.advance(self.problem.project_x(x - beta * direction))
        self.lam = cfg.schedule().advance(lam, k)

    def restart(self) -> None:
        """For `Restarted`: nothing to re-initialise (no estimator); y, z, lambda and the schedules carry over."""

    def lower_variables(self) -> Tensor:
        return self.z.unsqueeze(0)

    def is_finite(self) -> bool:
        return super().is_finite() and bool(torch.isfinite(self.y).all())

    def reported_models(self) -> dict[str, Tensor]:
        return {"z": self.z, "y": self.y}
