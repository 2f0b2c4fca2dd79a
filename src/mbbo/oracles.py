"""First- and second-order oracles of a multi-block problem, built on `torch.func`.

Every oracle is evaluated on the sampled blocks at once (vmap over blocks) and at P points on the same
mini-batch (vmap over points): STORM/MSVR need (x_t, y_t) and (x_{t-1}, y_{t-1}) on one sample, and get
both from one call. Shapes: x (P, d_x), lower variables y (P, B, d_y), batch tensors (B, b, ...),
blocks (B,). Results carry the leading (P, B) dimensions.

Sign convention of the library: v solves (grad_yy g) v = grad_y f; hypergradient = grad_x f - (grad_xy g) v.

Hessian-vector and cross products come from one vjp of grad_y g at (x, y) with cotangent v: it returns
grad_y g itself, (grad_yy g) v and (grad_xy g) v (one double-backward graph).

Sparse upper variables (`problem.sparse_x`): the losses see x[batch['index']] only, so products and
gradients in x come as `XGrad(values (P, B, b), index (B, b))` instead of dense (P, B, d_x) tensors.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from mbbo.compilation import TimedCompiled, enable_persistent_cache
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.second_order import grad_and_hessian

ORACLE_KINDS = ("grad_x_f", "grad_y_f", "grad_x_g", "grad_y_g", "hvp", "cross", "hessian_yy", "jacobian_xy")


@dataclass
class XGrad:
    """Per-block quantities in x space: dense (P, B, d_x) with index None, or sparse values (P, B, b) at
    rows `index` (B, b) of x."""

    values: Tensor
    index: Tensor | None = None

    def block_mean(self, dim_x: int, weights: Tensor | None = None) -> Tensor:
        """(1/B) sum over blocks (or a weighted sum) as a dense (P, d_x) tensor."""
        w = weights if weights is not None else torch.full(
            (self.values.shape[1],), 1.0 / self.values.shape[1], dtype=self.values.dtype,
            device=self.values.device)
        if self.index is None:
            return torch.einsum("pb...,b->p...", self.values, w)
        vals = self.values * w.view(1, -1, *([1] * (self.values.dim() - 2)))
        out = self.values.new_zeros(self.values.shape[0], dim_x)
        return out.index_add_(1, self.index.reshape(-1), vals.reshape(vals.shape[0], -1))

    def point(self, p: int) -> XGrad:
        return XGrad(self.values[p].unsqueeze(0), self.index)


def _lift(out: Tensor | tuple) -> Tensor | tuple:
    """Adds the (point, block) dimensions of size one back to an unvmapped result."""
    if isinstance(out, tuple):
        return tuple(_lift(o) for o in out)
    return out.unsqueeze(0).unsqueeze(0)


class Oracles:
    """Counted, vmapped oracles of a `MultiBlockProblem`.

    A count is one evaluation of one oracle on one block's mini-batch at one point; an explicit Hessian
    (`lower_hessian`, `lower_second_order`) counts once per block and point although the vmap inside it batches
    d_y VJPs (see `mbbo.second_order`, whose `hessian_mode` it takes). `compile=True` wraps
    each vmapped oracle in `torch.compile` (one-off compile time of tens of seconds per oracle and shape, kept in
    persistent caches and reported as `compile_seconds`; measured about 2x faster per iteration on T1, see
    benchmarks/ and `mbbo.compilation`).
    """

    def __init__(self, problem: MultiBlockProblem, *, compile: bool = False, hessian_mode: str = "reverse"
                 ) -> None:
        self.problem = problem
        self._gathered: Batch = {}
        self._gathered_for: Tensor | None = None
        self.counts: Counter[str] = Counter({k: 0 for k in ORACLE_KINDS})
        self.counting = True  # off while a compiled update runs (`mbbo.compilation.TimedCompiled` adds its counts)
        pb = problem

        def g(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
            return pb.lower_loss(pb.x_for_loss(x), pb.y_for_loss(y), batch, block)

        def f(x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
            return pb.upper_loss(pb.x_for_loss(x), pb.y_for_loss(y), batch, block)

        grad_y_g = grad(g, argnums=1)

        def lower_grad(x, y, batch, block):
            return grad_y_g(x, y, batch, block)

        def lower_products(x, y, v, batch, block):
            gy, pullback = vjp(lambda x_, y_: grad_y_g(x_, y_, batch, block), x, y)
            jv, hv = pullback(v)
            return gy, hv, jv

        def hvp(x, y, v, batch, block):
            _, pullback = vjp(lambda y_: grad_y_g(x, y_, batch, block), y)
            return pullback(v)[0]

        def lower_grads(x, y, batch, block):
            return grad(g, argnums=(0, 1))(x, y, batch, block)

        def cross(x, y, w, batch, block):
            _, pullback = vjp(lambda x_: grad_y_g(x_, y, batch, block), x)
            return pullback(w)[0]

        # explicit second-order blocks (`mbbo.second_order`): one vmapped VJP per y-coordinate gives a row of H
        # (and a column of grad_xy g); reverse over reverse compiles under vmap and is the faster one here
        lower_hessian = grad_and_hessian(grad_y_g, mode=hessian_mode)
        lower_second_order = grad_and_hessian(grad_y_g, cross=True, mode=hessian_mode)

        def upper_grads(x, y, batch, block):
            if pb.upper_depends_on_x:
                return grad(f, argnums=(0, 1))(x, y, batch, block)
            return (grad(f, argnums=1)(x, y, batch, block),)

        self._fns = {
            "lower_grad": (lower_grad, 1),
            "lower_products": (lower_products, 2),
            "cross": (cross, 2),
            "hvp": (hvp, 2),
            "lower_grads": (lower_grads, 1),
            "lower_hessian": (lower_hessian, 1),
            "lower_second_order": (lower_second_order, 1),
            "upper_grads": (upper_grads, 1),
        }
        self._eager = {name: self._vmap(fn, n_vec) for name, (fn, n_vec) in self._fns.items()}
        self._vmapped = self._eager
        self.compiled = False
        if compile:
            self.use_compiled()

    def use_compiled(self) -> None:
        """Switch to `torch.compile`d oracles (same values; compiled at their first call per shape, into the
        persistent caches of `mbbo.compilation`). Safe at any point of a run: the oracles hold no state."""
        if self.compiled:
            return
        enable_persistent_cache()
        # a block-sharded process holds a varying number of the sampled blocks: one symbolic block dimension
        dynamic = None if self.problem.shard.distributed else False
        self._vmapped = {name: TimedCompiled(fn, dynamic=dynamic) for name, fn in self._eager.items()}
        self.compiled = True

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Within the block, eager oracles even when compiled (one-off work such as the estimators'
        initialisation, whose shapes the run does not repeat: compiling them would cost more than it saves)."""
        compiled, self._vmapped = self._vmapped, self._eager
        try:
            yield
        finally:
            self._vmapped = compiled

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the calls of the compiled oracles that compiled (`TimedCompiled`)."""
        return sum(fn.seconds for fn in self._vmapped.values() if isinstance(fn, TimedCompiled))

    def _vmap(self, fn, n_vec: int):
        """vmap over points (inner) and blocks (outer); args x, y, [v], batch, block; results (P, B, ...).

        Points inside: within one block the mini-batch is not batched over points, so `X @ y` becomes one
        matrix product X @ [y_t, y_{t-1}] instead of copies of X broadcast over the points.
        """
        over_points = vmap(fn, in_dims=(0, *([0] * n_vec), None, None))
        x_dim_blocks = 1 if self.problem.sparse_x else None
        return vmap(over_points, in_dims=(x_dim_blocks, *([1] * n_vec), 0, 0), out_dims=1)

    def with_block_data(self, batch: Batch, blocks: Tensor) -> Batch:
        """`batch` with the constants of the blocks at table rows `blocks` (`MultiBlockProblem.with_block_data`;
        the oracles then take it as is). For a batch that several oracles share, and for a compiled update,
        which cannot hold `_block_data`'s cache test."""
        return {**batch, **self._block_data(self.problem.shard.global_ids(blocks))}

    def _has_block_data(self, batch: Batch) -> bool:
        return all(k in batch for k in self.problem.block_data)

    def _block_data(self, blocks: Tensor) -> Batch:
        """The sampled blocks' constants, gathered once per block sample (several oracles share it)."""
        if self._gathered_for is None or not (blocks is self._gathered_for or (
                blocks.shape == self._gathered_for.shape and bool((blocks == self._gathered_for).all()))):
            self._gathered = self.problem.with_block_data({}, blocks)
            self._gathered_for = blocks
        return self._gathered

    def _call(self, name: str, x: Tensor, *args: Tensor, batch: Batch, blocks: Tensor):
        # `blocks` are the table rows of the calling method: the block ids, or this process's local rows
        # when blocks are sharded (`mbbo.distributed.BlockShard`); block data and losses get the block ids
        shard = self.problem.shard
        if blocks.shape[0] == 0:
            return self._call_empty(name, x, *args, batch=batch, blocks=blocks)
        blocks = shard.global_ids(blocks)
        if not self._has_block_data(batch):
            batch = {**batch, **self._block_data(blocks)}
        # sharded: always vmapped, so that a block's result does not depend on how many blocks a process holds
        if args[0].shape[0] == 1 and blocks.shape[0] == 1 and not self.compiled and not shard.distributed:
            # one point, one block (single-block methods): call the function itself, no vmap overhead
            x1 = x[0, 0] if self.problem.sparse_x else x[0]
            out = self._fns[name][0](x1, *(a[0, 0] for a in args), {k: v[0] for k, v in batch.items()}, blocks[0])
            return _lift(out)
        return self._vmapped[name](x, *args, batch, blocks)

    def _call_empty(self, name: str, x: Tensor, *args: Tensor, batch: Batch, blocks: Tensor):
        """Results of shape (P, 0, ...) for no block (a sharded process that owns none of the sampled
        blocks): vmap cannot run over zero blocks, so one zero block of block 0 is evaluated and dropped."""
        def one(t: Tensor, dim: int) -> Tensor:
            return t.new_zeros((*t.shape[:dim], 1, *t.shape[dim + 1:]))

        x1 = one(x, 1) if self.problem.sparse_x else x
        out = self._call(name, x1, *(one(a, 1) for a in args), batch={k: one(v, 0) for k, v in batch.items()},
                         blocks=torch.zeros(1, dtype=blocks.dtype, device=blocks.device))
        if isinstance(out, tuple):
            return tuple(o[:, :0] for o in out)
        return out[:, :0]

    def _x_args(self, x: Tensor, batch: Batch) -> Tensor:
        """Dense x (P, d_x) as is; sparse x gathered to the batch rows (P, B, b) before vmap."""
        if not self.problem.sparse_x:
            return x
        return x[:, batch["index"]]

    def _wrap_x(self, values: Tensor, batch: Batch) -> XGrad:
        return XGrad(values, batch["index"] if self.problem.sparse_x else None)

    def _count(self, n: int, *kinds: str) -> None:
        if not self.counting:
            return
        for kind in kinds:
            self.counts[kind] += n

    # --- the oracles -------------------------------------------------------------------------------
    def lower_grad(self, x: Tensor, y: Tensor, batch: Batch, blocks: Tensor) -> Tensor:
        """grad_y g_i: (P, B, d_y)."""
        self._count(y.shape[0] * y.shape[1], "grad_y_g")
        return self._call("lower_grad", self._x_args(x, batch), y, batch=batch, blocks=blocks)

    def lower_products(self, x: Tensor, y: Tensor, v: Tensor, batch: Batch, blocks: Tensor
                       ) -> tuple[Tensor, Tensor, XGrad]:
        """(grad_y g_i, (grad_yy g_i) v_i, (grad_xy g_i) v_i) from one graph."""
        self._count(y.shape[0] * y.shape[1], "grad_y_g", "hvp", "cross")
        gy, hv, jv = self._call("lower_products", self._x_args(x, batch), y, v, batch=batch, blocks=blocks)
        return gy, hv, self._wrap_x(jv, batch)

    def hvp(self, x: Tensor, y: Tensor, v: Tensor, batch: Batch, blocks: Tensor) -> Tensor:
        """(grad_yy g_i) v_i only: (P, B, d_y)."""
        self._count(y.shape[0] * y.shape[1], "hvp")
        return self._call("hvp", self._x_args(x, batch), y, v, batch=batch, blocks=blocks)

    def lower_grads(self, x: Tensor, y: Tensor, batch: Batch, blocks: Tensor) -> tuple[XGrad, Tensor]:
        """(grad_x g_i, grad_y g_i): first-order methods (F2SA, penalties)."""
        self._count(y.shape[0] * y.shape[1], "grad_x_g", "grad_y_g")
        gx, gy = self._call("lower_grads", self._x_args(x, batch), y, batch=batch, blocks=blocks)
        return self._wrap_x(gx, batch), gy

    def cross(self, x: Tensor, y: Tensor, w: Tensor, batch: Batch, blocks: Tensor) -> XGrad:
        """(grad_xy g_i) w_i."""
        self._count(y.shape[0] * y.shape[1], "cross")
        return self._wrap_x(self._call("cross", self._x_args(x, batch), y, w, batch=batch, blocks=blocks), batch)

    def lower_hessian(self, x: Tensor, y: Tensor, batch: Batch, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """(grad_y g_i (P, B, d_y), explicit grad_yy g_i (P, B, d_y, d_y)), for small d_y."""
        self._count(y.shape[0] * y.shape[1], "grad_y_g", "hessian_yy")
        return self._call("lower_hessian", self._x_args(x, batch), y, batch=batch, blocks=blocks)

    def lower_second_order(self, x: Tensor, y: Tensor, batch: Batch, blocks: Tensor
                           ) -> tuple[Tensor, Tensor, XGrad]:
        """(grad_y g_i, explicit grad_yy g_i (P, B, d_y, d_y), explicit grad_xy g_i (P, B, d_x_local, d_y));
        for sparse x the Jacobian holds the batch rows `index` only."""
        self._count(y.shape[0] * y.shape[1], "grad_y_g", "hessian_yy", "jacobian_xy")
        gy, hess, jac = self._call("lower_second_order", self._x_args(x, batch), y, batch=batch, blocks=blocks)
        return gy, hess, self._wrap_x(jac, batch)

    def upper_grads(self, x: Tensor, y: Tensor, batch: Batch, blocks: Tensor) -> tuple[XGrad | None, Tensor]:
        """(grad_x f_i or None when f does not depend on x, grad_y f_i)."""
        n = y.shape[0] * y.shape[1]
        if self.problem.sparse_x and not self.problem.upper_depends_on_x:
            # f ignores x: its batch rows need not index x (e.g. validation rows), so pass an empty slice.
            xb = x.new_zeros(x.shape[0], y.shape[1], 0)
        else:
            xb = self._x_args(x, batch)
        out = self._call("upper_grads", xb, y, batch=batch, blocks=blocks)
        if self.problem.upper_depends_on_x:
            self._count(n, "grad_x_f", "grad_y_f")
            return self._wrap_x(out[0], batch), out[1]
        self._count(n, "grad_y_f")
        return None, out[0]

    def reset_counts(self) -> None:
        for k in self.counts:
            self.counts[k] = 0
