"""Lower-level solvers shared by the double-loop bilevel algorithms (stocBiO, AID-BiO, ITD-BiO, BSA, AmIGO...).

Two building blocks, written on plain callables so that they know nothing about problems, samplers or
algorithms (the algorithms wire them to their counted oracles and random streams):

- :class:`LowerSGD`: ``n_steps`` (stochastic) gradient steps on the lower problem from a given start
  (warm start = the previous iterate), each step on a fresh mini-batch::

      y^{t+1} = y^t - lr * grad_y g(x, y^t; zeta_t),    t = 0..n_steps-1

  stocBiO's D-loop (Ji, Yang & Liang, ICML 2021), AID-BiO's N-loop (Ji, Liu, Liang & Ying, NeurIPS 2022),
  the inner loops of BSA (Ghadimi & Wang 2018) and AmIGO (Arbel & Mairal, ICLR 2022), TTSA's single step.

- :func:`unrolled_hypergradient`: iterative differentiation (ITD-BiO; Maclaurin et al. 2015, Franceschi et al.
  2017, Ji et al. 2021/2022). The same steps are unrolled from a constant start y^0 and differentiated in
  reverse mode with ``torch.func``::

      h(x) = d/dx f(x, y^N(x)),   y^{t+1}(x) = y^t(x) - lr * grad_y g_t(x, y^t(x)),   y^0 fixed

  which costs N gradients forward and N Hessian-vector plus N cross products backward (memory O(N)).
  First-order ITD (FO-ITD-BiO) drops the dependence of y^N on x: its hypergradient is grad_x f(x, y^N), i.e.
  :class:`LowerSGD` followed by one upper gradient; no unrolling is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor
from torch.func import grad

from mbbo.validation import check_int, check_positive

__all__ = ["LowerSGD", "unrolled_hypergradient"]


@dataclass(frozen=True)
class LowerSGD:
    """``n_steps`` gradient steps y <- y - lr * grad(y) from ``y0``.

    ``grad(y)`` must return grad_y g(x, y; zeta) on a *fresh* mini-batch zeta at every call (SGD); with a
    full-batch sampler this is gradient descent. ``run`` returns the last iterate; ``n_steps = 0`` returns
    ``y0`` unchanged. Converges to y*(x) (up to noise) for 0 < lr < 2 / L_g; lr <= 1 / L_g is the usual
    choice.
    """

    n_steps: int = 10
    lr: float = 0.1

    def __post_init__(self) -> None:
        check_int("n_steps", self.n_steps, 0)
        check_positive("lr", self.lr)

    def run(self, grad_y: Callable[[Tensor], Tensor], y0: Tensor) -> Tensor:
        y = y0
        for _ in range(self.n_steps):
            y = y - self.lr * grad_y(y)
        return y


def unrolled_hypergradient(
    lower: Callable[[Tensor, Tensor, int], Tensor],
    upper: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y0: Tensor,
    n_steps: int,
    lr: float,
) -> tuple[Tensor, Tensor]:
    """Reverse-mode hypergradient through ``n_steps`` unrolled gradient steps (ITD-BiO).

    Args:
        lower: ``lower(x, y, t)`` -> g(x, y; zeta_t), the lower loss on the mini-batch of step t (a scalar).
        upper: ``upper(x, y)`` -> f(x, y; xi), the upper loss on its mini-batch (a scalar).
        x: the upper variable (any shape; the hypergradient has the same shape).
        y0: the start of the unrolled steps, treated as a constant (its dependence on x is ignored).
        n_steps: N >= 0 (N = 0 gives grad_x f(x, y0)).
        lr: the lower step size of the unrolled steps.

    Returns:
        (d/dx f(x, y^N(x)), y^N) with y^N detached (the warm start of the next outer iteration).
    """
    check_int("n_steps", n_steps, 0)
    check_positive("lr", lr)
    start = y0.detach()

    def objective(x_: Tensor) -> tuple[Tensor, Tensor]:
        y = start
        for t in range(n_steps):
            y = y - lr * grad(partial(_lower_at, lower, x_, t))(y)
        return upper(x_, y), y

    h, y_last = grad(objective, has_aux=True)(x)
    return h, y_last.detach()


def _lower_at(lower: Callable[[Tensor, Tensor, int], Tensor], x: Tensor, t: int, y: Tensor) -> Tensor:
    return lower(x, y, t)
