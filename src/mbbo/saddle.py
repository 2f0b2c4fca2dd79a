"""Building blocks of Lagrangian / saddle-point methods for constrained lower levels (SFLCB, BLOCC, LV-HBA).

- `SaddleBlock`: one variable block of a saddle function, with its direction (descent for min variables,
  ascent for max variables) and its clamp (e.g. slacks alpha <- min(alpha, 0), multipliers mu <- max(mu, 0),
  x <- Proj_X(x)).
- `descent_ascent_step`: one gradient descent-ascent step on all blocks with one step size, in Jacobi order
  (every gradient at the old point) or Gauss-Seidel order (groups in turn, each group's gradient at the point
  where the earlier groups are already updated).
- `max_min_loop`: the primal-dual inner loop of BLOCC for max_{mu >= floor} min_y L(y, mu): T rounds of Ty
  gradient steps on y, then one projected ascent step on mu (grad_mu L = h(y)), with an early exit.
- `nonnegative`, `nonpositive`: the clamps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ORDERINGS", "SaddleBlock", "descent_ascent_step", "max_min_loop", "nonnegative", "nonpositive"]

ORDERINGS = ("jacobi", "gauss_seidel")
GradientFn = Callable[[Mapping[str, Tensor], Sequence[str]], Mapping[str, Tensor]]


def nonnegative(v: Tensor) -> Tensor:
    """max(v, 0)."""
    return v.clamp_min(0.0)


def nonpositive(v: Tensor) -> Tensor:
    """min(v, 0)."""
    return v.clamp_max(0.0)


@dataclass(frozen=True)
class SaddleBlock:
    """A block of a saddle problem: `ascent` False (a min variable, v <- v - lr grad) or True (a max variable,
    v <- v + lr grad), then `clamp(v)` if given."""

    name: str
    ascent: bool = False
    clamp: Callable[[Tensor], Tensor] | None = None

    def update(self, value: Tensor, grad: Tensor, lr: float) -> Tensor:
        new = value + lr * grad if self.ascent else value - lr * grad
        return self.clamp(new) if self.clamp is not None else new


def descent_ascent_step(point: Mapping[str, Tensor], blocks: Sequence[SaddleBlock], gradient: GradientFn,
                        lr: float, groups: Sequence[Sequence[str]] | None = None) -> dict[str, Tensor]:
    """One descent-ascent step; returns the new point (the input is not modified).

    `gradient(point, names)` returns the partial gradients of the saddle function for `names` at `point`.
    `groups=None` is the Jacobi order (one group: all blocks, one gradient evaluation); otherwise the groups are
    updated in turn (Gauss-Seidel), each from the gradient at the partly updated point.
    """
    by_name = {b.name: b for b in blocks}
    order = [[b.name for b in blocks]] if groups is None else [list(g) for g in groups]
    covered = [n for g in order for n in g]
    if sorted(covered) != sorted(by_name):
        raise ValueError(f"groups must cover every block exactly once: blocks {sorted(by_name)}, groups {order}")
    current = dict(point)
    for group in order:
        grads = gradient(current, group)
        for name in group:
            current[name] = by_name[name].update(current[name], grads[name], lr)
    return current


def max_min_loop(y: Tensor, mu: Tensor, grad_y: Callable[[Tensor, Tensor], Tensor],
                 constraint: Callable[[Tensor], Tensor], *, rounds: int, inner_steps: int, lr_y: float,
                 lr_mu: float, mu_floor: float = 1e-5, tol: float = 1e-4,
                 project_y: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, int]:
    """max_{mu >= mu_floor} min_y L(y, mu) with L = phi(y) + mu^T h(y), from (y, mu) (BLOCC's inner loop):

        for t = 1..rounds:   Ty = inner_steps times: y <- Proj_Y(y - lr_y grad_y L(y, mu))   (stop if ||.|| < tol)
                             mu <- max(mu_floor, mu + lr_mu h(y))

    Exits when a round starts with ||grad_y L|| < tol and the projected mu-step moves mu by less than
    lr_mu * tol. Returns (y, mu, number of y-gradient evaluations).
    """
    evaluations = 0
    for _ in range(rounds):
        small = False
        for step in range(inner_steps):
            g = grad_y(y, mu)
            evaluations += 1
            if float(torch.linalg.vector_norm(g)) < tol:
                small = step == 0
                break
            y = y - lr_y * g
            if project_y is not None:
                y = project_y(y)
        new_mu = (mu + lr_mu * constraint(y)).clamp_min(mu_floor)
        moved = float(torch.linalg.vector_norm(new_mu - mu))
        mu = new_mu
        if small and moved < lr_mu * tol:
            break
    return y, mu, evaluations
