"""Per-client oracles of a federated bilevel problem, vmapped over clients with ``torch.func``.

Each method takes the points of k clients — x as (d_x,) (shared, e.g. the server's) or (k, d_x) (one per
client), y as (d_y,) or (k, d_y) — and a :data:`~mbbo.federated.data.ClientBatch` with a leading client
dimension, and returns one row per client. Hessian-vector and cross products come from one reverse-over-reverse
graph of <grad_y g, v> (never a Hessian or Jacobian matrix). Calls are counted per client and kind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from mbbo.federated.data import ClientBatch, FederatedProblem

__all__ = ["ClientOracles"]


class ClientOracles:
    """Vmapped f_i / g_i derivatives; ``counts`` holds per-client evaluations by kind."""

    def __init__(self, problem: FederatedProblem) -> None:
        self.problem = problem
        self.counts: Counter[str] = Counter()
        f, g = problem.upper_loss, problem.lower_loss

        def hv_and_jv(x: Tensor, y: Tensor, v: Tensor, b: ClientBatch) -> tuple[Tensor, Tensor]:
            inner = grad(lambda xx, yy: torch.dot(grad(g, argnums=1)(xx, yy, b), v), argnums=(0, 1))(x, y)
            return inner[1], inner[0]

        def hv(x: Tensor, y: Tensor, v: Tensor, b: ClientBatch) -> Tensor:
            return grad(lambda yy: torch.dot(grad(g, argnums=1)(x, yy, b), v))(y)

        self._gy_g = vmap(grad(g, argnums=1))
        self._g_f = vmap(grad(f, argnums=(0, 1)))
        self._gx_f = vmap(grad(f, argnums=0))
        self._hv = vmap(hv)
        self._hv_jv = vmap(hv_and_jv)
        self._f_val = vmap(f)

    @staticmethod
    def _rows(t: Tensor, k: int) -> Tensor:
        return t.expand(k, *t.shape) if t.dim() == 1 else t

    def _call(self, kind: str, fn: Callable[..., Any], k: int, empty: Any, *args: Tensor, batch: ClientBatch
              ) -> Any:
        if k == 0:  # a process owning none of the sampled clients
            return empty
        self.counts[kind] += k
        return fn(*(self._rows(a, k) for a in args), batch)

    def _k(self, batch: ClientBatch) -> int:
        return batch["weight"].shape[0]

    def _empty(self, d: int, like: Tensor) -> Tensor:
        return like.new_zeros((0, d))

    def grad_y_g(self, x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        """grad_y g_i(x_i, y_i), (k, d_y)."""
        k = self._k(batch)
        return self._call("grad_y_g", self._gy_g, k, self._empty(y.shape[-1], y), x, y, batch=batch)

    def upper_grads(self, x: Tensor, y: Tensor, batch: ClientBatch) -> tuple[Tensor, Tensor]:
        """(grad_x f_i, grad_y f_i), (k, d_x) and (k, d_y)."""
        k = self._k(batch)
        empty = (self._empty(x.shape[-1], x), self._empty(y.shape[-1], y))
        return self._call("grad_f", self._g_f, k, empty, x, y, batch=batch)

    def grad_x_f(self, x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        """grad_x f_i, (k, d_x)."""
        k = self._k(batch)
        return self._call("grad_x_f", self._gx_f, k, self._empty(x.shape[-1], x), x, y, batch=batch)

    def hvp(self, x: Tensor, y: Tensor, v: Tensor, batch: ClientBatch) -> Tensor:
        """(grad_yy g_i) v_i, (k, d_y)."""
        k = self._k(batch)
        return self._call("hvp", self._hv, k, self._empty(y.shape[-1], y), x, y, v, batch=batch)

    def hvp_and_cross(self, x: Tensor, y: Tensor, v: Tensor, batch: ClientBatch) -> tuple[Tensor, Tensor]:
        """((grad_yy g_i) v_i, (grad_xy g_i) v_i) from one graph, (k, d_y) and (k, d_x)."""
        k = self._k(batch)
        empty = (self._empty(y.shape[-1], y), self._empty(x.shape[-1], x))
        return self._call("hvp_cross", self._hv_jv, k, empty, x, y, v, batch=batch)

    def cross(self, x: Tensor, y: Tensor, v: Tensor, batch: ClientBatch) -> Tensor:
        """(grad_xy g_i) v_i, (k, d_x)."""
        return self.hvp_and_cross(x, y, v, batch)[1]

    def upper_value(self, x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        """f_i(x_i, y_i), (k,)."""
        k = self._k(batch)
        return self._call("f", self._f_val, k, x.new_zeros(0), x, y, batch=batch)
