"""What the methods for constrained lower levels (SFLCB, BLOCC, LV-HBA, the penalty method) share, as functions
each of them calls: the check that the problem is a `ConstrainedProblem`, the constraint oracles (counted with the
others), the exact lower solve, deterministic full-data gradients of f and g, and the finiteness check."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.constrained import ConstrainedProblem, ConstraintOracles, exact_lower_solve
from mbbo.problem import MultiBlockProblem
from mbbo.qp import QPResult

__all__ = ["all_finite", "constrained_misfit", "counted_constraint_oracles", "exact_lower", "grads_f", "grads_g",
           "not_constrained_reason"]


def not_constrained_reason(problem: MultiBlockProblem) -> str | None:
    if not isinstance(problem, ConstrainedProblem):
        return ("it solves bilevel problems with a constrained lower level h(x, y) <= 0 (a ConstrainedProblem, "
                "tasks svm_slack, toy_sflcb, toy_coupled); this problem has no constraint")
    return None


def constrained_misfit(problem: MultiBlockProblem, single_block_reason: str | None,
                       needs_linear: str | None = None) -> str | None:
    """Why a constrained method does not fit `problem`: not constrained, else `single_block_reason` (the
    `SingleBlockAlgorithm` check), else `needs_linear` (the method's message) when the constraint is not linear."""
    reason = not_constrained_reason(problem) or single_block_reason
    if reason is None and needs_linear is not None and isinstance(problem, ConstrainedProblem) \
            and problem.linear is None:
        return needs_linear
    return reason


def counted_constraint_oracles(alg: SingleBlockAlgorithm) -> ConstraintOracles:
    """The constraint oracles of `alg`'s problem, counting into `alg.oracles.counts` (one counter: the h counts
    are saved, restored and reported with the others)."""
    h_oracles = ConstraintOracles(alg.problem)
    h_oracles.counts = alg.oracles.counts  # type: ignore[assignment]
    for kind in ("h", "h_vjp"):
        alg.oracles.counts.setdefault(kind, 0)
    return h_oracles


def exact_lower(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor) -> QPResult:
    """y*(x) and its multipliers by a QP, for g quadratic in y (Hessian and gradient read at y)."""
    gy, hess = alg.oracles.lower_hessian(x.unsqueeze(0), y.view(1, 1, -1), alg.lower_batch(), alg.block)
    hess, gy = hess[0, 0], gy[0, 0]
    return exact_lower_solve(alg.problem, x, hess, gy - hess @ y)


def grads_f(alg: SingleBlockAlgorithm, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x f, grad_y f) on one upper batch (the full data for full-batch samplers)."""
    return alg.upper_grads(x, y, alg.upper_batch())


def grads_g(alg: SingleBlockAlgorithm, x: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x g, grad_y g) at the points (x, ys[p]) on one lower batch: (P, d_x), (P, d_y). One call per point:
    vmapping over points fails in torch.func when g does not depend on x (the SVM's g)."""
    batch = alg.lower_batch()
    pairs = [alg.lower_grads(x, y, batch) for y in ys]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is finite (a constrained method's `is_finite` over its state tensors)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
