"""AID-BiO, ITD-BiO and first-order ITD-BiO (Ji, Liu, Liang & Ying, "Will Bilevel Optimizers Benefit from
Loops", NeurIPS 2022; Ji, Yang & Liang, ICML 2021).

AID-BiO (approximate implicit differentiation), iteration k::

    y_k^0 = y_{k-1}^N (warm start) or y_0;   y_k^t = y_k^{t-1} - alpha grad_y g(x_k, y_k^{t-1}),   t = 1..N
    v_k   = Q steps of a linear solver for (grad_yy g(x_k, y_k^N)) v = grad_y f(x_k, y_k^N), started from
            v_{k-1} (warm start, when the solver has one)
    h_k   = grad_x f(x_k, y_k^N) - grad_xy g(x_k, y_k^N) v_k
    x_{k+1} = x_k - beta h_k

Linear solvers (`linsys_solver`, all from `mbbo.linsolve`; Q = `linsys_steps`, eta = `linsys_lr`):
    "sgd"          v <- v - eta (H_j v - grad_y f), one fresh lower batch per step: the paper's Q-loop
                   (gradient descent on 1/2 v^T H v - v^T grad_y f), warm-started                 (Q HVPs)
    "neumann"      eta sum_{q=0}^{Q} prod_{j<=q} (I - eta H_j) grad_y f, fresh batches, no warm start  (Q HVPs)
    "cg"           conjugate gradient on one lower batch, at most Q iterations, warm-started  (<= Q (+1) HVPs)
    "fixed_point"  v <- v - eta (H v - grad_y f) on one lower batch (AID-FP), warm-started          (Q HVPs)
The loop regimes of the paper are choices of N and Q: N-Q-loop (both large), N-loop (Q = O(1)), Q-loop
(N = O(1)), no-loop (N = Q = 1). The cross product uses a fresh lower batch; grad_x f and grad_y f share one
upper batch.

ITD-BiO (iterative differentiation): the N lower steps are unrolled from y_k^0 (a constant: the warm start is
not differentiated) and h_k = d/dx f(x_k, y_k^N(x_k)) by reverse mode through them (`torch.func`, see
`mbbo.inner_solvers.unrolled_hypergradient`); cost N gradients, N HVPs and N cross products, memory O(N).
Without loops (N = O(1)) ITD's hypergradient keeps a non-vanishing bias (paper), so N must grow with the
accuracy wanted.

FO-ITD-BiO (first-order ITD, the meta-learning code of Ji et al. 2021): the same lower steps without
create_graph, so y^N is a constant and h_k = grad_x f(x_k, y_k^N). It needs an upper loss that depends on x
(with f = f(y) its hypergradient is identically zero; `unsuitable_for` says so).

Defaults: no public code accompanies the loops paper; the defaults are the public benchmark's for its
double-loop solvers (benchopt/benchmark_bilevel stocBiO/AmIGO class defaults: step 0.1 for x, y and v,
N = Q = 10, constant steps) and its `jaxopt_ITD` solver (n_inner_steps = 10, warm start).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mbbo import inner_solvers
from mbbo.algorithms.base import Hyper
from mbbo.algorithms.pieces import fresh_hvps, implicit_oracle_calls, lower_loop, lower_start
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.algorithms.stocbio import ZooConfig
from mbbo.linsolve import ConjugateGradient, FixedPoint, LinearSolver, Neumann, SGDQuadratic
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.state import UNSET
from mbbo.validation import check_choice, check_flag, check_int, check_positive

LINSYS_SOLVERS = ("sgd", "neumann", "cg", "fixed_point")


@dataclass
class AIDBiOConfig(ZooConfig):
    """lower_steps = N, linsys_steps = Q, linsys_lr = eta (unused by "cg"), warm_start_v: start the solver from
    the previous v (ignored by "neumann", which has no warm start)."""

    linsys_solver: str = "sgd"
    linsys_steps: int = 10
    linsys_lr: float = 0.1
    warm_start_v: bool = True

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_choice("linsys_solver", self.linsys_solver, LINSYS_SOLVERS)
        check_int("linsys_steps", self.linsys_steps, 1)
        check_positive("linsys_lr", self.linsys_lr)
        check_flag("warm_start_v", self.warm_start_v)

    def solver(self) -> LinearSolver:
        if self.linsys_solver == "sgd":
            return SGDQuadratic(self.linsys_steps, self.linsys_lr)
        if self.linsys_solver == "neumann":
            return Neumann(self.linsys_steps, self.linsys_lr)
        if self.linsys_solver == "cg":
            return ConjugateGradient(self.linsys_steps)
        return FixedPoint(self.linsys_steps, self.linsys_lr)


class AIDBiO(SingleBlockAlgorithm):
    """AID-BiO with a choice of linear solver; N-Q-loop / N-loop / Q-loop / no-loop by the choice of N, Q."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        v: Tensor = UNSET  # the linear-system solution (warm start of the next solve)

    name = "aid_bio"
    Config = AIDBiOConfig
    v: Tensor

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)

    def step(self) -> None:
        cfg, x, k = self.config, self.x, self.iteration
        self.y = lower_loop(self, x, lower_start(self), cfg.lower_steps, cfg.lower_lr_at(k))
        gx_f, gy_f = self.upper_grads(x, self.y, self.upper_batch())
        solver = cfg.solver()
        if cfg.linsys_solver in ("sgd", "neumann"):
            hvps: Any = fresh_hvps(self, x, self.y)  # a fresh batch per step / term
        else:
            hvps = self.hvp_operator(x, self.y, self.lower_batch(stream="extra"))  # one fixed matrix
        v0 = self.v if cfg.warm_start_v and solver.supports_warm_start else None
        self.v = solver.solve(hvps, gy_f, v0=v0).v
        self.advance(x - cfg.lr_at(k) * (gx_f - self.cross(x, self.y, self.v, self.lower_batch())))

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: v stays the warm start of the next solve."""


class ITDBiO(SingleBlockAlgorithm):
    """ITD-BiO: reverse-mode differentiation through N unrolled lower SGD steps from a constant warm start."""

    name = "itd_bio"
    Config = ZooConfig

    def step(self) -> None:
        cfg, k = self.config, self.iteration
        lower = [self.lower_batch() for _ in range(cfg.lower_steps)]
        h, self.y = self.unrolled_hypergradient(self.x, lower_start(self), lower, self.upper_batch())
        self.advance(self.x - cfg.lr_at(k) * h)

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: no estimator to reset."""

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        n = self.config.lower_steps
        return implicit_oracle_calls(self, grad_y_g=n, hvp=n, cross=n, grad_y_f=1)

    def unrolled_hypergradient(self, x: Tensor, y0: Tensor, lower_batches: list[Batch], upper_batch: Batch,
                               lr: float | None = None) -> tuple[Tensor, Tensor]:
        """(d/dx f(x, y^N(x); upper_batch), y^N) with y^{t+1} = y^t - lr grad_y g(x, y^t; lower_batches[t]),
        N = len(lower_batches), y^0 = y0 constant; lr defaults to the current lower step size.

        Counted as N grad_y g, N HVPs and N cross products (the reverse pass) and one upper gradient."""
        n = len(lower_batches)
        h, y_last = inner_solvers.unrolled_hypergradient(
            partial(_lower_on, self, lower_batches), partial(_upper_on, self, upper_batch), x, y0, n,
            self.config.lower_lr_at(self.iteration) if lr is None else lr)
        counts = self.oracles.counts
        counts["grad_y_g"] += n
        counts["hvp"] += n
        counts["cross"] += n
        counts["grad_y_f"] += 1
        if self.problem.upper_depends_on_x:
            counts["grad_x_f"] += 1
        return h, y_last


def _lower_on(alg: ITDBiO, batches: list[Batch], x: Tensor, y: Tensor, t: int) -> Tensor:
    return alg.lower_value(x, y, batches[t])


def _upper_on(alg: ITDBiO, batch: Batch, x: Tensor, y: Tensor) -> Tensor:
    return alg.upper_value(x, y, batch)


class FOITDBiO(SingleBlockAlgorithm):
    """First-order ITD-BiO: N lower SGD steps (no graph), then h = grad_x f(x, y^N)."""

    name = "fo_itd_bio"
    Config = ZooConfig

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        reason = super().unsuitable_for(problem)
        if reason is None and not problem.upper_depends_on_x:
            return ("the upper loss does not depend on x, so the first-order hypergradient grad_x f is identically "
                    "zero; use itd_bio or an implicit method (aid_bio, stocbio)")
        return reason

    def step(self) -> None:
        cfg, x, k = self.config, self.x, self.iteration
        self.y = lower_loop(self, x, lower_start(self), cfg.lower_steps, cfg.lower_lr_at(k))
        gx_f, _ = self.upper_grads(x, self.y, self.upper_batch())
        self.advance(x - cfg.lr_at(k) * gx_f)

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: no estimator to reset."""
