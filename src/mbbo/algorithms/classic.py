"""The first stochastic bilevel methods: BSA (Ghadimi & Wang, "Approximation Methods for Bilevel Programming",
arXiv 1802.02246, 2018) and TTSA (Hong, Wai, Wang & Yang, "A Two-Timescale Stochastic Algorithm Framework for
Bilevel Optimization", SIAM J. Optim. 2023), as the public benchmark implements them
(benchopt/benchmark_bilevel `solvers/bsa.py`, `solvers/ttsa.py`).

Both estimate H^{-1} grad_y f by Ghadimi & Wang's randomly truncated Neumann product (`mbbo.linsolve.Neumann`
with random_truncation; benchopt's `hia`)::

    v = Q eta prod_{j=1}^{q} (I - eta grad_yy G(x, y; B_j)) grad_y F(x, y; xi),   q ~ Uniform{0..Q-1}

(q independent lower batches B_j; q is drawn from the "extra" random stream, like the batches), an unbiased
estimate of the truncated series eta sum_{q<Q} (I - eta H)^q grad_y f.

BSA, iteration k (double loop)::

    y_k = lower_steps SGD steps on g(x_k, .) from y_{k-1}, step alpha_k = lower_lr / (k+1)^(1/2)
    h_k = grad_x F(x_k, y_k; xi) - grad_xy G(x_k, y_k; zeta) v         (zeta a fresh lower batch)
    x_{k+1} = x_k - beta_k h_k,   beta_k = lr / (k+1)^(1/2)

TTSA, iteration k (single loop, two time scales)::

    y_{k+1} = y_k - alpha_k grad_y G(x_k, y_k; zeta_k),      alpha_k = lower_lr / (k+1)^0.4
    h_k     = grad_x F(x_k, y_{k+1}; xi) - grad_xy G(x_k, y_{k+1}; zeta_k) v     (v at (x_k, y_{k+1}))
    x_{k+1} = x_k - beta_k h_k,                              beta_k = lr / (k+1)^0.6

(the cross product reuses the lower step's batch zeta_k, as benchopt does). The papers' projections onto a
constraint set X are not included (unconstrained x).

Defaults: benchopt's class defaults (step_size 0.1 for x, y and the Neumann step, outer_ratio 1, n_hia_steps
10, n_inner_steps 10 for BSA; schedule exponents BSA (1/2, 0, 1/2), TTSA (0.4, 0, 0.6) for (y, Neumann, x)).
Benchopt's best parameters: BSA covtype / ijcnn1 step 0.5, outer_ratio 0.01, datacleaning 0.1 / 1e-5; TTSA
covtype 0.5 / 0.01, ijcnn1 0.5 / 0.0316, datacleaning 0.1 / 1e-5 (lr = step / outer_ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

from mbbo.algorithms.pieces import lower_loop, lower_start, random_neumann
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.algorithms.stocbio import StepConfig, ZooConfig
from mbbo.problem import MultiBlockProblem
from mbbo.validation import check_int, check_positive


def _check_neumann(config: BSAConfig | TTSAConfig) -> None:
    check_int("linsys_steps", config.linsys_steps, 1)
    check_positive("linsys_lr", config.linsys_lr)


@dataclass
class BSAConfig(ZooConfig):
    """linsys_steps = Q (range of the random truncation level), linsys_lr = eta (Neumann step)."""

    lr_exponent: float = 0.5
    lower_lr_exponent: float = 0.5
    linsys_steps: int = 10
    linsys_lr: float = 0.1

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        _check_neumann(self)


@dataclass
class TTSAConfig(StepConfig):
    """One lower step per iteration; linsys_steps = Q, linsys_lr = eta as in BSA."""

    lr_exponent: float = 0.6
    lower_lr_exponent: float = 0.4
    linsys_steps: int = 10
    linsys_lr: float = 0.1

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        _check_neumann(self)


class BSA(SingleBlockAlgorithm):
    """BSA: warm-started lower SGD loop, randomly truncated Neumann hypergradient, decaying steps."""

    name = "bsa"
    Config = BSAConfig

    def step(self) -> None:
        cfg, x, k = self.config, self.x, self.iteration
        self.y = lower_loop(self, x, lower_start(self), cfg.lower_steps, cfg.lower_lr_at(k))
        gx_f, gy_f = self.upper_grads(x, self.y, self.upper_batch())
        v = random_neumann(self, x, self.y, gy_f, cfg.linsys_steps, cfg.linsys_lr)
        self.advance(x - cfg.lr_at(k) * (gx_f - self.cross(x, self.y, v, self.lower_batch())))

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: no estimator to reset."""


class TTSA(SingleBlockAlgorithm):
    """TTSA: one lower SGD step and one upper step per iteration on two time scales."""

    name = "ttsa"
    Config = TTSAConfig

    def step(self) -> None:
        cfg, x, k, batch = self.config, self.x, self.iteration, self.lower_batch()
        self.y = self.y - cfg.lower_lr_at(k) * self.grad_y_g(x, self.y, batch)
        gx_f, gy_f = self.upper_grads(x, self.y, self.upper_batch())
        v = random_neumann(self, x, self.y, gy_f, cfg.linsys_steps, cfg.linsys_lr)
        self.advance(x - cfg.lr_at(k) * (gx_f - self.cross(x, self.y, v, batch)))

    def restart(self) -> None:
        """Used by `Restarted` at a stage start: no estimator to reset."""
