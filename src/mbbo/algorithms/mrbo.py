"""MRBO and VRBO (Yang, Ji & Liang, NeurIPS 2021, "Provably faster algorithms for bilevel optimization") and
SUSTAIN (Khanduri, Zeng, Hong, Wai, Wang & Yang, NeurIPS 2021, "A near-optimal algorithm for stochastic bilevel
optimization via double-momentum"): recursive-momentum estimates of grad_y g and of the hypergradient, with a
Neumann-series solve of the linear system. Sign convention: v solves (grad_yy g) v = grad_y f and

    h(x, y; B, B', B_1..B_Q) = grad_x f(x, y; B') - (grad_xy g(x, y; B)) v,
    v = Neumann(grad_y f(x, y; B'); HVPs on fresh batches B_1..B_Q)

(`mbbo.linsolve.Neumann`: eta sum_{q=0}^{Q} prod (I - eta H_{B_j}) for MRBO / VRBO, benchopt's ``shia``; the
randomly truncated Q eta prod_{j<=q} (I - eta H_{B_j}), q ~ U{0..Q-1}, for SUSTAIN, benchopt's ``hia``). At two
points (x_t, y_t) and (x_{t-1}, y_{t-1}) the same batches B, B', B_j (and the same q) serve both points, in
one two-point call per oracle (benchopt's ``joint_shia`` / ``joint_hia``). The cross term uses the lower batch B
of the y-gradient, as in benchopt.

MRBO / SUSTAIN (STORM, Cutkosky & Orabona 2019, on both levels; `mbbo.trackers.STORM`)::

    d_y <- grad_y g(x_t, y_t; B) + (1 - eta_t) (d_y - grad_y g(x_{t-1}, y_{t-1}; B))
    d_x <- h(x_t, y_t)           + (1 - eta_t) (d_x - h(x_{t-1}, y_{t-1}))
    y <- y - rho_t d_y,   x <- x - gamma_t d_x

with benchopt's schedules rho_t = lower_lr / (t+1)^{1/3}, gamma_t = lr / (t+1)^{1/3}, eta_t = eta / (t+1)^{2/3}
and a constant Neumann step. The first iteration uses the plain estimates (d = the first sample, as in the
authors' MRBO code); benchopt instead takes (0, 0) as the "previous" point at t = 0, which is not reproduced.

VRBO (SPIDER / SARAH, `mbbo.variance_reduction.SARAH`, double loop). One `step()` is one outer iteration k::

    k mod period == 0:  d_y = grad_y g(x_k, y_k; all rows),  d_x = h(x_k, y_k; all rows, full-batch Neumann)
    x_{k+1} = x_k - gamma d_x
    for t = 0..lower_steps-1:                             (same batches at the current and the previous point)
        d_y <- d_y + grad_y g(x_{k+1}, y_t; B) - grad_y g(previous point; B)
        d_x <- d_x + h(x_{k+1}, y_t) - h(previous point)
        y_{t+1} = y_t - rho d_y

The previous point of the first inner step is (x_k, y) -- the recursion follows the change of x, as in the
authors' code (``hparams_old``); benchopt's ``sgd_inner_vrbo`` evaluates both points at x_{k+1} and so never
corrects the x step, which is not reproduced. Constant steps; period = int((n_in + n_out) period_frac / b) or
``period``; ``refresh_batch_size`` replaces the full pass by one large mini-batch (the paper's S_1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.pieces import two_points
from mbbo.algorithms.saba import FullPassRefresh, validate_refresh
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.linsolve import HVPFactory, Neumann
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.state import UNSET
from mbbo.steps import scheduled
from mbbo.trackers import STORM
from mbbo.validation import check_int, check_nonnegative, check_optional, check_positive, check_unit


@dataclass
class MRBOConfig(Hyper):
    """Defaults: benchopt MRBO's best parameters on quadratics_021424 (step_size 0.1, outer_ratio 0.1, i.e.
    lower_lr = neumann_lr = 0.1 and lr = 1.0) with its class defaults eta = 0.5, n_shia_steps = 10 and
    exponents (1/3 steps, 2/3 momentum)."""

    min_terms: ClassVar[int] = 0  # smallest neumann_terms (the random truncation needs 1)

    lr: float = 1.0
    lower_lr: float = 0.1
    neumann_lr: float = 0.1
    neumann_terms: int = 10
    eta: float = 0.5
    lr_exponent: float = 1.0 / 3.0
    lower_lr_exponent: float = 1.0 / 3.0
    eta_exponent: float = 2.0 / 3.0
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_positive("lower_lr", self.lower_lr)
        check_positive("neumann_lr", self.neumann_lr)
        check_int("neumann_terms", self.neumann_terms, self.min_terms)
        check_unit("eta", self.eta)
        check_nonnegative("lr_exponent", self.lr_exponent)
        check_nonnegative("lower_lr_exponent", self.lower_lr_exponent)
        check_nonnegative("eta_exponent", self.eta_exponent)
        check_optional(check_int, "batch_size", self.batch_size, 1)


def shared_sample_hypergradients(alg: SingleBlockAlgorithm, xs: Tensor, ys: Tensor, lower: Batch, upper: Batch,
                                 solver: Neumann) -> tuple[Tensor, Tensor]:
    """(grad_y g, h) at stacked points (P, d): one batch B for grad_y g and the cross term, B' for grad f, fresh
    batches (stream "extra") for the Neumann terms (and one truncation level), all shared by the P points."""
    bs = alg.config.batch_size
    gx_f, gy_f = alg.upper_grads(xs, ys, upper)
    source = HVPFactory(lambda j: partial(alg.hvp, xs, ys, batch=alg.lower_batch(bs, stream="extra")))
    w = solver.solve(source, gy_f, generator=alg.generators["extra"]).v
    return alg.grad_y_g(xs, ys, lower), gx_f - alg.cross(xs, ys, w, lower)


def neumann_solver(cfg: MRBOConfig | VRBOConfig, random_truncation: bool = False) -> Neumann:
    """The config's Neumann series (`neumann_terms`, `neumann_lr`)."""
    return Neumann(n_terms=cfg.neumann_terms, eta=cfg.neumann_lr, random_truncation=random_truncation)


