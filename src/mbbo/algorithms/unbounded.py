"""Bilevel methods for upper levels with unbounded smoothness, from M. Liu's group (George Mason University):
BO-REP (Hao, Gong, Liu, ICLR 2024), SLIP (Gong, Hao, Liu, ICML 2024), AccBO (Gong, Hao, Liu, NeurIPS 2024),
AdamBO and VR-AdamBO (Gong, Hao, Liu 2025, arXiv 2503.03908) and Ada-BiO (Gong, Hao, Liu, NeurIPS 2025,
arXiv 2509.15399).

Common structure: the upper step is normalised, ``x <- x - eta m / ||m||`` (global norm; or Adam), on a momentum
m of a stochastic hypergradient ``grad_x F - (grad_xy G) v`` with v ~ (grad_yy G)^{-1} grad_y F (sign convention of
the library). v is either a tracked linear-system variable z (BO-REP, SLIP: one SGD step on
1/2 z^T H z - z^T grad_y F per iteration, optionally projected on a ball) or a Neumann series on fresh HVP
mini-batches (AccBO, AdamBO, VR-AdamBO, Ada-BiO), with the paper's scaling (`mbbo.linsolve.Neumann`), not the
reference codes' sums without the eta factor.

Not copied from the authors' code (algorithms.md 4): AccBO's STORM difference is evaluated on the *same* sample
(mini-batches and Neumann truncation level) at (x_t, yhat_t) and (x_{t-1}, yhat_{t-1}), in one stacked call, not
against the previous iteration's hypergradient; AccBO's lower level really extrapolates and averages; Neumann
series are not truncated to one random term after computing all Q. The reference repositories' lower losses
use a ridge written as a norm (not strongly convex); that is the task's concern, not the algorithms'.

Reusable pieces: :class:`mbbo.inner_solvers.LowerSGD` and :func:`epoch_sgd` (lower-level solvers on g(x, .)),
:meth:`SingleBlockAlgorithm.neumann_hypergradient` (Neumann hypergradient at one or several stacked points with shared
samples), and the functions below that two methods share (BO-REP / SLIP: `linsys_momentum_step`; AccBO / VR-AdamBO:
`accelerated_lower_and_hypergradients`): each class derives directly from `SingleBlockAlgorithm`. The step rules'
states (`mbbo.steps`) are fields of each algorithm's `State`, saved generically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.pieces import two_points
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.inner_solvers import LowerSGD
from mbbo.linsolve import Neumann
from mbbo.problem import MultiBlockProblem
from mbbo.projections import project_ball
from mbbo.state import UNSET
from mbbo.steps import SGD, Adam, AdamState, Clipped, CountState, NesterovAveraged, NesterovState, Normalized
from mbbo.trackers import EMA, STORM
from mbbo.validation import check_choice, check_flag, check_int, check_optional, check_positive, check_real, check_unit

# ----------------------------------------------------------------------------------------------------------
# validation helpers


# ----------------------------------------------------------------------------------------------------------
# reusable pieces


def epoch_sgd(grad: Callable[[Tensor], Tensor], y: Tensor, epochs: int, steps: int, lr: float,
              radius: float | None = None) -> Tensor:
    """Epoch-SGD (Hazan & Kale 2014), BO-REP's initialisation refinement for a strongly convex lower level.

    Epoch k = 0..epochs-1 starts at w_k, runs steps * 2^k SGD steps of size lr / 2^k, each projected onto the
    ball of radius radius / 2^(k/2) around w_k (when radius is given), and w_{k+1} is the average of its iterates.
    """
    start = y
    for k in range(epochs):
        w, total, n = start, torch.zeros_like(start), steps * 2**k
        for _ in range(n):
            w = w - (lr / 2**k) * grad(w)
            if radius is not None:
                w = start + project_ball(w - start, radius / 2 ** (k / 2))
            total = total + w
        start = total / n
    return start


# ----------------------------------------------------------------------------------------------------------
# BO-REP and SLIP: normalised momentum on a tracked linear-system variable


@dataclass
class BOREPConfig(Hyper):
    """BO-REP; defaults: hyper-representation on ARD in the authors' code (MingruiLiu-ML-Lab/
    Bilevel-Optimization-under-Unbounded-Smoothness): eta 1e-2, inner lr 1e-3, beta 0.9, nu 1e-2, I = 2, N = 3."""

    lr: float = 1e-2
    beta: float = 0.9
    linsys_lr: float = 1e-2
    lower_lr: float = 1e-3
    interval: int = 2
    lower_steps: int = 3
    refine_steps: int = 3
    refine_epochs: int = 0  # 0: plain SGD warm start of refine_steps (code); >= 1: epoch-SGD (paper)
    refine_lr: float | None = None  # None: lower_lr
    refine_radius: float | None = None
    z_radius: float | None = None  # paper: R = l_{f,0} / mu; the code does not project
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_real("beta", self.beta, 0.0, 1.0, high_open=True)
        check_positive("linsys_lr", self.linsys_lr)
        check_positive("lower_lr", self.lower_lr)
        check_int("interval", self.interval, 1)
        check_int("lower_steps", self.lower_steps, 0)
        check_int("refine_steps", self.refine_steps, 0)
        check_int("refine_epochs", self.refine_epochs, 0)
        if self.refine_epochs > 0 and self.refine_steps < 1:
            raise ValueError(f"refine_steps must be >= 1 when refine_epochs > 0, got {self.refine_steps!r}")
        check_optional(check_positive, "refine_lr", self.refine_lr)
        check_optional(check_positive, "refine_radius", self.refine_radius)
        check_optional(check_positive, "z_radius", self.z_radius)
        check_optional(check_int, "batch_size", self.batch_size, 1)


def start_normalized_momentum(alg: BOREP | SLIP) -> None:
    """m <- 0 and a fresh upper step-rule state (at the start and at a restart)."""
    alg.m = torch.zeros_like(alg.x)
    alg.rule_state = CountState(0)


def linsys_momentum_step(alg: BOREP | SLIP, gx_f: Tensor, gy_f: Tensor, hz: Tensor, jz: Tensor,
                         rule: Normalized | Clipped | SGD) -> None:
    """z <- Pi_{||z|| <= z_radius}(z - nu (H z - grad_y F)), m <- beta m + (1 - beta)(grad_x F - J z), x <- x +
    rule(m); ends the iteration (BO-REP and SLIP)."""
    cfg = alg.config
    z = alg.z - cfg.linsys_lr * (hz - gy_f)
    alg.z = z if cfg.z_radius is None else project_ball(z, cfg.z_radius)
    alg.m = EMA(1.0 - cfg.beta).update(alg.m, gx_f - jz)
    update, alg.rule_state = rule.update(alg.m, alg.rule_state)
    alg.advance(alg.x + update)


class BOREP(SingleBlockAlgorithm):
    """BO-REP (Hao, Gong, Liu, "Bilevel optimization under unbounded smoothness: a new algorithm and convergence
    analysis", ICLR 2024)::

        initialisation refinement: y_0 <- SGD warm start or epoch-SGD on g(x_0, .)
        for t:  if t mod I == 0:  y <- N SGD steps on g(x_t, .) from y            (periodic lower update)
                z_{t+1} = Pi_{||z|| <= R}( z_t - nu (H(x_t, y_t; zeta) z_t - grad_y F(x_t, y_t; xi)) )
                m_{t+1} = beta m_t + (1 - beta) (grad_x F(x_t, y_t; xi) - J(x_t, y_t; zeta) z_t)
                x_{t+1} = x_t - eta m_{t+1} / ||m_{t+1}||

    One HVP and one cross product per iteration (same lower batch), m_0 = 0, z_0 = 0.
    """

    @dataclass
    class State(SingleBlockAlgorithm.State):
        z: Tensor = UNSET  # the tracked linear-system variable
        m: Tensor = UNSET  # momentum of the hypergradient
        rule_state: CountState = UNSET  # the upper step rule's state

    name = "bo_rep"
    Config = BOREPConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.z = torch.zeros_like(self.y)
        start_normalized_momentum(self)

    def refine(self) -> None:
        """Initialisation refinement at x_0 (first iteration)."""
        cfg = self.config
        lr = cfg.lower_lr if cfg.refine_lr is None else cfg.refine_lr
        grad = self.lower_grad_fn(self.x)
        if cfg.refine_epochs == 0:
            self.y = LowerSGD(cfg.refine_steps, lr).run(grad, self.y)
        else:
            self.y = epoch_sgd(grad, self.y, cfg.refine_epochs, cfg.refine_steps, lr, cfg.refine_radius)

    def step(self) -> None:
        cfg, bs = self.config, self.config.batch_size
        if self.iteration == 0:
            self.refine()
        if self.iteration % cfg.interval == 0:  # the periodic lower update
            self.y = LowerSGD(cfg.lower_steps, cfg.lower_lr).run(self.lower_grad_fn(self.x), self.y)
        gx_f, gy_f = self.upper_grads(self.x, self.y, self.upper_batch(bs))
        lower = self.lower_batch(bs)
        hz, jz = self.hvp(self.x, self.y, self.z, lower), self.cross(self.x, self.y, self.z, lower)
        linsys_momentum_step(self, gx_f, gy_f, hz, jz, Normalized(cfg.lr))

    def restart(self) -> None:
        """Re-initialises the momentum (for `Restarted`); y, z and x are carried over."""
        start_normalized_momentum(self)


STEP_RULES = ("normalized", "clipped", "sgd")


@dataclass
class SLIPConfig(Hyper):
    """SLIP; defaults: the README of MingruiLiu-ML-Lab/Single-Loop-bilevel-Optimizer-under-Unbounded-Smoothness
    (data cleaning on Sentiment140): eta 5e-2, beta 0.9, nu 1e-2, T0 = 3, inner lr 5e-2.

    `step_rule`: "normalized" (paper), "clipped" (the code's grad_clip option: step min(lr, clip / ||m||) m) or
    "sgd" (x <- x - lr m: MA-SOBA of Chen, Xu, Zhang 2023, together with warm_start_steps=0)."""

    lr: float = 5e-2
    beta: float = 0.9
    linsys_lr: float = 1e-2
    lower_lr: float = 5e-2
    warm_start_steps: int = 3
    z_radius: float | None = None
    step_rule: str = "normalized"
    clip: float = 1.0
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_real("beta", self.beta, 0.0, 1.0, high_open=True)
        check_positive("linsys_lr", self.linsys_lr)
        check_positive("lower_lr", self.lower_lr)
        check_int("warm_start_steps", self.warm_start_steps, 0)
        check_optional(check_positive, "z_radius", self.z_radius)
        check_choice("step_rule", self.step_rule, STEP_RULES)
        check_positive("clip", self.clip)
        check_optional(check_int, "batch_size", self.batch_size, 1)


class SLIP(SingleBlockAlgorithm):
    """SLIP (Gong, Hao, Liu, "A nearly optimal single loop algorithm for stochastic bilevel optimization under
    unbounded smoothness", ICML 2024): BO-REP with the lower level updated every iteration, simultaneously::

        warm start: y_0 <- T0 SGD steps on g(x_0, .)
        for t:  y_{t+1} = y_t - gamma grad_y G(x_t, y_t; pi)
                z_{t+1} = Pi(z_t - nu (H_t z_t - grad_y F(x_t, y_t; xi)))
                m_{t+1} = beta m_t + (1 - beta)(grad_x F(x_t, y_t; xi) - J_t z_t)
                x_{t+1} = x_t - eta m_{t+1} / ||m_{t+1}||

    grad_y G, H_t z_t and J_t z_t come from one graph on one lower mini-batch (`lower_products`).
    """

    State = BOREP.State
    name = "slip"
    Config = SLIPConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.z = torch.zeros_like(self.y)
        start_normalized_momentum(self)

    def upper_rule(self) -> Normalized | Clipped | SGD:
        cfg = self.config
        if cfg.step_rule == "clipped":
            return Clipped(cfg.lr, cfg.clip)
        return SGD(cfg.lr) if cfg.step_rule == "sgd" else Normalized(cfg.lr)

    def step(self) -> None:
        cfg = self.config
        if self.iteration == 0:  # the warm start
            self.y = LowerSGD(cfg.warm_start_steps, cfg.lower_lr).run(self.lower_grad_fn(self.x), self.y)
        gx_f, gy_f = self.upper_grads(self.x, self.y, self.upper_batch(cfg.batch_size))
        gy_g, hz, jz = self.lower_products(self.x, self.y, self.z, self.lower_batch(cfg.batch_size))
        self.y = self.y - cfg.lower_lr * gy_g
        linsys_momentum_step(self, gx_f, gy_f, hz, jz, self.upper_rule())

    def restart(self) -> None:
        """Re-initialises the momentum (for `Restarted`); y, z and x are carried over."""
        start_normalized_momentum(self)


# ----------------------------------------------------------------------------------------------------------
# AccBO and VR-AdamBO: Nesterov lower level with averaging, randomised Neumann, STORM on two points


@dataclass
class AccBOConfig(Hyper):
    """AccBO; defaults: data hyper-cleaning on SNLI in the authors' code (MingruiLiu-ML-Lab/
    Accelerated-Bilevel-Optimization-Unbounded-Smoothness): eta 0.1, alpha 0.1, beta 0.9, gamma (Nesterov) 0.1,
    tau 0.5, update_interval 2, 3 inner steps, Q = 3, eta_N = 1e-2.

    `neumann_unbiased=True` uses Q eta_N prod_{j<=q}(I - eta_N H_j) grad_y F (Ghadimi & Wang, the paper's
    estimator); False drops the factor Q as the code does."""

    lr: float = 0.1
    beta: float = 0.9
    lower_lr: float = 0.1
    nesterov_momentum: float = 0.1
    averaging: float = 0.5
    interval: int = 2
    lower_steps: int = 3
    warm_start_steps: int = 0
    neumann_terms: int = 3
    neumann_lr: float = 1e-2
    neumann_unbiased: bool = True
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_real("beta", self.beta, 0.0, 1.0, high_open=True)
        check_positive("lower_lr", self.lower_lr)
        check_real("nesterov_momentum", self.nesterov_momentum, 0.0, 1.0)
        check_unit("averaging", self.averaging)
        check_int("interval", self.interval, 1)
        check_int("lower_steps", self.lower_steps, 0)
        check_int("warm_start_steps", self.warm_start_steps, 0)
        check_int("neumann_terms", self.neumann_terms, 1)
        check_positive("neumann_lr", self.neumann_lr)
        check_flag("neumann_unbiased", self.neumann_unbiased)
        check_optional(check_int, "batch_size", self.batch_size, 1)

    def lower_rule(self) -> NesterovAveraged:
        """The lower level's Nesterov steps with averaging."""
        return NesterovAveraged(self.lower_lr, self.nesterov_momentum, self.averaging)

    def neumann(self) -> Neumann:
        """The randomly truncated Neumann series of the hypergradient."""
        return Neumann(self.neumann_terms, self.neumann_lr, random_truncation=True, scale_by_q=self.neumann_unbiased)


def start_accelerated(alg: AccBO | VRAdamBO, rule_state: Any) -> None:
    """The lower rule's state at y, y_hat_prev <- y, m <- 0, the upper rule's initial state."""
    alg.lower_state = alg.config.lower_rule().init(alg.y)
    alg.y_hat_prev = alg.y.clone()
    alg.m = torch.zeros_like(alg.x)
    alg.rule_state = rule_state


def nesterov_lower_update(alg: AccBO | VRAdamBO, n_steps: int) -> None:
    """n_steps of the config's `lower_rule` on g(x, .) (fresh mini-batches), moving y and the averaged y_hat."""
    rule, grad = alg.config.lower_rule(), alg.lower_grad_fn(alg.x)
    for _ in range(n_steps):
        g = grad(rule.extrapolate(alg.y, alg.lower_state))
        alg.y, alg.lower_state = rule.update(g, alg.lower_state, alg.y)


def two_point_hypergradients(alg: AccBO | VRAdamBO) -> Tensor:
    """h(x_t, yhat_{t+1}; xi_t) and, after the first iteration, h(x_{t-1}, yhat_t; xi_t), on the same sample:
    (P, d_x)."""
    xs, ys = two_points(alg.x, alg.x_prev, alg.fresh), two_points(alg.y_hat, alg.y_hat_prev, alg.fresh)
    return alg.neumann_hypergradient(xs, ys, alg.config.neumann())


def accelerated_lower_and_hypergradients(alg: AccBO | VRAdamBO) -> tuple[Tensor, Tensor]:
    """The lower level of AccBO / VR-AdamBO (warm start at the first iteration, `lower_steps` Nesterov steps every
    `interval` iterations), then the two-point hypergradients: (h, y_hat at which h was evaluated)."""
    cfg = alg.config
    if alg.iteration == 0 and cfg.warm_start_steps:
        nesterov_lower_update(alg, cfg.warm_start_steps)
    if alg.iteration % cfg.interval == 0:
        nesterov_lower_update(alg, cfg.lower_steps)
    return two_point_hypergradients(alg), alg.y_hat


def end_accelerated_step(alg: AccBO | VRAdamBO, x_new: Tensor, y_hat: Tensor) -> None:
    """x <- x_new, the averaged iterate becomes the previous point; ends the iteration."""
    alg.advance(x_new)
    alg.y_hat_prev = y_hat
    alg.fresh = False


class AccBO(SingleBlockAlgorithm):
    """AccBO (Gong, Hao, Liu, "An accelerated algorithm for stochastic bilevel optimization under unbounded
    smoothness", NeurIPS 2024)::

        every I iterations, k steps of Nesterov with averaging (`mbbo.steps.NesterovAveraged`):
            y~ = y_t + gamma (y_t - y_{t-1});  y_{t+1} = y~ - alpha grad_y G(x_t, y~; pi);
            yhat_{t+1} = (1 - tau) yhat_t + tau y_{t+1}
        h(x, yhat; xi) = grad_x F - J v,  v = Q eta_N prod_{j=1}^{q} (I - eta_N H_j) grad_y F,
                         q ~ U{0..Q-1}  (`mbbo.linsolve.Neumann(random_truncation=True)`)
        m_t = beta m_{t-1} + (1 - beta) h(x_t, yhat_{t+1}; xi_t) + beta (h(x_t, yhat_{t+1}; xi_t)
                                                                     - h(x_{t-1}, yhat_t; xi_t))      (STORM)
        x_{t+1} = x_t - eta m_t / ||m_t||

    Both hypergradients of the STORM difference use the same sample xi_t (upper batch, cross batch, HVP batches
    and truncation level q), evaluated at the two stacked points in one call; m_0 = h at the first iteration.
    """

    @dataclass
    class State(SingleBlockAlgorithm.State):
        lower_state: NesterovState = UNSET  # the lower Nesterov rule's state
        y_hat_prev: Tensor = UNSET  # the averaged lower iterate of the previous iteration
        m: Tensor = UNSET  # STORM momentum
        rule_state: Any = UNSET  # the upper rule's state (CountState; AdamState for VR-AdamBO)
        fresh: bool = True  # no previous point yet: m starts at the first hypergradient

    name = "accbo"
    Config = AccBOConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_accelerated(self, CountState(0))

    @property
    def y_hat(self) -> Tensor:
        """The averaged lower sequence, at which the hypergradient is evaluated."""
        return self.lower_state.average

    def step(self) -> None:
        cfg = self.config
        h, y_hat = accelerated_lower_and_hypergradients(self)
        self.m = h[0] if self.fresh else STORM(1.0 - cfg.beta).update(self.m, h[0], h[-1])
        update, self.rule_state = Normalized(cfg.lr).update(self.m, self.rule_state)
        end_accelerated_step(self, self.x + update, y_hat)

    def restart(self) -> None:
        """Re-initialises the momentum from the next hypergradient (for `Restarted`)."""
        self.fresh = True
        self.rule_state = CountState(0)


@dataclass
class VRAdamBOConfig(AccBOConfig):
    """VR-AdamBO: AccBO's lower level, randomised Neumann and STORM, with Adam's second moment on the upper level.
    Adam defaults as AdamBO's code (lr 5e-3, betas (0.9, 0.999), eps 1e-8, coupled weight decay 0.01)."""

    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        betas = tuple(self.betas) if isinstance(self.betas, list) else self.betas  # lists from JSON configs
        Adam(self.lr, betas, self.eps, self.weight_decay)  # validates betas, eps, weight_decay


class VRAdamBO(SingleBlockAlgorithm):
    """VR-AdamBO (Gong, Hao, Liu 2025, arXiv 2503.03908), the variance-reduced AdamBO. [paper, partly
    unverified: no public code was found; a public review of the paper describes it as AccBO with an Adam-type
    upper update instead of normalised momentum, which is what is implemented]::

        g_t = h(x_t, yhat_{t+1}; xi_t) + wd x_t,   g~_{t-1} = h(x_{t-1}, yhat_t; xi_t) + wd x_{t-1}   (same sample)
        m_t = g_t + beta1 (m_{t-1} - g~_{t-1})                      (STORM first moment, m_0 = g_0)
        s_t = beta2 s_{t-1} + (1 - beta2) g_t^2
        x_{t+1} = x_t - lr m_t / (sqrt(s_t / (1 - beta2^{t+1})) + eps)

    AccBO's lower level and two-point hypergradients (`accelerated_lower_and_hypergradients`). The first moment
    needs no bias correction (it starts at g_0); the second moment is corrected as in Adam.
    """

    State = AccBO.State
    name = "vr_adambo"
    Config = VRAdamBOConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_accelerated(self, self.init_adam())

    def init_adam(self) -> AdamState:
        return AdamState(0, [torch.zeros_like(self.x)], [torch.zeros_like(self.x)])

    @property
    def y_hat(self) -> Tensor:
        """The averaged lower sequence, at which the hypergradient is evaluated."""
        return self.lower_state.average

    def step(self) -> None:
        cfg = self.config
        h, y_hat = accelerated_lower_and_hypergradients(self)
        beta1, beta2 = cfg.betas
        g_new = h[0] + cfg.weight_decay * self.x
        if self.fresh:
            m = g_new
        else:
            g_old = h[-1] + cfg.weight_decay * self.x_prev
            m = STORM(1.0 - beta1).update(self.m, g_new, g_old)
        t = self.rule_state.count + 1
        s = beta2 * self.rule_state.exp_avg_sq[0] + (1.0 - beta2) * g_new * g_new
        denom = (s / (1.0 - beta2**t)).sqrt() + cfg.eps
        self.m = m
        self.rule_state = AdamState(t, [m.clone()], [s])
        end_accelerated_step(self, self.x - cfg.lr * m / denom, y_hat)

    def restart(self) -> None:
        """Re-initialises the momentum from the next hypergradient and Adam's moments (for `Restarted`)."""
        self.fresh = True
        self.rule_state = self.init_adam()


# ----------------------------------------------------------------------------------------------------------
# AdamBO: Adam on a Neumann hypergradient


@dataclass
class AdamBOConfig(Hyper):
    """AdamBO; defaults: the authors' code (jhao6/d3x645, TREC meta-tasks): torch Adam lr 5e-3, betas
    (0.9, 0.999), eps 1e-8, coupled weight decay 0.01; lower SGD lr 1e-4 with a warm start of 3 steps, then 1
    step per iteration; Neumann Q = 3. neumann_lr = 1e-2 (AccBO's eta_N): the code hard-codes 1e-4 together
    with a Neumann sum that lacks its eta factor; with the paper's scaling 1e-4 would shrink v ~ 1e4-fold."""

    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    lower_lr: float = 1e-4
    warm_start_steps: int = 3
    lower_steps: int = 1
    neumann_terms: int = 3
    neumann_lr: float = 1e-2
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        Adam(self.lr, tuple(self.betas) if isinstance(self.betas, list) else self.betas, self.eps, self.weight_decay)
        check_positive("lower_lr", self.lower_lr)
        check_int("warm_start_steps", self.warm_start_steps, 0)
        check_int("lower_steps", self.lower_steps, 0)
        check_int("neumann_terms", self.neumann_terms, 0)
        check_positive("neumann_lr", self.neumann_lr)
        check_optional(check_int, "batch_size", self.batch_size, 1)


class AdamBO(SingleBlockAlgorithm):
    """AdamBO (Gong, Hao, Liu 2025, "On the convergence of Adam-type algorithms for bilevel optimization under
    unbounded smoothness", arXiv 2503.03908), single loop::

        (first iteration: warm start, warm_start_steps SGD steps on g(x_0, .))
        h_t = grad_x F(x_t, y_t; xi) - J v,  v = eta_N sum_{q=0}^{Q} prod_{j<=q} (I - eta_N H_j) grad_y F
        y_{t+1} = lower_steps SGD steps on g(x_t, .) from y_t
        x_{t+1} = x_t + Adam(h_t)      (`mbbo.steps.Adam`, torch.optim.Adam's rule, coupled weight decay)
    """

    @dataclass
    class State(SingleBlockAlgorithm.State):
        rule_state: AdamState = UNSET  # Adam's state

    name = "adambo"
    Config = AdamBOConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.rule_state = self.adam().init(self.x)

    def adam(self) -> Adam:
        cfg = self.config
        return Adam(cfg.lr, tuple(cfg.betas), cfg.eps, cfg.weight_decay)

    def step(self) -> None:
        cfg = self.config
        if self.iteration == 0:
            self.y = LowerSGD(cfg.warm_start_steps, cfg.lower_lr).run(self.lower_grad_fn(self.x), self.y)
        h = self.neumann_hypergradient(self.x, self.y, Neumann(cfg.neumann_terms, cfg.neumann_lr))
        self.y = LowerSGD(cfg.lower_steps, cfg.lower_lr).run(self.lower_grad_fn(self.x), self.y)
        update, self.rule_state = self.adam().update(h, self.rule_state, self.x)
        self.x_prev = self.x
        self.x = self.x + update
        self.iteration += 1

    def restart(self) -> None:
        """Re-initialises Adam's moments (for `Restarted`)."""
        self.rule_state = self.adam().init(self.x)


# ----------------------------------------------------------------------------------------------------------
# Ada-BiO: adaptive momentum and step sizes


@dataclass
class AdaBiOConfig(Hyper):
    """Ada-BiO; defaults: the hyper-parameter optimisation experiment of the paper (Appendix K, BERT on TREC):
    (eta_x, eta_y, alpha, gamma) = (1e-5, 0.5, 1.0, 0.1). The Neumann series (Appendix E.1, eta_N = 1/l_{g,1},
    N >= 3 log T / (2 log(1 / (1 - mu_g / l_{g,1})))) has no published default: 10 terms of step 0.1 (benchopt's
    StocBiO defaults).

    `variance_estimate`: "independent" (the analysed rule: ||g_{x,k} - g~_{x,k}||^2 with a second, independent
    hypergradient sample) or "consecutive" (the paper's practical variant, Section 6.2: ||g_{x,k} - g_{x,k-1}||^2,
    no second sample). `step_decay=False` drops the 1/sqrt(t) of eta_{x,t} (the practical variant's eta_x / sqrt(T)
    with the constant absorbed in lr)."""

    lr: float = 1e-5
    lower_lr: float = 0.5
    alpha: float = 1.0
    gamma: float = 0.1
    neumann_terms: int = 10
    neumann_lr: float = 0.1
    variance_estimate: str = "independent"
    step_decay: bool = True
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        for name in ("lr", "lower_lr", "alpha", "gamma", "neumann_lr"):
            check_positive(name, getattr(self, name))
        check_int("neumann_terms", self.neumann_terms, 0)
        check_choice("variance_estimate", self.variance_estimate, ("independent", "consecutive"))
        check_flag("step_decay", self.step_decay)
        check_optional(check_int, "batch_size", self.batch_size, 1)


class AdaBiO(SingleBlockAlgorithm):
    """Ada-BiO (Gong, Hao, Liu, "Adaptive algorithms with sharp convergence rates for stochastic hierarchical
    optimization", NeurIPS 2025, arXiv 2509.15399, Algorithm 2 with the parameter choices of its eqs. (3)-(4)).

    With t = 1, 2, ..., g_{x,t} = Neumann hypergradient at (x_t, y_t) on a sample xi_t, g~_{x,t} the same on an
    independent sample xi'_t, g_{y,t} = grad_y G(x_t, y_t; zeta_t)::

        alpha_t  = alpha / sqrt(alpha^2 + sum_{k<=t} ||g_{x,k} - g~_{x,k}||^2)          (beta_t = 1 - alpha_t)
        alpha'_t = alpha / sqrt(alpha^2 + sum_{k<=t} (||g_{x,k} - g~_{x,k}||^2 + ||g_{y,k}||^2))
        eta_{x,t} = eta_x sqrt(alpha'_t) / sqrt(t),     eta_{y,t} = eta_y / sqrt(gamma^2 + sum_{k<=t} ||g_{y,k}||^2)
        m_t = beta_t m_{t-1} + (1 - beta_t) g_{x,t}       (m_1 = g_{x,1})
        x_{t+1} = x_t - eta_{x,t} m_t / ||m_t||,           y_{t+1} = y_t - eta_{y,t} g_{y,t}   (AdaGrad-Norm)

    Sources. The algorithm box, eta_{x,t} = eta_x sqrt(alpha'_t)/sqrt(t), the double-sampling estimate of the
    variance and the AdaGrad-Norm lower level with eta_{y,0} = eta_y / gamma are in the paper's text (Sections
    4.1-4.3, 6.2, Lemma C.2); the closed forms of alpha_t, alpha'_t and eta_{y,t} (whose formula blocks are not
    in the text copy of the paper that could be read) follow the public PaperNotes summary
    (en.papernotes.org, NeurIPS2025 "Adaptive Algorithms with Sharp Convergence Rates for Stochastic Hierarchical
    Optimization") and agree with the paper's Lemmas 5.5 and G.2 (alpha_t between (1 + 4 sigma^2 t / alpha^2)^{-1/2}
    and (1 + sigma^2 t / alpha^2)^{-1/2}). The grouping of the lower-level term inside alpha'_t (summed over k,
    as written here) is this library's reading of that summary.
    """

    @dataclass
    class State(SingleBlockAlgorithm.State):
        m: Tensor = UNSET  # momentum
        g_prev: Tensor = UNSET
        t: int = 0  # iterations since the (re)start
        sum_x: float = 0.0  # sum_k ||g_{x,k} - g~_{x,k}||^2
        sum_y: float = 0.0  # sum_k ||g_{y,k}||^2

    name = "ada_bio"
    Config = AdaBiOConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.m = torch.zeros_like(self.x)
        self.g_prev = torch.zeros_like(self.x)
        self.restart()

    def restart(self) -> None:
        """Restarts the adaptive statistics, the momentum and the 1/sqrt(t) decay (also used by `Restarted`)."""
        self.t = 0  # iterations since the (re)start
        self.sum_x = 0.0  # sum_k ||g_{x,k} - g~_{x,k}||^2
        self.sum_y = 0.0  # sum_k ||g_{y,k}||^2

    def step_sizes(self) -> tuple[float, float, float]:
        """(alpha_t, eta_{x,t}, eta_{y,t}) from the accumulated sums (after this iteration's update)."""
        cfg, t = self.config, self.t + 1
        a2 = cfg.alpha**2
        alpha_t = cfg.alpha / math.sqrt(a2 + self.sum_x)
        alpha_p = cfg.alpha / math.sqrt(a2 + self.sum_x + self.sum_y)
        eta_x = cfg.lr * math.sqrt(alpha_p) / (math.sqrt(t) if cfg.step_decay else 1.0)
        eta_y = cfg.lower_lr / math.sqrt(cfg.gamma**2 + self.sum_y)
        return alpha_t, eta_x, eta_y

    def step(self) -> None:
        cfg = self.config
        solver = Neumann(cfg.neumann_terms, cfg.neumann_lr)
        g_x = self.neumann_hypergradient(self.x, self.y, solver)
        if cfg.variance_estimate == "independent":
            g_ref = self.neumann_hypergradient(self.x, self.y, solver)
        else:
            g_ref = g_x if self.t == 0 else self.g_prev
        g_y = self.grad_y_g(self.x, self.y, self.lower_batch(cfg.batch_size))
        self.sum_x += float((g_x - g_ref).pow(2).sum())
        self.sum_y += float(g_y.pow(2).sum())
        alpha_t, eta_x, eta_y = self.step_sizes()
        self.m = g_x if self.t == 0 else self.m.lerp(g_x, alpha_t)
        update, _ = Normalized(eta_x).update(self.m, CountState(0))
        self.g_prev = g_x
        self.y = self.y - eta_y * g_y
        self.x_prev = self.x
        self.x = self.x + update
        self.t += 1
        self.iteration += 1
