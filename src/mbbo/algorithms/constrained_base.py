"""What the methods for constrained lower levels (SFLCB, BLOCC, LV-HBA, the penalty method) share: the check
that the problem is a `ConstrainedProblem`, the constraint oracles (counted with the others), deterministic
full-data gradients of f and g, and the models a method reports (`reported_models`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.constrained import ConstrainedProblem, ConstraintOracles, exact_lower_solve
from mbbo.problem import MultiBlockProblem
from mbbo.qp import QPResult

__all__ = ["ConstrainedAlgorithm", "ConstrainedMixin", "not_constrained_reason"]


def not_constrained_reason(problem: MultiBlockProblem) -> str | None:
    if not isinstance(problem, ConstrainedProblem):
        return ("it solves bilevel problems with a constrained lower level h(x, y) <= 0 (a ConstrainedProblem, "
                "tasks svm_slack, toy_sflcb, toy_coupled); this problem has no constraint")
    return None


class ConstrainedMixin:
    """Constraint oracles and helpers for an algorithm on a `ConstrainedProblem` (set up by `_init_constraints`).

    `constrained_only = True` tells the task registry that the method fits constrained tasks only."""

    constrained_only: ClassVar[bool] = True
    problem: ConstrainedProblem
    h_oracles: ConstraintOracles

    def _init_constraints(self) -> None:
        self.h_oracles = ConstraintOracles(self.problem)
        # one counter: the h counts are saved, restored and reported with the others
        self.h_oracles.counts = self.oracles.counts  # type: ignore[attr-defined]
        for kind in ("h", "h_vjp"):
            self.oracles.counts.setdefault(kind, 0)  # type: ignore[attr-defined]

    def exact_lower(self, x: Tensor, y: Tensor) -> QPResult:
        """y*(x) and its multipliers by a QP, for g quadratic in y (Hessian and gradient read at y)."""
        algo: Any = self
        gy, hess = algo.oracles.lower_hessian(x.unsqueeze(0), y.view(1, 1, -1), algo.lower_batch(), algo.block)
        hess, gy = hess[0, 0], gy[0, 0]
        return exact_lower_solve(self.problem, x, hess, gy - hess @ y)

    def reported_models(self) -> dict[str, Tensor]:
        """The lower iterates a method reports, by name (the first is `lower_variables()`)."""
        raise NotImplementedError


class ConstrainedAlgorithm(ConstrainedMixin, SingleBlockAlgorithm):
    """Base of SFLCB, BLOCC and LV-HBA: a single-block algorithm on a `ConstrainedProblem`."""

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self._init_constraints()
        self.x = self.problem.project_x(self.x)

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        return not_constrained_reason(problem) or super().unsuitable_for(problem)

    def lower_variables(self) -> Tensor:
        return next(iter(self.reported_models().values())).unsqueeze(0)

    def grads_f(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(grad_x f, grad_y f) on one upper batch (the full data for full-batch samplers)."""
        return self.upper_grads(x, y, self.upper_batch())

    def grads_g(self, x: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        """(grad_x g, grad_y g) at the points (x, ys[p]) on one lower batch: (P, d_x), (P, d_y). One call per
        point: vmapping over points fails in torch.func when g does not depend on x (the SVM's g)."""
        batch = self.lower_batch()
        pairs = [self.lower_grads(x, y, batch) for y in ys]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.state_tensors())