def double_momentum_step(alg: MRBO | SUSTAIN, solver: Neumann) -> None:
    """One MRBO / SUSTAIN iteration (module docstring): STORM on grad_y g and on the hypergradient, both points
    on the same samples, then the y and x steps."""
    cfg, t = alg.config, alg.iteration
    lower, upper = alg.lower_batch(cfg.batch_size), alg.upper_batch(cfg.batch_size)
    xs, ys = two_points(alg.x, alg.x_prev, alg.fresh), two_points(alg.y, alg.y_prev, alg.fresh)
    gy, h = shared_sample_hypergradients(alg, xs, ys, lower, upper, solver)
    if alg.fresh:
        alg.d_y, alg.d_x = gy[0], h[0]
    else:
        storm = STORM(scheduled(cfg.eta, cfg.eta_exponent, t))
        alg.d_y = storm.update(alg.d_y, gy[0], gy[1])
        alg.d_x = storm.update(alg.d_x, h[0], h[1])
    alg.fresh = False
    alg.y_prev = alg.y
    alg.y = alg.y - scheduled(cfg.lower_lr, cfg.lower_lr_exponent, t) * alg.d_y
    alg.advance(alg.x - scheduled(cfg.lr, cfg.lr_exponent, t) * alg.d_x)


def start_double_momentum(alg: MRBO | SUSTAIN) -> None:
    """y_prev <- y, zero estimates; the first iteration starts them at its own samples."""
    alg.y_prev = alg.y.clone()
    alg.d_y = torch.zeros_like(alg.y)
    alg.d_x = torch.zeros_like(alg.x)
    alg.fresh = True


