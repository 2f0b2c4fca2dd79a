"""stocBiO (Ji, Yang & Liang, "Bilevel Optimization: Convergence Analysis and Enhanced Design", ICML 2021), and
the step-size configurations shared by the double-loop members of the single-block zoo (AID/ITD-BiO, BSA, TTSA,
AmIGO, FSLA); their shared loops are in `mbbo.algorithms.pieces`.

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

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.pieces import fresh_hvps, implicit_oracle_calls, lower_loop, lower_start
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.linsolve import Neumann
from mbbo.problem import MultiBlockProblem
from mbbo.steps import scheduled
from mbbo.validation import check_flag, check_int, check_nonnegative, check_positive

# --- the shared configurations ------------------------------------------------------------------------------


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

    def lr_at(self, k: int) -> float:
        """The upper step lr / (k + 1)^lr_exponent at outer iteration k (`mbbo.steps.scheduled`)."""
        return scheduled(self.lr, self.lr_exponent, k)

    def lower_lr_at(self, k: int) -> float:
        """The lower step lower_lr / (k + 1)^lower_lr_exponent at outer iteration k."""
        return scheduled(self.lower_lr, self.lower_lr_exponent, k)


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


class StocBiO(SingleBlockAlgorithm):
    """stocBiO: warm-started SGD on the lower level, Neumann series with independent HVP batches, SGD on x."""

    name = "stocbio"
    Config = StocBiOConfig

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        cfg = self.config
        return implicit_oracle_calls(self, grad_y_g=cfg.lower_steps, hvp=cfg.linsys_steps, cross=1, grad_y_f=1)

    def step(self) -> None:
        cfg, x, k = self.config, self.x, self.iteration
        self.y = lower_loop(self, x, lower_start(self), cfg.lower_steps, cfg.lower_lr_at(k))
        gx_f, gy_f = self.upper_grads(x, self.y, self.upper_batch())
        v = Neumann(cfg.linsys_steps, cfg.linsys_lr).solve(fresh_hvps(self, x, self.y), gy_f).v
        self.advance(x - cfg.lr_at(k) * (gx_f - self.cross(x, self.y, v, self.lower_batch())))

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: no estimator to reset."""
