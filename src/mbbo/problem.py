"""Multi-block bilevel problems.

    min_x F(x) = (1/m) sum_i f_i(x, y_i*(x)),   y_i*(x) = argmin_y g_i(x, y),   i = 1..m.

m = 1 is the ordinary bilevel problem. The user writes the per-block losses as functions of
(x, y_i, batch, block) where `batch` is the mini-batch of one block (a dict of tensors) and `block` is
the block index (a 0-d long tensor, usable to index per-block constants). The engine vmaps them over the
sampled blocks, so they are written for one block only.

Variables are handled internally as flat vectors: x as (d_x,), the lower variables as a table (m, d_y).
`FlatLayout` converts between that and what the losses receive: a tensor of the user's shape, or, for an
`nn.Module`, a callable bound to the block's parameters (so an existing module plugs in unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from mbbo.distributed import BlockShard
from mbbo.state import StateFields

Batch = dict[str, Tensor]
LossFn = Callable[[Any, Any, Batch, Tensor], Tensor]


class BoundModule:
    """An `nn.Module` evaluated at given parameters: `bound(*inputs)` is `functional_call(module, params, inputs)`."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]) -> None:
        self.module = module
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self.params, args, kwargs)


class FlatLayout:
    """Flattens one variable (a tensor, or the parameters of an `nn.Module`) to a vector and back."""

    def __init__(self, shapes: dict[str, torch.Size] | torch.Size, module: nn.Module | None = None) -> None:
        self.shapes = shapes
        self.module = module
        sizes = [math.prod(s) for s in shapes.values()] if isinstance(shapes, dict) else [math.prod(shapes)]
        self.sizes = sizes
        self.dim = int(sum(sizes))

    @classmethod
    def of(cls, value: Tensor | nn.Module) -> FlatLayout:
        if isinstance(value, nn.Module):
            return cls({k: p.shape for k, p in value.named_parameters()}, module=value)
        return cls(value.shape)

    def flatten(self, value: Tensor | Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """(*batch, *shape) -> (*batch, dim); a dict of parameters is concatenated in layout order."""
        if isinstance(self.shapes, dict):
            assert isinstance(value, Mapping)
            parts = [value[k].reshape(*value[k].shape[:batch_dims], -1) for k in self.shapes]
            return torch.cat(parts, dim=-1)
        assert isinstance(value, Tensor)
        return value.reshape(*value.shape[:batch_dims], self.dim)

    def unflatten(self, flat: Tensor) -> Tensor | BoundModule:
        """(dim,) -> what the loss receives: a tensor of the user's shape or a bound module."""
        if not isinstance(self.shapes, dict):
            return flat.view(self.shapes)
        params = {k: p.view(s) for (k, s), p in zip(self.shapes.items(), flat.split(self.sizes), strict=True)}
        assert self.module is not None
        return BoundModule(self.module, params)

    def unflatten_params(self, flat: Tensor) -> dict[str, Tensor] | Tensor:
        """(*batch, dim) -> the user's structure with batch dims kept (a dict for modules)."""
        if not isinstance(self.shapes, dict):
            return flat.reshape(*flat.shape[:-1], *self.shapes)
        parts = flat.split(self.sizes, dim=-1)
        return {k: p.reshape(*flat.shape[:-1], *s) for (k, s), p in zip(self.shapes.items(), parts, strict=True)}


class BatchSampler(Protocol):
    """Draws one mini-batch per requested block: `sample(blocks (B,), generator) -> {key: (B, b, ...)}`."""

    def sample(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None) -> Batch: ...


ROW_SAMPLING = ("replacement", "reshuffle")


class BlockTable(Protocol):
    """Per-block constants that need not be stored: `shape` (leading m) and `table[blocks]` -> rows."""

    shape: tuple[int, ...]

    def __getitem__(self, blocks: Tensor) -> Tensor: ...


@dataclass
class RowSampler(StateFields):
    """Mini-batches of rows for each requested block.

    `data` maps names to tensors whose first dimension indexes rows (shared by all blocks), or, with
    `per_block=True`, whose first two dimensions are (m, n_rows) (each block has its own rows). The row
    indices are returned under `index` (shape (B, b)), which sparse upper variables use.

    `order="replacement"`: rows uniform with replacement, independently for each block and call.
    `order="reshuffle"` (shared rows only; the authors' BSVRB/RSVRB code): the rows are permuted once per data
    epoch and each call takes the next B*b rows of the permutation, block number k of the call getting rows
    [k b, (k+1) b) of that slice; a new permutation is drawn when fewer than B*b rows remain, i.e. every
    n // (B b) calls at a constant B. When B*b exceeds the n rows (a small validation set), a call takes
    ceil(B b / n) fresh permutations back to back (the authors' code assumes B b <= n). The permutation and
    position are state (`state_dict`, saved in the algorithm's checkpoint). `sample_initial` (estimator
    initialisation) draws with replacement and leaves that state alone, so the epochs of the iterations are
    the authors'.
    """

    state_fields = ("permutation", "position")

    data: dict[str, Tensor]
    batch_size: int
    per_block: bool = False
    order: str = "replacement"
    n_rows: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("RowSampler: data is empty; give at least one tensor")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.order not in ROW_SAMPLING:
            raise ValueError(f"row_sampling must be one of {ROW_SAMPLING}, got {self.order!r}")
        if self.order == "reshuffle" and self.per_block:
            raise ValueError("row_sampling='reshuffle' needs rows shared by all blocks (per_block=False)")
        lead = 1 if self.per_block else 0
        rows = {k: v.shape[lead] for k, v in self.data.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"RowSampler: tensors disagree on the number of rows: {rows}")
        self.n_rows = next(iter(rows.values()))
        if self.n_rows == 0:
            raise ValueError("RowSampler: the data has no rows")
        self._device = next(iter(self.data.values())).device
        self.permutation: Tensor | None = None
        self.position = 0  # rows of the current permutation already taken

    def sample(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None, *,
               keep: Tensor | None = None) -> Batch:
        """Rows for each of `blocks`; `keep` (positions in `blocks`) gathers the data of those blocks only,
        after drawing the rows of all of them (a block-sharded rank draws as the 1-process run does)."""
        return self.gather(blocks, self.draw(blocks, generator, batch_size), keep)

    def draw(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None) -> Tensor:
        """The row indices of `sample`, (len(blocks), b), on the data's device: advances the generator and the
        epoch as `sample` does, gathers no data."""
        if self.order == "replacement":
            return self.draw_initial(blocks, generator, batch_size)
        b = batch_size or self.batch_size
        need = blocks.shape[0] * b
        if need > self.n_rows:
            # more rows per call than the data holds (small validation sets): fresh permutations back to back,
            # so each row appears ceil(B b / n) times at most in the call; the next call starts a new epoch
            reps = -(-need // self.n_rows)
            perms = [torch.randperm(self.n_rows, generator=generator, device=generator.device) for _ in range(reps)]
            self.permutation, self.position = None, 0
            return torch.cat(perms)[:need].view(blocks.shape[0], b).to(self._device)
        if self.permutation is None or self.position + need > self.n_rows:
            self.permutation = torch.randperm(self.n_rows, generator=generator, device=generator.device)
            self.position = 0
        index = self.permutation[self.position: self.position + need].view(blocks.shape[0], b)
        self.position += need
        return index.to(self._device)

    def sample_initial(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None, *,
                       keep: Tensor | None = None) -> Batch:
        """Rows with replacement (the `replacement` order; initialisation batches under `reshuffle`)."""
        return self.gather(blocks, self.draw_initial(blocks, generator, batch_size), keep)

    def draw_initial(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None) -> Tensor:
        """The row indices of `sample_initial` (with replacement)."""
        b = batch_size or self.batch_size
        index = torch.randint(self.n_rows, (blocks.shape[0], b), generator=generator, device=generator.device)
        return index.to(self._device)

    def gather(self, blocks: Tensor, index: Tensor, keep: Tensor | None = None) -> Batch:
        """The data of rows `index` (len(blocks), b) of `blocks` (those at positions `keep` only, an index
        tensor), with the rows under "index"."""
        if keep is not None:
            index = index.index_select(0, keep.to(index.device))
        if self.per_block:
            kept = blocks if keep is None else blocks.index_select(0, keep.to(blocks.device))
            out = {k: v[kept[:, None].to(self._device), index] for k, v in self.data.items()}
        else:
            # index_select: about 3x faster than advanced indexing on cold rows of a large table
            flat = index.reshape(-1)
            out = {k: v.index_select(0, flat).view(*index.shape, *v.shape[1:]) for k, v in self.data.items()}
        out["index"] = index
        return out


@dataclass
class FullBatch:
    """Every row at every call (deterministic oracles): `data` rows shared by all blocks, or per block with
    `per_block=True` (leading dims (m, n)). Rows are returned under `index` as well."""

    data: dict[str, Tensor]
    per_block: bool = False

    def sample(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None) -> Batch:
        lead = 1 if self.per_block else 0
        n = next(iter(self.data.values())).shape[lead]
        device = next(iter(self.data.values())).device
        index = torch.arange(n, device=device).expand(blocks.shape[0], n)
        if self.per_block:
            out = {k: v[blocks.to(device)] for k, v in self.data.items()}
        else:
            out = {k: v.expand(blocks.shape[0], *v.shape) for k, v in self.data.items()}
        out["index"] = index
        return out


@dataclass
class NoiseSampler:
    """Gaussian noise batches: `{name: N(0, std^2) of shape (B, b, *shape)}`; for synthetic stochastic problems."""

    shapes: dict[str, tuple[int, ...]]
    batch_size: int
    std: float = 1.0
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"

    def sample(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None) -> Batch:
        b = batch_size or self.batch_size
        return {
            k: self.std * torch.randn(blocks.shape[0], b, *s, generator=generator, dtype=self.dtype,
                                      device=generator.device).to(self.device)
            for k, s in self.shapes.items()
        }


class MultiBlockProblem:
    """A multi-block bilevel problem (see module docstring).

    Args:
        upper_loss: f_i(x, y_i, batch, block) -> scalar (one block; vmapped by the engine).
        lower_loss: g_i(x, y_i, batch, block) -> scalar, strongly convex in y_i.
        x0: initial upper variable (tensor of any shape, or an `nn.Module` whose parameters are x).
        y0: initial lower variables: a tensor with leading dimension m, an `nn.Module` replicated on the m
            blocks (same initial parameters), or a list of m modules (stacked with `stack_module_state`).
        lower_sampler / upper_sampler: per-block mini-batch samplers for the lower and upper data.
        num_blocks: m; required when y0 is a single module.
        upper_depends_on_x: False when f_i(x, y) = f_i(y): skips grad_x f. Set automatically when the
            upper loss, evaluated once at construction, does not use x.
        block_data: per-block constants (tensors with leading dimension m, e.g. temperatures or coefficient
            matrices). The engine gathers the sampled blocks' rows before vmap and adds them to each block's
            batch under their names, so a loss reads `batch["A"]` instead of indexing by `block` (indexing a
            large tensor with a vmapped index inside the loss is slow or unsupported). A value may also be any
            `BlockTable` (`.shape`, `table[blocks]`), e.g. coefficients generated per block from a seed.
        sparse_x: x is one value per data row (e.g. one weight per training sample) and the losses receive
            only the rows of their mini-batch, x[batch['index']] of shape (b,). Gradients in x are then kept
            as (index, values) per block: no dense per-block x-sized tensors.
    """

    def __init__(
        self,
        upper_loss: LossFn,
        lower_loss: LossFn,
        x0: Tensor | nn.Module,
        y0: Tensor | nn.Module | list[nn.Module],
        lower_sampler: BatchSampler,
        upper_sampler: BatchSampler,
        *,
        num_blocks: int | None = None,
        upper_depends_on_x: bool = True,
        sparse_x: bool = False,
        block_data: Mapping[str, Tensor | BlockTable] | None = None,
        name: str = "problem",
    ) -> None:
        self.upper_loss = upper_loss
        self.lower_loss = lower_loss
        self.lower_sampler = lower_sampler
        self.upper_sampler = upper_sampler
        self.upper_depends_on_x = upper_depends_on_x
        self.sparse_x = sparse_x
        self.block_data = dict(block_data or {})
        self.name = name

        self.x_layout = FlatLayout.of(x0)
        x_flat = self.x_layout.flatten(dict(x0.named_parameters()) if isinstance(x0, nn.Module) else x0)
        self.x0 = x_flat.detach().clone()
        if sparse_x and isinstance(x0, nn.Module):
            raise ValueError("sparse_x=True needs x0 to be a tensor (one value per data row), not a module")

        if isinstance(y0, list):
            if not y0 or not all(isinstance(mod, nn.Module) for mod in y0):
                raise ValueError("y0 as a list must hold m >= 1 nn.Module objects")
            params, _ = stack_module_state(y0)
            self.y_layout = FlatLayout.of(y0[0])
            y_table = self.y_layout.flatten(params, batch_dims=1)
            m = len(y0)
        elif isinstance(y0, nn.Module):
            if num_blocks is None:
                raise ValueError("num_blocks is required when y0 is a single nn.Module (it is replicated m times)")
            self.y_layout = FlatLayout.of(y0)
            one = self.y_layout.flatten(dict(y0.named_parameters()))
            m = num_blocks
            y_table = one.detach().unsqueeze(0).repeat(m, 1)
        else:
            if y0.dim() < 1:
                raise ValueError(f"y0 must have a leading block dimension m, got a tensor of shape {tuple(y0.shape)}")
            m = y0.shape[0]
            if m < 1:
                raise ValueError(f"the number of blocks m must be >= 1, got y0 of shape {tuple(y0.shape)} (m = {m})")
            self.y_layout = FlatLayout(y0.shape[1:])
            y_table = y0.reshape(m, -1)
        if num_blocks is not None and num_blocks != m:
            raise ValueError(f"num_blocks={num_blocks} disagrees with y0, which holds {m} blocks")
        if m < 1:
            raise ValueError(f"the number of blocks m must be >= 1, got {m}")
        self.num_blocks = m
        # which blocks this process owns (all of them unless a multi-process run shards them: `mbbo.distributed`)
        self.shard = BlockShard(m)
        for key, value in self.block_data.items():
            if value.shape[0] != m:
                hint = ""
                if isinstance(y0, Tensor):
                    hint = (f"; m is the first dimension of y0, whose shape is {tuple(y0.shape)}: give y0 as "
                            f"(m, ...) with one row per block (e.g. y0.expand({value.shape[0]}, *y0.shape) for "
                            "equal starts)")
                raise ValueError(f"block_data[{key!r}] has leading dimension {value.shape[0]}, expected m = {m}{hint}")
        self.y0 = y_table.detach().clone().to(self.x0.dtype) if y_table.is_floating_point() else y_table
        self.y0 = self.y0.contiguous()

        for label, value in (("x0", self.x0), ("y0", self.y0)):
            if not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"{label} has {bad} non-finite entries (NaN or inf); initial values must be finite")
        self._probe()

    @property
    def dim_x(self) -> int:
        return self.x0.numel()

    @property
    def dim_y(self) -> int:
        return self.y0.shape[1]

    def x_for_loss(self, x_flat: Tensor) -> Any:
        return x_flat if self.sparse_x else self.x_layout.unflatten(x_flat)

    def y_for_loss(self, y_flat: Tensor) -> Any:
        return self.y_layout.unflatten(y_flat)

    def with_block_data(self, batch: Batch, blocks: Tensor) -> Batch:
        """Adds the sampled blocks' constants (leading dimension B) to a batch."""
        if not self.block_data:
            return batch
        return {**batch, **{k: v[blocks] for k, v in self.block_data.items()}}

    def _probe(self) -> None:
        """Evaluates both losses once on block 0 so that shape mistakes fail at construction, clearly; an
        upper loss that does not use x switches `upper_depends_on_x` off (grad_x f is then zero)."""
        gen = torch.Generator(device=self.x0.device).manual_seed(0)
        block = torch.zeros(1, dtype=torch.long, device=self.x0.device)
        for which, sampler, loss in (("lower_loss", self.lower_sampler, self.lower_loss),
                                     ("upper_loss", self.upper_sampler, self.upper_loss)):
            draw = getattr(sampler, "sample_initial", sampler.sample)  # leaves a reshuffling sampler's state alone
            batch = {k: v[0] for k, v in self.with_block_data(draw(block, gen, batch_size=2), block).items()}
            if self.sparse_x and "index" not in batch:
                raise ValueError(f"sparse_x=True but the sampler of {which} returns no 'index' entry")
            x_flat = self.x0.detach().clone().requires_grad_(self.x0.is_floating_point())
            x = x_flat[batch["index"]] if self.sparse_x else self.x_for_loss(x_flat)
            try:
                with torch.enable_grad():
                    value = loss(x, self.y_for_loss(self.y0[0]), batch, block[0])
            except (RuntimeError, IndexError, ValueError) as err:
                raise ValueError(
                    f"{which} failed on block 0 with y of shape {tuple(self.y0.shape[1:])} "
                    f"(flat dim {self.dim_y}) and x of shape {tuple(self.x0.shape)}: {err}"
                ) from err
            if not isinstance(value, Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{which} must return a scalar (0-d tensor) per block, got {shape}; "
                                 "check that y and the loss agree on shapes")
            if which == "upper_loss" and self.upper_depends_on_x and not _uses(value, x_flat):
                self.upper_depends_on_x = False  # f_i(x, y) = f_i(y): grad_x f is zero, not computed


def _uses(value: Tensor, x: Tensor) -> bool:
    """Whether `value` was computed from `x` (autograd reaches it)."""
    if not (value.requires_grad and x.requires_grad):
        return False
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    return grad is not None