class MRBO(SingleBlockAlgorithm):
    """MRBO: STORM momentum on grad_y g and on the Neumann hypergradient (see module doc). Per iteration, at two
    points: 1 grad_y g, 1 grad f, Q HVPs, 1 cross product."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        y_prev: Tensor = UNSET  # y of the previous iteration (STORM's second point)
        d_y: Tensor = UNSET  # STORM estimates of grad_y g and of the hypergradient
        d_x: Tensor = UNSET
        fresh: bool = True  # no previous point yet: the estimates start at the first samples

    name = "mrbo"
    Config = MRBOConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_double_momentum(self)

    def step(self) -> None:
        double_momentum_step(self, neumann_solver(self.config))

    def restart(self) -> None:
        """The next iteration starts the momentum afresh from its own estimates."""
        self.fresh = True

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        upper_x = int(self.problem.upper_depends_on_x)
        return {"grad_y_g": 2, "hvp": 2 * self.config.neumann_terms, "cross": 2, "grad_y_f": 2, "grad_x_f": 2 * upper_x}


@dataclass
class SUSTAINConfig(MRBOConfig):
    """Defaults: benchopt SUSTAIN's class defaults (step_size 0.1, outer_ratio 1, n_hia_steps 10, eta 0.5, MRBO's
    exponents); benchopt lists no best parameters for the quadratic."""

    min_terms: ClassVar[int] = 1

    lr: float = 0.1


class SUSTAIN(SingleBlockAlgorithm):
    """SUSTAIN: MRBO's double momentum with the randomly truncated Neumann estimator (one truncation level q
    and the same q batches for both points). Its HVP count per iteration is the random truncation level."""

    State = MRBO.State
    name = "sustain"
    Config = SUSTAINConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_double_momentum(self)

    def step(self) -> None:
        double_momentum_step(self, neumann_solver(self.config, random_truncation=True))

    def restart(self) -> None:
        """The next iteration starts the momentum afresh from its own estimates."""
        self.fresh = True


@dataclass
class VRBOConfig(Hyper):
    """Defaults: benchopt VRBO's best parameters on quadratics_021424 (step_size 0.1, outer_ratio 1,
    period_frac 0.01) with its class defaults n_shia_steps = 10, n_inner_steps = 10; constant steps."""

    lr: float = 0.1
    lower_lr: float = 0.1
    neumann_lr: float = 0.1
    neumann_terms: int = 10
    lower_steps: int = 10
    period: int | None = None
    period_frac: float = 0.01
    refresh_batch_size: int | None = None
    full_batch_chunk: int | None = None
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_positive("lower_lr", self.lower_lr)
        check_positive("neumann_lr", self.neumann_lr)
        check_int("neumann_terms", self.neumann_terms, 0)
        check_int("lower_steps", self.lower_steps, 1)
        check_optional(check_int, "batch_size", self.batch_size, 1)
        validate_refresh(self, problem)


class VRBO(SingleBlockAlgorithm):
    """VRBO: SPIDER estimates of grad_y g and of the hypergradient, refreshed by full passes every `period`
    outer iterations; one `step()` = one x step followed by `lower_steps` y steps (see module doc)."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        d_y: Tensor = UNSET  # SARAH estimates of grad_y g and of the hypergradient
        d_x: Tensor = UNSET
        y_prev: Tensor = UNSET
        since_refresh: int = 0  # iterations since the last full refresh

    name = "vrbo"
    Config = VRBOConfig
    #: whether the algorithm needs samplers over stored rows (static fit checks)
    needs_finite_sum: ClassVar[str | None] = "by default"

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.refresh = FullPassRefresh(problem)
        self.d_y = torch.zeros_like(self.y)
        self.d_x = torch.zeros_like(self.x)
        self.y_prev = self.y.clone()
        self.since_refresh = 0

    def full_estimates(self) -> tuple[Tensor, Tensor]:
        """(grad_y g, h) at (x, y) on the refresh data: full passes (or one large batch per level), with a
        Neumann series on the full-data Hessian."""
        lower, upper = self.refresh.evaluators(self)
        x, y = self.x, self.y
        gx_f, gy_f = upper(lambda b: self.upper_grads(x, y, b))
        w = neumann_solver(self.config).solve(lambda v: lower(lambda b: self.hvp(x, y, v, b)), gy_f).v
        return lower(lambda b: self.grad_y_g(x, y, b)), gx_f - lower(lambda b: self.cross(x, y, w, b))

    def step(self) -> None:
        cfg = self.config
        sarah, solver = self.refresh.sarah(self), neumann_solver(cfg)
        if sarah.refresh_due(self.since_refresh):
            self.d_y, self.d_x = self.full_estimates()
            self.x_prev, self.y_prev = self.x, self.y
        self.x = self.x - cfg.lr * self.d_x
        for _ in range(cfg.lower_steps):
            xs, ys = torch.stack([self.x, self.x_prev]), torch.stack([self.y, self.y_prev])
            gy, h = shared_sample_hypergradients(self, xs, ys, self.lower_batch(cfg.batch_size),
                                                 self.upper_batch(cfg.batch_size), solver)
            self.d_y = sarah.update(self.d_y, gy[0], gy[1])
            self.d_x = sarah.update(self.d_x, h[0], h[1])
            self.x_prev, self.y_prev = self.x, self.y
            self.y = self.y - cfg.lower_lr * self.d_y
        self.since_refresh += 1
        self.iteration += 1

    def restart(self) -> None:
        """The next iteration refreshes the estimates."""
        self.since_refresh = 0
