"""BLOCC (Jiang, Xiao, Chen et al., NeurIPS 2024: "A primal-dual-assisted penalty approach to bilevel optimization
with coupled constraints"), the standard baseline for lower levels with coupled constraints h(x, y) <= 0.

Two Lagrangians of the lower level, with the penalty gamma:

    L_F(y, mu; x) = f(x, y) + gamma g(x, y) + mu^T h(x, y),        L_g(y, mu; x) = g(x, y) + mu^T h(x, y).

Each iteration solves max_{mu >= 1e-5} min_y of both by the max-min inner loop (`mbbo.saddle.max_min_loop`: T rounds
of Ty gradient steps on y with step eta1, then mu <- max(1e-5, mu + eta2 h(x, y)); early exit below 1e-4),
warm-started from the previous iteration's (y_g, mu_g) and (y_F, mu_F), then takes the upper step (Danskin)

    x <- Proj_X( x - eta [ f_x(x, y_F) + h_x(x, y_F)^T mu_F - gamma h_x(x, y_g)^T mu_g
                           + gamma (g_x(x, y_F) - g_x(x, y_g)) ] ).

Defaults: the authors' SVM harness (gamma 12, eta 0.01, T = Ty = 20, eta1 1e-3 for L_g and 1e-5 for L_F, eta2 1e-4,
80 epochs = 80 upper iterations). The harness reports the accuracy of y_F (`lower_variables()`);
`reported_models()` gives y_F and y_g.
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
from mbbo.saddle import max_min_loop
from mbbo.state import UNSET
from mbbo.validation import check_int, check_nonnegative, check_positive

__all__ = ["BLOCC", "BLOCCConfig"]


@dataclass
class BLOCCConfig(Hyper):
    """BLOCC hyper-parameters; defaults: the authors' SVM harness."""

    gamma: float = 12.0
    lr: float = 0.01
    rounds: int = 20
    inner_steps: int = 20
    lr_y_g: float = 1e-3
    lr_y_F: float = 1e-5
    lr_mu: float = 1e-4
    mu_floor: float = 1e-5
    tol: float = 1e-4

    def validate(self, problem: MultiBlockProblem) -> None:
        for name in ("gamma", "lr", "lr_y_g", "lr_y_F", "lr_mu"):
            check_positive(name, getattr(self, name))
        check_nonnegative("mu_floor", self.mu_floor)
        check_nonnegative("tol", self.tol)
        check_int("rounds", self.rounds, 1)
        check_int("inner_steps", self.inner_steps, 1)


class BLOCC(SingleBlockAlgorithm):
    """BLOCC (Jiang et al., NeurIPS 2024): max-min inner loops for L_g and L_F, then a Danskin upper step."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        y_g: Tensor = UNSET  # the lower problem's primal-dual iterates
        mu_g: Tensor = UNSET
        y_F: Tensor = UNSET  # the penalised problem's primal-dual iterates
        mu_F: Tensor = UNSET

    name = "blocc"
    constrained_only: ClassVar[bool] = True  # fits constrained tasks only (task registry)
    Config = BLOCCConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.h_oracles = counted_constraint_oracles(self)
        self.x = self.problem.project_x(self.x)
        y = self.problem.project_y(self.y)
        mu = torch.full((self.problem.num_constraints,), self.config.mu_floor, dtype=y.dtype, device=y.device)
        self.y_g, self.mu_g, self.y_F, self.mu_F = y, mu, y.clone(), mu.clone()

    def _inner(self, x: Tensor, y: Tensor, mu: Tensor, gamma_f: float | None, lr_y: float) -> tuple[Tensor, Tensor]:
        """max-min of L_g (gamma_f None) or of L_F = f + gamma g + mu^T h."""
        cfg = self.config

        def grad_y(y_: Tensor, mu_: Tensor) -> Tensor:
            gy = self.grad_y_g(x, y_, self.lower_batch())
            hy = self.h_oracles.y_product(x, y_, mu_)
            if gamma_f is None:
                return gy + hy
            _, fy = grads_f(self, x, y_)
            return fy + gamma_f * gy + hy

        y, mu, _ = max_min_loop(y, mu, grad_y, lambda y_: self.h_oracles.value(x, y_), rounds=cfg.rounds,
                                inner_steps=cfg.inner_steps, lr_y=lr_y, lr_mu=cfg.lr_mu, mu_floor=cfg.mu_floor,
                                tol=cfg.tol, project_y=self.problem.project_y)
        return y, mu

    def step(self) -> None:
        cfg, x = self.config, self.x
        self.y_g, self.mu_g = self._inner(x, self.y_g, self.mu_g, None, cfg.lr_y_g)
        self.y_F, self.mu_F = self._inner(x, self.y_F, self.mu_F, cfg.gamma, cfg.lr_y_F)
        fx, _ = grads_f(self, x, self.y_F)
        gx, _ = grads_g(self, x, torch.stack([self.y_F, self.y_g]))
        _, hx_F, _ = self.h_oracles.products(x, self.y_F, self.mu_F)
        _, hx_g, _ = self.h_oracles.products(x, self.y_g, self.mu_g)
        direction = fx + hx_F - cfg.gamma * hx_g + cfg.gamma * (gx[0] - gx[1])
        self.x_prev = x
        self.x = self.problem.project_x(x - cfg.lr * direction)
        self.iteration += 1

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        return constrained_misfit(problem, super().unsuitable_for(problem))

    def lower_variables(self) -> Tensor:
        return self.y_F.unsqueeze(0)

    def is_finite(self) -> bool:
        return all_finite(self.state_tensors())

    def reported_models(self) -> dict[str, Tensor]:
        return {"y_F": self.y_F, "y_g": self.y_g}
