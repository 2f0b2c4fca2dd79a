"""Building blocks of the single-block algorithms' iterations: small functions of (algorithm, ...) that an
algorithm's `step()` calls explicitly, so that no algorithm inherits behaviour from another one or from a family
base (every registered single-block class derives directly from `SingleBlockAlgorithm`).

Each takes the algorithm for its counted oracles, mini-batch streams and configuration; none keeps state (state
lives in the algorithm's declared `State`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.inner_solvers import LowerSGD
from mbbo.linsolve import HVPFactory, Neumann

# --- the double-loop zoo (stocBiO, AID/ITD-BiO, BSA, TTSA, AmIGO) ------------------------------------------


def lower_start(alg: SingleBlockAlgorithm) -> Tensor:
    """The start of this iteration's lower loop: the last lower iterate (config `warm_start`) or the problem's y0."""
    return alg.y if alg.config.warm_start else alg.problem.y0[0].clone()


def lower_loop(alg: SingleBlockAlgorithm, x: Tensor, y0: Tensor, n_steps: int, lr: float) -> Tensor:
    """n_steps SGD steps on g(x, .) from y0, each on a fresh lower mini-batch (`mbbo.inner_solvers.LowerSGD`)."""
    return LowerSGD(n_steps, lr).run(alg.lower_grad_fn(x), y0)


def fresh_hvps(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor) -> HVPFactory:
    """HVPs at (x, y), one independent lower mini-batch (stream "extra") per Neumann term / solver step."""
    return HVPFactory(alg.hvp_source(x, y))


def random_neumann(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor, b: Tensor, terms: int, lr: float) -> Tensor:
    """Randomly truncated Neumann estimate Q eta prod_{j<=q} (I - eta H_j) b of (grad_yy g(x, y))^{-1} b
    (Ghadimi & Wang; BSA, TTSA), fresh batches per factor, q drawn from the "extra" stream."""
    solver = Neumann(terms, lr, random_truncation=True)
    return solver.solve(fresh_hvps(alg, x, y), b, generator=alg.generators["extra"]).v


def implicit_oracle_calls(alg: SingleBlockAlgorithm, **counts: int) -> dict[str, int]:
    """{kind: calls} of one iteration: the given counts, plus one grad_x f when the upper loss depends on x."""
    return {**counts, "grad_x_f": int(alg.problem.upper_depends_on_x)}


def two_points(current: Tensor, previous: Tensor, fresh: bool) -> Tensor:
    """(current,) stacked alone when `fresh` (no previous point yet), else (current, previous) stacked: the
    points of a STORM / SARAH difference evaluated on the same samples in one call."""
    return current.unsqueeze(0) if fresh else torch.stack([current, previous])
