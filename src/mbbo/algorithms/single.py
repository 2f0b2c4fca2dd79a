"""Base class of the single-block (m = 1) solver zoo: flat x, y and squeezed oracles.

The zoo algorithms (stocBiO, AID/ITD-BiO, SOBA, SABA, MRBO, F2SA, BO-REP, ...) see one lower problem. They
use the same `MultiBlockProblem` with m = 1 and the same counted oracles, through helpers that drop the block
dimension: x is (d_x,), y and v are (d_y,), and the two-point forms take stacked points (P, d_x) / (P, d_y).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import BilevelAlgorithm, Hyper
from mbbo.linsolve import HVPFactory, Neumann
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.state import UNSET


class SingleBlockAlgorithm(BilevelAlgorithm):
    """An algorithm for min_x f(x, y*(x)), y*(x) = argmin_y g(x, y) (one block). Subclasses implement `step`.

    `restart_decayed`: the step sizes a restart (`re_<name>`) divides; momentum-like weights of the zoo
    (beta, alpha) keep their meaning and are not decayed.
    """

    @dataclass
    class State(BilevelAlgorithm.State):
        y: Tensor = UNSET

    restart_decayed: ClassVar[tuple[str, ...]] = ("lr", "lower_lr", "inner_lr", "linsys_lr")
    y: Tensor

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        reason = self.unsuitable_for(problem)
        if reason:
            raise ValueError(f"{self.name} cannot run on {problem.name}: {reason}")
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.y = problem.y0[0].clone()
        self.block = torch.zeros(1, dtype=torch.long, device=self.x.device)

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        if problem.num_blocks != 1:
            return (f"it is a single-block method and the problem has m = {problem.num_blocks} lower problems; "
                    "use a multi-block method (bsvrb_v1, bsvrb_v2, rsvrb, ma_v1, ma_v2) or m = 1")
        return None

    def lower_variables(self) -> Tensor:
        return self.y.unsqueeze(0)

    def advance(self, x_new: Tensor) -> None:
        """x_prev <- x, x <- x_new, iteration += 1: ends an iteration."""
        self.x_prev = self.x
        self.x = x_new
        self.iteration += 1

    # --- sampling --------------------------------------------------------------------------------------
    def lower_batch(self, batch_size: int | None = None, stream: str = "lower") -> Batch:
        return self.lower_sampler.sample(self.block, self.generators[stream], batch_size)

    def upper_batch(self, batch_size: int | None = None, stream: str = "upper") -> Batch:
        return self.upper_sampler.sample(self.block, self.generators[stream], batch_size)

    # --- oracles without the block dimension -----------------------------------------------------------
    @staticmethod
    def _points(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, bool]:
        """(d_x,), (d_y,) -> (1, d_x), (1, 1, d_y); stacked (P, d_x), (P, d_y) -> (P, d_x), (P, 1, d_y)."""
        single = x.dim() == 1
        xs = x.unsqueeze(0) if single else x
        ys = (y.unsqueeze(0) if single else y).unsqueeze(1)
        return xs, ys, single

    def _x_dense(self, xg: Any, single: bool) -> Tensor:
        out = xg.block_mean(self.problem.dim_x)
        return out[0] if single else out

    @staticmethod
    def _y(t: Tensor, single: bool) -> Tensor:
        return t[0, 0] if single else t[:, 0]

    def grad_y_g(self, x: Tensor, y: Tensor, batch: Batch) -> Tensor:
        xs, ys, single = self._points(x, y)
        return self._y(self.oracles.lower_grad(xs, ys, batch, self.block), single)

    def lower_grads(self, x: Tensor, y: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(grad_x g, grad_y g), x part dense."""
        xs, ys, single = self._points(x, y)
        gx, gy = self.oracles.lower_grads(xs, ys, batch, self.block)
        return self._x_dense(gx, single), self._y(gy, single)

    def upper_grads(self, x: Tensor, y: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(grad_x f (zeros when f ignores x), grad_y f)."""
        xs, ys, single = self._points(x, y)
        gx, gy = self.oracles.upper_grads(xs, ys, batch, self.block)
        gx_dense = torch.zeros_like(xs) if gx is None else gx.block_mean(self.problem.dim_x)
        return (gx_dense[0] if single else gx_dense), self._y(gy, single)

    def lower_products(self, x: Tensor, y: Tensor, v: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(grad_y g, (grad_yy g) v, (grad_xy g) v) from one graph."""
        xs, ys, single = self._points(x, y)
        vs = (v.unsqueeze(0) if single else v).unsqueeze(1)
        gy, hv, jv = self.oracles.lower_products(xs, ys, vs, batch, self.block)
        return self._y(gy, single), self._y(hv, single), self._x_dense(jv, single)

    def hvp(self, x: Tensor, y: Tensor, v: Tensor, batch: Batch) -> Tensor:
        xs, ys, single = self._points(x, y)
        vs = (v.unsqueeze(0) if single else v).unsqueeze(1)
        return self._y(self.oracles.hvp(xs, ys, vs, batch, self.block), single)

    def cross(self, x: Tensor, y: Tensor, w: Tensor, batch: Batch) -> Tensor:
        xs, ys, single = self._points(x, y)
        ws = (w.unsqueeze(0) if single else w).unsqueeze(1)
        return self._x_dense(self.oracles.cross(xs, ys, ws, batch, self.block), single)

    def hvp_operator(self, x: Tensor, y: Tensor, batch: Batch) -> Callable[[Tensor], Tensor]:
        """v -> (grad_yy g(x, y; batch)) v, for `mbbo.linsolve` solvers (v of shape (d_y,) or (k, d_y))."""
        def apply(v: Tensor) -> Tensor:
            if v.dim() == 1:
                return self.hvp(x, y, v, batch)
            return torch.stack([self.hvp(x, y, row, batch) for row in v])
        return apply

    def hvp_source(self, x: Tensor, y: Tensor, batch_size: int | None = None, stream: str = "extra"
                   ) -> Callable[[int], Callable[[Tensor], Tensor]]:
        """j -> an HVP operator on a fresh lower mini-batch (independent Neumann terms)."""
        return lambda j: self.hvp_operator(x, y, self.lower_batch(batch_size, stream))

    # --- pieces shared by several methods (lower loops, Neumann hypergradients) --------------------------------
    def _batch_size(self) -> int | None:
        """The config's `batch_size` (None: the samplers'), for methods that have one."""
        return getattr(self.config, "batch_size", None)

    def lower_grad_fn(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """y -> grad_y G(x, y; zeta) on a fresh lower mini-batch at each call."""
        return lambda y: self.grad_y_g(x, y, self.lower_batch(self._batch_size()))

    def neumann_hypergradient(self, x: Tensor, y: Tensor, solver: Neumann) -> Tensor:
        """grad_x F(x, y; xi) - (grad_xy G(x, y; zeta)) v, v = solver's Neumann approximation of
        (grad_yy G)^{-1} grad_y F(x, y; xi), each term on a fresh mini-batch of the "extra" stream.

        x, y may be stacked points (P, d_x), (P, d_y): then every point sees the same samples xi, zeta, the same
        HVP batches and the same random truncation level (STORM needs the same sample at two points).
        """
        bs = self._batch_size()
        gx_f, gy_f = self.upper_grads(x, y, self.upper_batch(bs))

        def make(j: int) -> Callable[[Tensor], Tensor]:
            batch = self.lower_batch(bs, stream="extra")
            return lambda v: self.hvp(x, y, v, batch)

        v = solver.solve(HVPFactory(make), gy_f, generator=self.generators["extra"]).v
        return gx_f - self.cross(x, y, v, self.lower_batch(bs))

    # --- raw losses (unbatched, for unrolled differentiation such as ITD-BiO) ----------------------------
    def lower_value(self, x: Tensor, y: Tensor, batch: Batch) -> Tensor:
        """g(x, y; batch) for flat x, y and a batch of the single block (leading block dim removed)."""
        pb = self.problem
        b = {k: v[0] for k, v in pb.with_block_data(batch, self.block).items()}
        xl = x[b["index"]] if pb.sparse_x else pb.x_for_loss(x)
        return pb.lower_loss(xl, pb.y_for_loss(y), b, self.block[0])

    def upper_value(self, x: Tensor, y: Tensor, batch: Batch) -> Tensor:
        pb = self.problem
        b = {k: v[0] for k, v in pb.with_block_data(batch, self.block).items()}
        xl = x[b["index"]] if pb.sparse_x and pb.upper_depends_on_x else (x if pb.sparse_x else pb.x_for_loss(x))
        return pb.upper_loss(xl, pb.y_for_loss(y), b, self.block[0])
