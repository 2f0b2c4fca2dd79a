"""SFLCB (Shen, Zhang, Huang et al., NeurIPS 2025; code ShenGroup/SFLCB): a single-loop, fully first-order
method for bilevel problems whose lower level is strongly convex in y with linear coupled constraints h(x, y) <= 0.

A penalty (delta) plus augmented Lagrangians (rho1, rho2) turn the problem into one saddle function

    K(x, y, z, alpha, beta, u, v) = delta f(x, y) + g(x, y) - g(x, z)
                                    + <u, h(x, y) - alpha> - <v, h(x, z) - beta>
                                    + rho1/2 ||h(x, y) - alpha||^2 - rho2/2 ||h(x, z) - beta||^2

on which it runs gradient descent on (x, y, alpha, v) and ascent on (z, beta, u) with one step size eta; after each
step the slacks are clamped, alpha <- min(alpha, 0), beta <- min(beta, 0), and x <- Proj_X(x). With
w_y = u + rho1 (h(x, y) - alpha) and w_z = v + rho2 (h(x, z) - beta) the partial gradients are

    K_x = delta f_x(x, y) + g_x(x, y) - g_x(x, z) + h_x(x, y)^T w_y - h_x(x, z)^T w_z
    K_y = delta f_y(x, y) + g_y(x, y) + h_y(x, y)^T w_y        K_z = -g_y(x, z) - h_y(x, z)^T w_z
    K_alpha = -w_y     K_beta = w_z     K_u = h(x, y) - alpha     K_v = -(h(x, z) - beta).

Orderings (both in the authors' code): `"jacobi"` (the SVM harness, and the default here: every gradient at the old
point) and `"gauss_seidel"` (the toy: u and v first, then the primal blocks from the new multipliers).

Initialisation (`warm_start=True`, the SVM harness): the lower QP is solved exactly at x0 (`mbbo.qp`, Clarabel),
y = z = y*(x0), u = v = its multipliers, alpha = beta = h(x0, y*). With `warm_start=False` (the toy's random
starts): y = z = y0, u = v = 0, alpha = beta = min(h(x0, y0), 0). The SVM harness reports the z-model
(`lower_variables()` is z); `reported_models()` gives z and y.

Defaults: the SVM harness (delta 0.01, eta 1e-3, rho 0.01; 10,000 iterations); `TOY_DEFAULTS` the toy's (delta 0.1,
eta 0.01, rho 1, Gauss-Seidel, random starts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.constrained_base import (
    all_finite,
    constrained_misfit,
    counted_constraint_oracles,
    exact_lower,
    grads_f,
    grads_g,
)
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.problem import MultiBlockProblem
from mbbo.saddle import ORDERINGS, SaddleBlock, descent_ascent_step, nonpositive
from mbbo.state import UNSET
from mbbo.validation import check_choice, check_flag, check_nonnegative, check_positive

__all__ = ["SFLCB", "TOY_DEFAULTS", "SFLCBConfig"]

VARIABLES = ("x", "y", "z", "alpha", "beta", "u", "v")
TOY_DEFAULTS: dict[str, Any] = {"delta": 0.1, "lr": 0.01, "rho1": 1.0, "rho2": 1.0, "ordering": "gauss_seidel",
                                "warm_start": False}


@dataclass
class SFLCBConfig(Hyper):
    """SFLCB hyper-parameters; defaults: the authors' SVM harness."""

    delta: float = 0.01
    lr: float = 1e-3
    rho1: float = 0.01
    rho2: float = 0.01
    ordering: str = "jacobi"
    warm_start: bool = True

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("delta", self.delta)
        check_positive("lr", self.lr)
        check_nonnegative("rho1", self.rho1)
        check_nonnegative("rho2", self.rho2)
        check_choice("ordering", self.ordering, ORDERINGS)
        check_flag("warm_start", self.warm_start)


class SFLCB(SingleBlockAlgorithm):
    """SFLCB (Shen et al., NeurIPS 2025): single-loop descent-ascent on the saddle function K (module docstring)."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        z: Tensor = UNSET  # the lower variables of the value-function copy
        alpha: Tensor = UNSET  # slack variables of the two lower problems
        beta: Tensor = UNSET
        u: Tensor = UNSET  # multipliers of the two lower problems
        v: Tensor = UNSET

    name = "sflcb"
    constrained_only: ClassVar[bool] = True  # fits constrained tasks only (task registry)
    Config = SFLCBConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.h_oracles = counted_constraint_oracles(self)
        self.x = self.problem.project_x(self.x)
        x, y = self.x, self.problem.project_y(self.y)
        if self.config.warm_start:
            exact = exact_lower(self, x, y)
            y = exact.solution
            mult = exact.multipliers[:self.problem.num_constraints]
            slack = self.h_oracles.value(x, y)
        else:
            mult = torch.zeros(self.problem.num_constraints, dtype=y.dtype, device=y.device)
            slack = self.h_oracles.value(x, y).clamp_max(0.0)
        self.y, self.z = y, y.clone()
        self.alpha, self.beta = slack, slack.clone()
        self.u, self.v = mult, mult.clone()
        pb = self.problem
        self.blocks = (SaddleBlock("x", clamp=pb.project_x), SaddleBlock("y", clamp=pb.project_y),
                       SaddleBlock("z", ascent=True, clamp=pb.project_y), SaddleBlock("alpha", clamp=nonpositive),
                       SaddleBlock("beta", ascent=True, clamp=nonpositive), SaddleBlock("u", ascent=True),
                       SaddleBlock("v"))

    def gradient(self, p: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
        """The partial gradients of K at p (module docstring); only the h-terms when only u, v are asked."""
        cfg = self.config
        x, y, z = p["x"], p["y"], p["z"]
        hy, hz = self.h_oracles.value(x, y), self.h_oracles.value(x, z)
        grads = {"u": hy - p["alpha"], "v": -(hz - p["beta"])}
        if set(names) <= {"u", "v"}:
            return grads
        w_y = p["u"] + cfg.rho1 * (hy - p["alpha"])
        w_z = p["v"] + cfg.rho2 * (hz - p["beta"])
        _, hx_y, hy_y = self.h_oracles.products(x, y, w_y)
        _, hx_z, hy_z = self.h_oracles.products(x, z, w_z)
        fx, fy = grads_f(self, x, y)
        gx, gy = grads_g(self, x, torch.stack([y, z]))
        grads.update({
            "x": cfg.delta * fx + gx[0] - gx[1] + hx_y - hx_z,
            "y": cfg.delta * fy + gy[0] + hy_y,
            "z": -(gy[1] + hy_z),
            "alpha": -w_y,
            "beta": w_z,
        })
        return grads

    def step(self) -> None:
        groups = None if self.config.ordering == "jacobi" else (("u", "v"), ("x", "y", "z", "alpha", "beta"))
        new = descent_ascent_step(self.point(), self.blocks, self.gradient, self.config.lr, groups)
        self.x_prev = self.x
        self.x, self.y, self.z = new["x"], new["y"], new["z"]
        self.alpha, self.beta, self.u, self.v = new["alpha"], new["beta"], new["u"], new["v"]
        self.iteration += 1

    def point(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in VARIABLES}

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        return constrained_misfit(problem, super().unsuitable_for(problem))

    def lower_variables(self) -> Tensor:
        return self.z.unsqueeze(0)

    def is_finite(self) -> bool:
        return all_finite(self.state_tensors())

    def reported_models(self) -> dict[str, Tensor]:
        return {"z": self.z, "y": self.y}
