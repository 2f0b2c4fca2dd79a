"""Per-block evaluation with bounded memory, for tasks whose metric is a mean over the m blocks.

- Blocks (and, inside a task, data rows) are processed in chunks sized so that the working set stays under
  `EVAL_BUDGET_BYTES` (256 MB) whatever m is.
- `eval_blocks = K` evaluates a seeded random subset of K of the m blocks (drawn once, the same at every
  evaluation) and reports the standard error of the mean beside each mean:
      sem = s / sqrt(K) * sqrt(1 - K / m)   (s: the sample standard deviation over the K blocks; the
      finite-population factor makes it 0 when every block is evaluated).
- Block-sharded runs (`mbbo.distributed`): each process evaluates the blocks it owns (`owned_blocks`) and
  `gather_block_rows` puts the per-block values of all processes back in the order of the evaluated blocks, so
  the means, standard errors and best block are computed from the same per-block values as in 1 process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

EVAL_BUDGET_BYTES = 256 * 2**20
# blocks evaluated when eval_blocks is "auto": every block up to this many, else a seeded subset of this size
AUTO_EVAL_BLOCKS = 1000
# the subset's random stream: seed * 1_000_003 + EVAL_STREAM, no algorithm stream (offsets 0-3 and 99, see
# `mbbo.algorithms.base`) for any pair of seeds
EVAL_STREAM = 1000


def check_eval_blocks(value: Any) -> None:
    """eval_blocks is None (all blocks), "auto" or a positive integer."""
    ok = value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not ok:
        raise ValueError(f"eval_blocks must be None (all blocks), 'auto' or an integer >= 1, got {value!r}")


def evaluation_blocks(num_blocks: int, eval_blocks: int | str | None, seed: int,
                      device: torch.device | str = "cpu") -> Tensor | None:
    """The blocks to evaluate, sorted: None for all m; else a seeded uniform subset of min(K, m) blocks
    ("auto": K = AUTO_EVAL_BLOCKS), from a stream of its own (`EVAL_STREAM`): were it seeded like an
    algorithm's block stream (seed * 1_000_003 + 0), a reshuffling block sampler's first permutation would be
    the same one, and the first K / B iterations would visit exactly the evaluated blocks, then none of them
    for the rest of the permutation."""
    check_eval_blocks(eval_blocks)
    k = AUTO_EVAL_BLOCKS if eval_blocks == "auto" else eval_blocks
    if k is None or k >= num_blocks:
        return None
    assert isinstance(k, int)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + EVAL_STREAM)
    return torch.randperm(num_blocks, generator=gen)[:k].sort().values.to(device)


def block_chunks(blocks: Tensor | None, num_blocks: int, chunk: int,
                 device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """The evaluated blocks (all m when `blocks` is None) as index tensors of at most `chunk` blocks."""
    total = num_blocks if blocks is None else blocks.shape[0]
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        yield torch.arange(start, stop, device=device) if blocks is None else blocks[start:stop]


def rows_per_chunk(elements_per_row: int, element_size: int, copies: int = 4, budget: int | None = None) -> int:
    """How many rows of `elements_per_row` elements fit the budget (default EVAL_BUDGET_BYTES) with `copies`
    temporaries alive."""
    budget = EVAL_BUDGET_BYTES if budget is None else budget
    return max(1, budget // max(1, elements_per_row * element_size * copies))


def lower_rows(algorithm: Any, blocks: Tensor) -> Tensor:
    """The algorithm's current lower variables of the given blocks: `lower_variables_of(blocks)` when it has it
    (O(len(blocks))), else rows of `lower_variables()` (single-block methods, m = 1)."""
    of = getattr(algorithm, "lower_variables_of", None)
    if callable(of):
        return of(blocks)
    return algorithm.lower_variables()[blocks]


def block_shard(algorithm: Any) -> Any:
    """The algorithm's `BlockShard` (None for algorithms without a problem that has one)."""
    return getattr(getattr(algorithm, "problem", None), "shard", None)


def owned_blocks(algorithm: Any, blocks: Tensor) -> Tensor:
    """The blocks among `blocks` that this process evaluates: all of them unless blocks are sharded."""
    shard = block_shard(algorithm)
    if shard is None or not shard.distributed:
        return blocks
    return blocks[shard.owned(blocks)]


def gather_block_rows(algorithm: Any, blocks: Tensor, values: list[Tensor]) -> list[Tensor]:
    """Per-block `values` (leading dimension: the owned blocks of `blocks`, in order) completed with the other
    processes' rows, in the order of `blocks` (one collective; `values` itself in a 1-process run)."""
    shard = block_shard(algorithm)
    if shard is None or not shard.distributed:
        return values
    return shard.gather([(v, 0) for v in values], blocks)


def mean_and_sem(values: Tensor, population: int) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-block values sampled without replacement from `population`
    blocks (see the module docstring); sem is 0 when every block is in `values`, NaN for a single block."""
    k = values.shape[0]
    mean = float(values.mean())
    if k >= population:
        return mean, 0.0
    if k < 2:
        return mean, math.nan
    return mean, float(values.std() / math.sqrt(k) * math.sqrt(1.0 - k / population))
