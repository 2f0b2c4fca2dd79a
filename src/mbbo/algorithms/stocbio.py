"""stocBiO (Ji, Yang & Liang, "Bilevel Optimization: Convergence Analysis and Enhanced Design", ICML 2021), and
the small base shared by the double-loop members of the single-block zoo (AID/ITD-BiO, BSA, TTSA, AmIGO, FSLA).

stocBiO, iteration k (Algorithm 1 of the paper, Algorithm 2 for the Neumann estimate)::

    y_k^0 = y_{k-1}^D  (warm start; y_0 with warm_start=False)
    y_k^t = y_k^{t-1} - alpha grad_y G(x_k, y_k^{t-1}; S_t),                    t = 1..D  (fresh batches S_t)
    v_0   = grad_y F(x_k, y_k^D; D_F)
    v_Q   = eta sum_{q=0}^{Q} prod_{j=1}^{q} (I - eta grad_yy G(x_k, y_k^D; B_j)) v_0     (Q independent batches)
    h_k   = grad_x F(x_k, y_k^D; D_F) - grad_xy G(x_k, y_k^D; D_G) v_Q                   (D_G a fresh batch)
    x_{k+1} = x_k - beta h_k

The Neumann estimate is the paper's formula (`mbbo.linsolve.Neumann`), not the reference code's variant (no eta
factor on the sum, no q = 0 term, one batch for all terms). Oracles per iteration: D grad_y g, 1 grad_x f and
grad_y f, Q HVPs, 1 cross product.

Defaults: the public benchmark's stocBiO class defaults (benchopt/benchmark_bilevel `solvers/stocbio.py`:
step_size 0.1 for the inner steps and the Neumann terms, outer_ratio 1, n_inner_steps 10, n_shia_steps 10,
constant steps), which are also its best parameters on the `quadratics_021424` instance. Other best parameters
there: covtype step 0.0625 / outer_ratio 0.01; ijcnn1 0.125 / 1; datacleaning 0.01 / 1e-5 (lr = step /
outer_ratio). The paper's MNIST hyper-cleaning runs use D = 200, alpha = 0.1, Q = 3, eta = 0.5, beta = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.inner_solvers import LowerSGD
from mbbo.linsolve import HVPFactory, Neumann
from mbbo.problem import MultiBlockProblem
from mbbo.steps import scheduled
from mbbo.validation import check_flag, check_int, check_nonnegative, check_positive

# --- the shared base --------------------------------------------------------------------------------------


@dataclass
class StepConfig(Hyper):
    """Step sizes shared by the zoo: lr_k = lr / (k + 1)^lr_exponent (upper step beta) and
    lower_lr_k = lower_lr / (k + 1)^lower_lr_exponent (lower step alpha), k the outer iteration; exponents 0
    give constant steps (benchopt's scheduler step / (k + 1)^a)."""

    lr: float = 0.1
    lower_lr: float = 0.1
    lr_exponent: float = 0.0
    lower_lr_exponent: float = 0.0

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_positive("lower_lr", self.lower_lr)
        check_nonnegative("lr_exponent", self.lr_exponent)
        check_nonnegative("lower_lr_exponent", self.lower_lr_exponent)


@dataclass
class ZooConfig(StepConfig):
    """Adds the lower loop of the double-loop methods: lower_steps (stochastic) gradient steps per outer
    iteration, started from the previous lower iterate (warm_start=True) or from the problem's y0."""

    lower_steps: int = 10
    warm_start: bool = True

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_int("lower_steps", self.lower_steps, 1)
        check_flag("warm_start", self.warm_start)


class ZooAlgorithm(SingleBlockAlgorithm):
    """Helpers of the single-block zoo: schedules, the warm-started lower loop, the upper step, restarts.

    Subclasses implement `step()` from these pieces and the oracles of `SingleBlockAlgorithm`, and declare
    their state beyond x, x_prev and y by extending `State`.
    """

    def scheduled(self, value: float, exponent: float) -> float:
        """value / (k + 1)^exponent at the current outer iteration k (`mbbo.steps.scheduled`)."""
        return scheduled(value, exponent, self.iteration)

    @property
    def current_lr(self) -> float:
        return self.scheduled(self.config.lr, self.config.lr_exponent)

    @property
    def current_lower_lr(self) -> float:
        return self.scheduled(self.config.lower_lr, self.config.lower_lr_exponent)

    def lower_start(self) -> Tensor:
        """The start of this iteration's lower loop: the last lower iterate (warm start) or y0."""
        return self.y if self.config.warm_start else self.problem.y0[0].clone()

    def lower_sgd(self, x: Tensor, y0: Tensor, n_steps: int | None = None, lr: float | None = None) -> Tensor:
        """n_steps SGD steps on g(x, .) from y0, each on a fresh lower batch (defaults: the config's)."""
        solver = LowerSGD(self.config.lower_steps if n_steps is None else n_steps,
                          self.current_lower_lr if lr is None else lr)
        return solver.run(lambda y: self.grad_y_g(x, y, self.lower_batch()), y0)

    def neumann_hvps(self, x: Tensor, y: Tensor) -> HVPFactory:
        """HVPs at (x, y), one independent lower batch (stream "extra") per term / step."""
        return HVPFactory(self.hvp_source(x, y))

    def random_neumann(self, x: Tensor, y: Tensor, b: Tensor) -> Tensor:
        """Randomly truncated Neumann estimate of (grad_yy g(x, y))^{-1} b, fresh batches per factor (BSA, TTSA;
        the config's linsys_steps and linsys_lr)."""
        cfg = self.config
        solver = Neumann(cfg.linsys_steps, cfg.linsys_lr, random_truncation=True)
        return solver.solve(self.neumann_hvps(x, y), b, generator=self.generators["extra"]).v

    def upper_step(self, direction: Tensor) -> None:
        """x <- x - lr_k * direction; ends the iteration."""
        self.x_prev = self.x
        self.x = self.x - self.current_lr * direction
        self.iteration += 1

    def restart(self) -> None:
        """Used by `Restarted` at a stage start; the double-loop methods keep no estimator to reset."""


# --- stocBiO ------------------------------------------------------------------------------------------------


@dataclass
class StocBiOConfig(ZooConfig):
    """lower_steps = D, linsys_steps = Q (HVPs of the Neumann series), linsys_lr = eta (Neumann step)."""

    linsys_steps: int = 10
    linsys_lr: float = 0.1

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_int("linsys_steps", self.linsys_steps, 0)
        check_positive("linsys_lr", self.linsys_lr)


class StocBiO(ZooAlgorithm):
    """stocBiO: warm-started SGD on the lower level, Neumann series with independent HVP batches, SGD on x."""

    name = "stocbio"
    Config = StocBiOConfig

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        cfg = self.config
        return {"grad_y_g": cfg.lower_steps, "hvp": cfg.linsys_steps, "cross": 1, "grad_y_f": 1,
                "grad_x_f": int(self.problem.upper_depends_on_x)}

    def step(self) -> None:
        cfg, x = self.config, self.x
        self.y = self.lower_sgd(x, self.lower_start())
        gx_f, gy_f = self.upper_grads(x, self.y, self.upper_batch())
        v = Neumann(cfg.linsys_steps, cfg.linsys_lr).solve(self.neumann_hvps(x, self.y), gy_f).v
        self.upper_step(gx_f - self.cross(x, self.y, v, self.lower_batch()))
