"""F2SA, the fully first-order stochastic approximation method (Kwon, Kwon, Wright, Nowak, ICML 2023), and its
projected variant for a constrained lower level (Kwon, Kwon, Wright, Nowak, "On penalty methods for nonconvex
bilevel optimization and first-order stochastic approximation", ICLR 2024).

Penalty reformulation (`mbbo.penalty`): L_lambda(x) = min_y [f + lambda g](x, y) - lambda min_z g(x, z). Two lower
sequences, y for the penalised problem f + lambda g (the lambda-scaled form, as in the paper and benchopt; the ICLR'24
form sigma f + g with sigma = 1/lambda is the same iteration with step lambda * alpha_k), z for g alone, and only
gradients (no Hessian-vector products)::

    for t = 1..T:   y <- Pi_Y( y - alpha_k (grad_y F(x, y; zeta) + lambda_k grad_y G(x, y; phi)) )
                    z <- Pi_Y( z - gamma_k grad_y G(x, z; phi') )
    x <- x - beta_k [ grad_x F(x, y; zeta') + lambda_k (grad_x G(x, y; phi'') - grad_x G(x, z; phi'')) ]
    lambda_{k+1} = schedule(lambda_k, k)

Pi_Y is the identity for `f2sa` and the projection onto the lower-level set Y for `f2sa_projected`. The two
x-gradients of g use one mini-batch phi'' (as in the paper's h_x: the difference is then O(||y - z||) and the
factor lambda does not amplify sampling noise); benchopt draws two batches (`shared_x_sample=False`).

Step sizes alpha_k = lr / (k+1)^{y_exponent}, gamma_k = lower_lr / (k+1)^{z_exponent},
beta_k = lr / outer_ratio / (k+1)^{x_exponent}.

The lambda schedule: paper vs benchopt. Both make lambda grow, at different rates (algorithms.md 5.3):
- benchopt (`lambda_schedule="benchopt"`, the default, with benchopt's defaults): lambda_{k+1} = lambda_k +
  delta_lambda (k+1)^{-1/7}, i.e. lambda_k ~ (7/6) delta_lambda k^{6/7}; exponents 5/7 (y), 4/7 (z), 4/7 (x);
- paper (`lambda_schedule="paper"`): lambda_k = lambda0 (k+1)^{1/7}, the ratio gamma_k / alpha_k of the step sizes
  alpha_k ~ k^{-5/7}, gamma_k ~ k^{-4/7}, so that the effective step lambda_k alpha_k of y on g stays ~ gamma_k. In
  the paper the x step is xi * alpha_k (set `x_exponent=5/7`, `outer_ratio=1/xi`) [paper, as recalled]. With
  benchopt's faster growth the effective step lambda_k alpha_k of y on g grows like k^{1/7} instead of decaying
  like gamma_k (slowly: it stays small with the default lr), and the bias O(1/lambda_k) vanishes faster.
- `"constant"`: lambda_k = lambda0.

Defaults: benchopt/benchmark_bilevel `solvers/f2sa.py` (step_size 0.01, outer_ratio 1, lmbda0 1, delta_lmbda 0.1,
n_inner_steps 10). Oracles per iteration: 2T grad_y g, T grad f (y-part used), then grad f and grad_x g at y and z.
`lower_variables()` returns z, the estimate of y*(x) (benchopt reports the same sequence); `.y` is the penalised one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.penalty import (
    SCHEDULES,
    PenaltySchedule,
    Projection,
    as_projection,
    make_penalty_schedule,
    penalty_gradient,
)
from mbbo.problem import MultiBlockProblem
from mbbo.state import UNSET
from mbbo.steps import InversePower
from mbbo.validation import (
    check_choice,
    check_flag,
    check_int,
    check_nonnegative,
    check_optional,
    check_positive,
    check_real,
)


@dataclass
class F2SAConfig(Hyper):
    """F2SA hyper-parameters; defaults: benchopt's F2SA solver (see the module docstring)."""

    lr: float = 0.01
    outer_ratio: float = 1.0
    lower_lr: float | None = None  # base step of z; None: lr (benchopt uses step_size for both)
    y_exponent: float = 5.0 / 7.0
    z_exponent: float = 4.0 / 7.0
    x_exponent: float = 4.0 / 7.0
    lambda_schedule: str = "benchopt"
    lambda0: float = 1.0
    delta_lambda: float = 0.1
    lambda_power: float = 1.0 / 7.0
    n_inner_steps: int = 10
    shared_x_sample: bool = True
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_positive("outer_ratio", self.outer_ratio)
        if self.lower_lr is not None:
            check_positive("lower_lr", self.lower_lr)
        for name in ("y_exponent", "z_exponent", "x_exponent"):
            check_real(name, getattr(self, name), 0.0, 1.0)
        check_choice("lambda_schedule", self.lambda_schedule, SCHEDULES)
        check_positive("lambda0", self.lambda0)
        check_nonnegative("delta_lambda", self.delta_lambda)
        check_real("lambda_power", self.lambda_power, 0.0, 1.0)
        check_int("n_inner_steps", self.n_inner_steps, 1)
        check_flag("shared_x_sample", self.shared_x_sample)
        check_optional(check_int, "batch_size", self.batch_size, 1)

    def schedule(self) -> PenaltySchedule:
        """The penalty multipliers lambda_k (`mbbo.penalty.make_penalty_schedule`)."""
        return make_penalty_schedule(self.lambda_schedule, self.lambda0, self.delta_lambda, self.lambda_power)

    def in_use(self, name: str) -> Any:
        """`lower_lr` None is `lr`."""
        if name == "lower_lr" and self.lower_lr is None:
            return self.lr
        return super().in_use(name)

    def step_sizes(self, k: int) -> tuple[float, float, float]:
        """(alpha_k for y, gamma_k for z, beta_k for x)."""
        return (InversePower(self.lr, self.y_exponent)(k), InversePower(self.in_use("lower_lr"), self.z_exponent)(k),
                InversePower(self.lr / self.outer_ratio, self.x_exponent)(k))


