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
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.constrained_base import ConstrainedMixin, not_constrained_reason
from mbbo.algorithms.f2sa import F2SAProjected, F2SAProjectedConfig
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


class PenaltyMethod(ConstrainedMixin, F2SAProjected):
    """Penalty method (Kwon et al., ICLR 2024) as projected F2SA onto the coupled lower set [template]."""

    @dataclass
    class State(F2SAProjected.State):
        mu_y: Tensor = UNSET  # multiplier estimates of the projections of y and z
        mu_z: Tensor = UNSET

    name = "penalty"
    Config = PenaltyConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self._init_constraints()
        pb: ConstrainedProblem = self.problem
        self.x = pb.project_x(self.x)
        self.y = pb.project_lower(self.x, self.y).solution
        self.z = self.y.clone()
        k = pb.num_constraints
        self.mu_y = torch.zeros(k, dtype=self.y.dtype, device=self.y.device)
        self.mu_z = torch.zeros_like(self.mu_y)

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        reason = not_constrained_reason(problem) or super().unsuitable_for(problem)
        if reason is None and isinstance(problem, ConstrainedProblem) and problem.linear is None:
            return "its projections onto {y : h(x, y) <= 0} need a linear constraint (LinearConstraint)"
        return reason

    @property
    def projection(self) -> Projection | None:
        return None  # the set depends on x: see project_lower

    def project_lower(self, x: Tensor, y: Tensor, z: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
        """Projections onto S(x) and the multiplier estimates nu / step (module docstring)."""
        k = self.problem.num_constraints
        proj_y, proj_z = self.problem.project_lower(x, y), self.problem.project_lower(x, z)
        self.mu_y = proj_y.multipliers[:k] / alpha
        self.mu_z = proj_z.multipliers[:k] / gamma
        return proj_y.solution, proj_z.solution

    def penalty_direction(self, x: Tensor, y: Tensor, z: Tensor, lam: float) -> Tensor:
        direction = super().penalty_direction(x, y, z, lam)
        _, hx_y, _ = self.h_oracles.products(x, y, self.mu_y)
        _, hx_z, _ = self.h_oracles.products(x, z, self.mu_z)
        return direction + hx_y - lam * hx_z

    def step(self) -> None:
        super().step()
        self.x = self.problem.project_x(self.x)

    def reported_models(self) -> dict[str, Tensor]:
        return {"z": self.z, "y": self.y}
