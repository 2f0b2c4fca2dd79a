"""A documented minimal algorithm to copy when adding one (walked through in docs/adding_an_algorithm.md).

Stochastic AID with a few lower SGD steps (a SOBA-type method with an inner loop), iteration k::

    y <- y - lower_lr grad_y g(x_k, y; zeta_j)                        j = 1..lower_steps (fresh batches)
    (grad_y g, H v, J v) at (x_k, y, v) on one lower batch;  (grad_x f, grad_y f) at (x_k, y) on an upper batch
    v <- v - linsys_lr (H v - grad_y f)                              (one SGD step on 1/2 v^T H v - grad_y f^T v)
    x_{k+1} = x_k - lr (grad_x f - J v)

It is deliberately plain (no variance reduction, no schedules): what matters is the shape every algorithm has.

1. A `Config` dataclass (deriving from `Hyper`) of hyper-parameters with defaults, checked in `validate` with
   `mbbo.validation` (one message style; the contract suite feeds every field bad values and expects an error
   naming the field).
2. A `State` dataclass extending the parent's `State` with everything an iteration changes (here v; x, x_prev,
   the iteration counter and y come from the bases). `state_dict()` / `load_state_dict()` are derived from it;
   each field is also an attribute (`self.v`).
3. `step()`: one iteration, a short wiring of the shared pieces (oracles of `SingleBlockAlgorithm`, the lower
   SGD of `mbbo.inner_solvers`), ending with `advance` (x_prev, x and the iteration counter).
   The class derives directly from `SingleBlockAlgorithm`: algorithms never subclass one another
   (tests/test_flat_hierarchy.py); what several of them share is a function or a small object they call.
4. `oracle_calls_per_step()`: the oracle calls of one iteration, checked by the contract suite.

It is registered by the tests only (`register_algorithm(TemplateAID)`), not in the library's list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.inner_solvers import LowerSGD
from mbbo.problem import MultiBlockProblem
from mbbo.state import UNSET
from mbbo.validation import check_int, check_optional, check_positive


@dataclass
class TemplateConfig(Hyper):
    """lr: upper step; lower_lr and lower_steps: the lower SGD loop; linsys_lr: the step on v; batch_size: the
    mini-batch size (None: the problem's)."""

    lr: float = 0.1
    lower_lr: float = 0.1
    lower_steps: int = 2
    linsys_lr: float = 0.1
    batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        check_positive("lr", self.lr)
        check_positive("lower_lr", self.lower_lr)
        check_int("lower_steps", self.lower_steps, 1)
        check_positive("linsys_lr", self.linsys_lr)
        check_optional(check_int, "batch_size", self.batch_size, 1)


class TemplateAID(SingleBlockAlgorithm):
    """Stochastic AID with a lower SGD loop and one SGD step on the linear system per iteration (module doc)."""

    @dataclass
    class State(SingleBlockAlgorithm.State):
        v: Tensor = UNSET  # the linear-system variable, approximately (grad_yy g)^-1 grad_y f

    name = "template_aid"
    Config = TemplateConfig

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)

    def step(self) -> None:
        cfg, x, bs = self.config, self.x, self.config.batch_size
        lower_sgd = LowerSGD(cfg.lower_steps, cfg.lower_lr)
        y = lower_sgd.run(lambda w: self.grad_y_g(x, w, self.lower_batch(bs)), self.y)
        _, hv, jv = self.lower_products(x, y, self.v, self.lower_batch(bs))
        gx_f, gy_f = self.upper_grads(x, y, self.upper_batch(bs))
        self.y, self.v = y, self.v - cfg.linsys_lr * (hv - gy_f)
        self.advance(x - cfg.lr * (gx_f - jv))  # x_prev <- x, x <- the new x, iteration += 1

    def restart(self) -> None:
        """Nothing to re-initialise for `Restarted` (y and v carry over)."""

    def oracle_calls_per_step(self) -> dict[str, int]:
        upper_x = int(self.problem.upper_depends_on_x)
        return {"grad_y_g": self.config.lower_steps + 1, "hvp": 1, "cross": 1, "grad_y_f": 1, "grad_x_f": upper_x}
