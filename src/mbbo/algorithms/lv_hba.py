"""LV-HBA (Yao, Yu, Zeng, Zhang, ICLR 2024: "Constrained bi-level optimization: proximal Lagrangian value function
approach and Hessian-free algorithm"; code SUSTech-Optimization/LV-HBA): single loop, Hessian-free, no lower-level
strong convexity needed, for lower levels with constraints h(x, y) <= 0 and (x, y) in C.

With theta the proximal lower iterate, lambda its multipliers and z their proximal centre (c_k = c (k+1)^p):

    theta  <- theta - eta [g_y(x, theta) + h_y(x, theta)^T lambda + (theta - y) / gamma1]
    lambda <- Proj_{lambda >= 0}( lambda + eta [h(x, theta) - (lambda - z) / gamma2] )
    d_x = f_x(x, y) / c_k + g_x(x, y) - g_x(x, theta) - h_x(x, theta)^T lambda
    d_y = f_y(x, y) / c_k + g_y(x, y) - (y - theta) / gamma1
    (x, y) <- Proj_C( (x, y) - alpha (d_x, d_y) ),      C = {(x, y) in X x Y : h(x, y) <= 0}
    z <- Proj_{[0, z_max]}( z + beta (lambda - z) / gamma2 )

The joint projection is a projection onto an intersection of half-spaces (linear h), solved by Clarabel and
polished (`mbbo.qp.project_halfspaces`).

Defects of the public SVM code that are fixed here (constrained.md section 3): lambda is kept non-negative (the
code does not project it); z is updated (the code never updates it); x (the SVM's C) moves by its gradient step
before the projection (one update in the code is not in place, so C moved only through the projection); the
evaluators report the test loss without the code's hard-coded divisors.

Defaults: the SVM harness (alpha 0.01, beta 0.1, eta 1e-3, 1/gamma1 = 1/gamma2 = 0.1, c_k = (k+1)^0.5, i.e. grad f
divided by sqrt(k+1); 80 epochs = 80 iterations). `TOY_DEFAULTS`: alpha 0.008, beta 0.02, eta 0.01, gamma 10,
c_k = 0.025 (k+1)^0.3, 1,500 iterations. z_max (the code's bound u) is not given for the SVM: 100 here.
`lower_variables()` is y; `reported_models()` gives y and theta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.constrained_base import (
    all_finite,
    constrained_misfit,
    counted_constraint_oracles,
    grads_f,
    grads_g,
)
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.problem import MultiBlockProblem
from mbbo.state import UNSET
from mbbo.validation import check_positive, check_real

__all__ = ["LVHBA", "TOY_DEFAULTS", "LVHBAConfig"]

TOY_DEFAULTS: dict[str, Any] = {"alpha": 0.008, "beta": 0.02, "eta": 0.01, "gamma1": 10.0, "gamma2": 10.0,
                                "c": 0.025, "p": 0.3}


@dataclass
class LVHBAConfig(Hyper):
    """LV-HBA hyper-parameters; defaults: the authors' SVM harness."""

    alpha: float = 0.01
    beta: float = 0.1
    eta: float = 1e-3
    gamma1: float = 10.0
    gamma2: float = 10.0
    c: float = 1.0
    p: float = 0.5
    z_max: float = 100.0

    def validate(self, problem: MultiBlockProblem) -> None:
        for name in ("alpha", "beta", "eta", "gamma1", "gamma2", "c", "z_max"):
            check_positive(name, getattr(self, name))
        check_real("p", self.p, 0.0, 0.5, low_open=True)


class LVHBA(SingleBlockAlgorithm):
    """LV-HBA (Yao et al., ICLR 2024) with the public code's defects fixed (module docstring)."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        theta: Tensor = UNSET  # the proximal lower variable
        lam: Tensor = UNSET  # the constraint multipliers
        z: Tensor = UNSET  # the multipliers' proximal copy

    name = "lv_hba"
    constrained_only: ClassVar[bool] = True  # fits constrained tasks only (task registry)
    Config = LVHBAConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.h_oracles = counted_constraint_oracles(self)
        self.x = self.problem.project_x(self.x)
        self.x, self.y = self.problem.project_joint(self.x, self.y)
        self.theta = self.y.clone()
        k = self.problem.num_constraints
        self.lam = torch.zeros(k, dtype=self.y.dtype, device=self.y.device)
        self.z = torch.zeros_like(self.lam)

    def step(self) -> None:
        cfg, x, y, k = self.config, self.x, self.y, self.iteration
        _, gy_theta = grads_g(self, x, self.theta.unsqueeze(0))
        h_theta, _, hy_theta = self.h_oracles.products(x, self.theta, self.lam)
        theta = self.theta - cfg.eta * (gy_theta[0] + hy_theta + (self.theta - y) / cfg.gamma1)
        lam = (self.lam + cfg.eta * (h_theta - (self.lam - self.z) / cfg.gamma2)).clamp_min(0.0)
        c_k = cfg.c * (k + 1) ** cfg.p
        fx, fy = grads_f(self, x, y)
        gx, gy = grads_g(self, x, torch.stack([y, theta]))
        _, hx_theta, _ = self.h_oracles.products(x, theta, lam)
        d_x = fx / c_k + gx[0] - gx[1] - hx_theta
        d_y = fy / c_k + gy[0] - (y - theta) / cfg.gamma1
        self.x_prev = x
        self.x, self.y = self.problem.project_joint(x - cfg.alpha * d_x, y - cfg.alpha * d_y)
        self.z = (self.z + cfg.beta * (lam - self.z) / cfg.gamma2).clamp(0.0, cfg.z_max)
        self.theta, self.lam = theta, lam
        self.iteration += 1

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        return constrained_misfit(problem, super().unsuitable_for(problem), "its joint projection onto "
                                  "{h(x, y) <= 0} needs a linear constraint (LinearConstraint)")

    def is_finite(self) -> bool:
        return all_finite(self.state_tensors())

    def reported_models(self) -> dict[str, Tensor]:
        return {"y": self.y, "theta": self.theta}