@dataclass
class F2SAProjectedConfig(F2SAConfig):
    """As F2SA plus the lower-level constraint set Y: `projection` is a callable v -> Pi_Y(v) or a radius R
    (Y = {||y|| <= R}). The papers give no default set; R = 10 is a loose ball for standardised problems."""

    projection: Projection | float = 10.0

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        if self.projection is None:
            raise ValueError("projection must be a callable or a radius in (0, inf), got None; use f2sa instead")
        try:
            as_projection(self.projection)
        except ValueError as err:
            raise ValueError(f"projection: {err}") from None


LowerProjection = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(x, y, z) -> (Pi(y), Pi(z)): the projection of the two lower iterates after each inner step."""


def penalty_lower_loop(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor, z: Tensor, lam: float, alpha: float,
                       gamma: float, project: LowerProjection | None = None) -> tuple[Tensor, Tensor]:
    """The config's `n_inner_steps` of y <- Pi(y - alpha (grad_y F + lam grad_y G)), z <- Pi(z - gamma grad_y G), each
    on fresh mini-batches (module docstring); `project=None`: no projection."""
    bs = alg.config.batch_size
    for _ in range(alg.config.n_inner_steps):
        gy_g = alg.grad_y_g(x, y, alg.lower_batch(bs))
        _, gy_f = alg.upper_grads(x, y, alg.upper_batch(bs))
        gz_g = alg.grad_y_g(x, z, alg.lower_batch(bs))
        y, z = y - alpha * (gy_f + lam * gy_g), z - gamma * gz_g
        if project is not None:
            y, z = project(x, y, z)
    return y, z


def penalty_direction(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor, z: Tensor, lam: float) -> Tensor:
    """grad_x F(x, y) + lam (grad_x G(x, y) - grad_x G(x, z)) on fresh mini-batches (one lower batch for both
    points when the config's `shared_x_sample`)."""
    bs = alg.config.batch_size
    gx_f, _ = alg.upper_grads(x, y, alg.upper_batch(bs))
    if alg.config.shared_x_sample:
        gx_g, _ = alg.lower_grads(torch.stack([x, x]), torch.stack([y, z]), alg.lower_batch(bs))
        gx_g_y, gx_g_z = gx_g[0], gx_g[1]
    else:
        gx_g_y, _ = alg.lower_grads(x, y, alg.lower_batch(bs))
        gx_g_z, _ = alg.lower_grads(x, z, alg.lower_batch(bs))
    return penalty_gradient(gx_f, gx_g_y, gx_g_z, lam)


def start_penalty_iterates(alg: F2SA | F2SAProjected, projection: Projection | None) -> None:
    """y <- Pi_Y(y0) (when `projection` is given), z <- y, lambda <- lambda_0."""
    if projection is not None:
        alg.y = projection(alg.y)
    alg.z = alg.y.clone()
    alg.lam = alg.config.schedule().value(0)


def f2sa_step(alg: F2SA | F2SAProjected, projection: Projection | None) -> None:
    """One F2SA iteration (module docstring): the inner loop (projected on Y when `projection` is given), the
    penalty step on x, lambda_{k+1} = schedule(lambda_k, k)."""
    cfg, k, lam, x = alg.config, alg.iteration, alg.lam, alg.x
    alpha, gamma, beta = cfg.step_sizes(k)
    project = None if projection is None else (lambda _, y, z: (projection(y), projection(z)))
    alg.y, alg.z = penalty_lower_loop(alg, x, alg.y, alg.z, lam, alpha, gamma, project)
    alg.advance(x - beta * penalty_direction(alg, x, alg.y, alg.z, lam))
    alg.lam = cfg.schedule().advance(lam, k)


class F2SA(SingleBlockAlgorithm):
    """F2SA (Kwon, Kwon, Wright, Nowak, ICML 2023): fully first-order penalty method (module docstring)."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        z: Tensor = UNSET  # the iterate of the lower problem alone (y: the penalised one)
        lam: float = 0.0  # the penalty multiplier lambda_k

    name = "f2sa"
    Config = F2SAConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_penalty_iterates(self, None)

    def step(self) -> None:
        f2sa_step(self, None)

    def restart(self) -> None:
        """For `Restarted`: nothing to re-initialise (no estimator); y, z, lambda and the schedules carry over."""

    def lower_variables(self) -> Tensor:
        return self.z.unsqueeze(0)

    def is_finite(self) -> bool:
        return super().is_finite() and bool(torch.isfinite(self.y).all())


class F2SAProjected(SingleBlockAlgorithm):
    """Projected F2SA (Kwon, Kwon, Wright, Nowak, ICLR 2024): F2SA with projections Pi_Y onto the lower-level
    constraint set on the y and z steps (and on the initial point); the upper direction is unchanged (Danskin)."""

    State = F2SA.State
    name = "f2sa_projected"
    Config = F2SAProjectedConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_penalty_iterates(self, self.projection)

    @property
    def projection(self) -> Projection:
        """Pi_Y, from the config's `projection` (a callable or a ball radius)."""
        return as_projection(self.config.projection)

    def step(self) -> None:
        f2sa_step(self, self.projection)

    def restart(self) -> None:
        """For `Restarted`: nothing to re-initialise (no estimator); y, z, lambda and the schedules carry over."""

    def lower_variables(self) -> Tensor:
        return self.z.unsqueeze(0)

    def is_finite(self) -> bool:
        return super().is_finite() and bool(torch.isfinite(self.y).all())
