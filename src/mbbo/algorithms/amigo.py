"""AmIGO (Arbel & Mairal, "Amortized Implicit Differentiation for Stochastic Bilevel Optimization", ICLR 2022)
and FSLA (Li, Gu & Huang, "A Fully Single Loop Algorithm for Bilevel Optimization without Hessian Inverse",
AAAI 2022), as the public benchmark implements them (benchopt/benchmark_bilevel `solvers/amigo.py`,
`solvers/fsla.py`).

AmIGO, iteration k (double loop, amortised: both inner problems warm-started)::

    y_k = lower_steps SGD steps on g(x_k, .) from y_{k-1}
    (grad_x f, grad_y f) on one upper batch at (x_k, y_k)
    v_k = linsys_steps SGD steps v <- v - eta (grad_yy G(x_k, y_k; B_j) v - grad_y f) from v_{k-1}   (fresh B_j)
    x_{k+1} = x_k - beta (grad_x f - grad_xy G(x_k, y_k; zeta) v_k)                          (zeta fresh)

Benchopt uses one step size (0.1) for y and v and n_inner_steps (10) for both loops. Quirk not reproduced: in
benchopt's JAX code the cross product reads the v passed to the jitted chunk (the v of the previous callback,
not the freshly updated one) and the y-loop reads the x of the chunk start; here both use the current values.

FSLA, iteration k (single loop; STORM-type recursive momentum on the hypergradient)::

    y_{k+1} = y_k - alpha_k grad_y G(x_k, y_k; B_1)
    v_{k+1} = v_k - eta_k (grad_yy G(x_k, y_{k+1}; B_2) v_k - grad_y F(x_k, y_{k+1}; xi_1))
    h_k     = grad_x F(x_k, y_{k+1}; xi_2) - grad_xy G(x_k, y_{k+1}; B_3) v_{k+1}
    h_k^old = grad_x F(x_{k-1}, y_k; xi_2) - grad_xy G(x_{k-1}, y_k; B_3) v_k        (same xi_2, B_3)
    d_k     = h_k + (1 - rho_k) (d_{k-1} - h_k^old)          (`mbbo.trackers.STORM`; d_0 = h_0)
    x_{k+1} = x_k - beta_k d_k

(h_k^old is the previous iteration's estimate recomputed on the current samples.) Benchopt starts from
d_{-1} = 0 and x_{-1} = 0 instead of d_0 = h_0; that start is not reproduced. Steps: alpha_k = lower_lr /
sqrt(k+1), eta_k = linsys_lr / sqrt(k+1), rho_k = momentum / sqrt(k+1), beta_k = lr / sqrt(k+1) (benchopt: all
exponents 1/2, eta = alpha, rho = step_size).

Defaults: benchopt's class defaults (step_size 0.1, outer_ratio 1, n_inner_steps 10, constant steps for AmIGO;
exponents 1/2 for FSLA). Benchopt's best parameters: AmIGO quadratics_021424 step 0.01, outer_ratio 0.1; covtype
0.03125 / 0.1; ijcnn1 0.125 / 0.316; datacleaning 0.001 / 1e-5. FSLA covtype 1.0 / 0.01, ijcnn1 0.03125 / 0.01,
datacleaning 1.0 / 1e-3 to 1e-5 (lr = step / outer_ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.pieces import fresh_hvps, lower_loop, lower_start
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.algorithms.stocbio import StepConfig, ZooConfig
from mbbo.linsolve import SGDQuadratic
from mbbo.problem import MultiBlockProblem
from mbbo.state import UNSET
from mbbo.steps import scheduled
from mbbo.trackers import STORM
from mbbo.validation import check_int, check_nonnegative, check_positive, check_unit


@dataclass
class AmIGOConfig(ZooConfig):
    """lower_steps = T (y-loop), linsys_steps = M (v-loop), linsys_lr = eta (v step)."""

    linsys_steps: int = 10
    linsys_lr: float = 0.1

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_int("linsys_steps", self.linsys_steps, 1)
        check_positive("linsys_lr", self.linsys_lr)


class AmIGO(SingleBlockAlgorithm):
    """AmIGO: warm-started SGD loops on y and on the quadratic of v, then an SGD step on x."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        v: Tensor = UNSET  # the linear-system variable (warm start of the v-loop)

    name = "amigo"
    Config = AmIGOConfig
    v: Tensor

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)

    def step(self) -> None:
        cfg, x, k = self.config, self.x, self.iteration
        self.y = lower_loop(self, x, lower_start(self), cfg.lower_steps, cfg.lower_lr_at(k))
        gx_f, gy_f = self.upper_grads(x, self.y, self.upper_batch())
        solver = SGDQuadratic(cfg.linsys_steps, cfg.linsys_lr)
        self.v = solver.solve(fresh_hvps(self, x, self.y), gy_f, v0=self.v).v
        self.advance(x - cfg.lr_at(k) * (gx_f - self.cross(x, self.y, self.v, self.lower_batch())))

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: v stays the warm start of the v-loop."""


@dataclass
class FSLAConfig(StepConfig):
    """Schedules value / (k + 1)^exponent for lr (x), lower_lr (y), linsys_lr (v) and momentum (rho, STORM
    weight, in (0, 1])."""

    lr_exponent: float = 0.5
    lower_lr_exponent: float = 0.5
    linsys_lr: float = 0.1
    linsys_lr_exponent: float = 0.5
    momentum: float = 0.1
    momentum_exponent: float = 0.5

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_positive("linsys_lr", self.linsys_lr)
        check_nonnegative("linsys_lr_exponent", self.linsys_lr_exponent)
        check_unit("momentum", self.momentum)
        check_nonnegative("momentum_exponent", self.momentum_exponent)


class FSLA(SingleBlockAlgorithm):
    """FSLA: one step on y and on v per iteration, STORM momentum on the hypergradient (two points, same
    samples), SGD on x."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        v: Tensor = UNSET  # the linear-system variable
        d: Tensor = UNSET  # STORM estimate of the hypergradient
        fresh: bool = True  # no previous point yet: d starts at the first hypergradient

    name = "fsla"
    Config = FSLAConfig
    v: Tensor
    d: Tensor
    fresh: bool

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)
        self.d = torch.zeros_like(self.x)

    def step(self) -> None:
        cfg, x, y, v, k = self.config, self.x, self.y, self.v, self.iteration
        y_new = y - cfg.lower_lr_at(k) * self.grad_y_g(x, y, self.lower_batch())
        hv = self.hvp(x, y_new, v, self.lower_batch())
        _, gy_f = self.upper_grads(x, y_new, self.upper_batch())
        v_new = v - scheduled(cfg.linsys_lr, cfg.linsys_lr_exponent, k) * (hv - gy_f)
        upper, lower = self.upper_batch(), self.lower_batch()
        if self.fresh:
            gx_f, _ = self.upper_grads(x, y_new, upper)
            self.d = gx_f - self.cross(x, y_new, v_new, lower)
        else:  # the same samples at (x_k, y_{k+1}, v_{k+1}) and (x_{k-1}, y_k, v_k)
            xs, ys = torch.stack([x, self.x_prev]), torch.stack([y_new, y])
            gx_f, _ = self.upper_grads(xs, ys, upper)
            h = gx_f - self.cross(xs, ys, torch.stack([v_new, v]), lower)
            self.d = STORM(scheduled(cfg.momentum, cfg.momentum_exponent, k)).update(self.d, h[0], h[1])
        self.fresh = False
        self.y, self.v = y_new, v_new
        self.advance(x - cfg.lr_at(k) * self.d)

    def restart(self) -> None:
        """A stage start re-initialises the momentum (d = h at the next step); y and v are carried over."""
        self.fresh = True
