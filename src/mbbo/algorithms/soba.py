"""SOBA (Dagreou, Ablin, Vaiter & Moreau, NeurIPS 2022) and MA-SOBA (Chen, Xu & Zhang, 2023).

Single-loop framework of "A framework for bilevel optimization that enables stochastic and global variance
reduction algorithms": y, the linear-system variable v and x move together, each by one step along a direction
that is linear in the oracles. With the library's sign (v solves (grad_yy g) v = grad_y f)::

    D_y = grad_y g(x, y; B)
    D_v = (grad_yy g(x, y; B)) v - grad_y f(x, y; B')          (gradient of 1/2 v^T H v - grad_y f^T v)
    D_x = grad_x f(x, y; B') - (grad_xy g(x, y; B)) v            (hypergradient estimate)

    y <- y - rho_t D_y,   v <- Proj_{||v|| <= R}(v - rho_v,t D_v),   x <- x - gamma_t D_x     (from the old point)

B and B' are independent lower and upper mini-batches; grad_y g, H v and J v come from one double-backward
graph. Step sizes follow benchopt's scheduler, c / (t + 1)^a: rho_t = lower_lr / (t+1)^lower_lr_exponent,
rho_v,t = linsys_lr / (t+1)^linsys_lr_exponent and gamma_t = lr / (t+1)^lr_exponent. benchopt's SOBA
(``solvers/soba.py``) uses one step_size s for y and v and s / outer_ratio for x, all with exponent 1/2, the
opposite sign for v (v = -H^{-1} grad_y f, same iterates) and no projection (``v_radius=None``).

MA-SOBA replaces D_x in the x step by its moving average, h <- (1 - theta) h + theta D_x, x <- x - gamma_t h
(h starts at 0 and the step uses the updated average, as in SLIP / BO-REP's code, of which MA-SOBA is the
unnormalised form). The paper's analysis uses constant step sizes and a projection of v onto a ball.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.pieces import implicit_oracle_calls
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.linsolve import SGDQuadratic
from mbbo.problem import MultiBlockProblem
from mbbo.state import UNSET
from mbbo.steps import scheduled
from mbbo.trackers import EMA
from mbbo.validation import check_int, check_nonnegative, check_optional, check_positive, check_unit


@dataclass
class SOBAConfig(Hyper):
    """Defaults: benchopt SOBA's class defaults (step_size 0.1, outer_ratio 1, exponents 1/2; benchopt lists no
    best parameters for the quadratic). benchopt's (step_size s, outer_ratio r) map to lower_lr = linsys_lr = s
    and lr = s / r; its batch size 64 is `batch_size` (None: the problem samplers' batch size)."""

    lr: float = 0.1
    lower_lr: float = 0.1
    linsys_lr: float = 0.1
    lr_exponent: float = 0.5
    lower_lr_exponent: float = 0.5
    linsys_lr_exponent: float = 0.5
    v_radius: float | None = None
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_positive("lower_lr", self.lower_lr)
        check_positive("linsys_lr", self.linsys_lr)
        check_nonnegative("lr_exponent", self.lr_exponent)
        check_nonnegative("lower_lr_exponent", self.lower_lr_exponent)
        check_nonnegative("linsys_lr_exponent", self.linsys_lr_exponent)
        check_optional(check_positive, "v_radius", self.v_radius)
        check_optional(check_int, "batch_size", self.batch_size, 1)

    def step_sizes(self, t: int) -> tuple[float, float, float]:
        """(rho_t, rho_v,t, gamma_t) at iteration t."""
        return (scheduled(self.lower_lr, self.lower_lr_exponent, t),
                scheduled(self.linsys_lr, self.linsys_lr_exponent, t), scheduled(self.lr, self.lr_exponent, t))


# the pieces of the family (SOBA, MA-SOBA, SABA, SRBA) ------------------------------------------------------


def soba_directions(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor, v: Tensor, lower: Any, upper: Any
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_y g, H v, J v, grad_x f, grad_y f) at one point (d,) or stacked points (P, d)."""
    gy, hv, jv = alg.lower_products(x, y, v, lower)
    gx_f, gy_f = alg.upper_grads(x, y, upper)
    return gy, hv, jv, gx_f, gy_f


def soba_move(alg: SingleBlockAlgorithm, d_y: Tensor, hv: Tensor, gy_f: Tensor, d_x: Tensor) -> None:
    """y, v, x updated simultaneously from the old point: y - rho d_y, one (projected, radius `v_radius`) step
    v - rho_v (H v - grad_y f) on the quadratic of v (alg.v), x - gamma d_x; ends the iteration."""
    cfg = alg.config
    rho, rho_v, gamma = cfg.step_sizes(alg.iteration)
    alg.y = alg.y - rho * d_y
    alg.v = SGDQuadratic(n_steps=1, lr=rho_v, radius=cfg.v_radius).solve(lambda _: hv, gy_f, v0=alg.v).v
    alg.advance(alg.x - gamma * d_x)


def soba_oracle_calls(alg: SingleBlockAlgorithm) -> dict[str, int]:
    """One lower mini-batch (grad_y g, H v, J v from one graph) and one upper mini-batch per iteration."""
    return implicit_oracle_calls(alg, grad_y_g=1, hvp=1, cross=1, grad_y_f=1)


# --- SOBA -------------------------------------------------------------------------------------------------


class SOBA(SingleBlockAlgorithm):
    """SOBA: one step on y, one SGD step on the quadratic of v, one step on x per iteration (see module doc).

    Per iteration: 1 grad_y g, 1 HVP, 1 cross product (one graph), 1 grad f (both parts).
    """

    @dataclass
    class State(SingleBlockAlgorithm.State):
        v: Tensor = UNSET  # the linear-system variable

    name = "soba"
    Config = SOBAConfig
    v: Tensor

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)

    def step(self) -> None:
        bs = self.config.batch_size
        gy, hv, jv, gx_f, gy_f = soba_directions(self, self.x, self.y, self.v, self.lower_batch(bs),
                                                 self.upper_batch(bs))
        soba_move(self, gy, hv, gy_f, gx_f - jv)

    def restart(self) -> None:
        """Nothing to re-initialise (y and v carry over)."""

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        return soba_oracle_calls(self)

    def linear_system_variables(self) -> Tensor:
        return self.v.unsqueeze(0)


@dataclass
class MASOBAConfig(SOBAConfig):
    """Constant step sizes (exponents 0) as in the paper's analysis, with benchopt SOBA's step_size 0.1;
    theta = 0.1 is the moving-average weight of SLIP / BO-REP's code (beta = 0.9). The paper's experimental
    values were not available to check."""

    lr_exponent: float = 0.0
    lower_lr_exponent: float = 0.0
    linsys_lr_exponent: float = 0.0
    theta: float = 0.1

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_unit("theta", self.theta)


class MASOBA(SingleBlockAlgorithm):
    """MA-SOBA (Chen, Xu & Zhang 2023, "Optimal algorithms for stochastic bilevel optimization under relaxed
    smoothness conditions"): SOBA with a moving average h of the hypergradient estimate driving x."""

    @dataclass
    class State(SOBA.State):
        h: Tensor = UNSET  # moving average of the hypergradient estimate

    name = "ma_soba"
    Config = MASOBAConfig
    v: Tensor
    h: Tensor

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)
        self.h = torch.zeros_like(self.x)

    def step(self) -> None:
        bs = self.config.batch_size
        gy, hv, jv, gx_f, gy_f = soba_directions(self, self.x, self.y, self.v, self.lower_batch(bs),
                                                 self.upper_batch(bs))
        self.h = EMA(self.config.theta).update(self.h, gx_f - jv)
        soba_move(self, gy, hv, gy_f, self.h)

    def restart(self) -> None:
        """Empties the moving average."""
        self.h = torch.zeros_like(self.x)

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        return soba_oracle_calls(self)

    def linear_system_variables(self) -> Tensor:
        return self.v.unsqueeze(0)
