"""Finite-sum variance reduction: SAGA memory tables, SARAH/SPIDER recursive estimators, access to the rows.

These building blocks serve the variance-reduced bilevel solvers of a finite-sum problem
F(w) = sum_i w_i q_i(w) over n "slots" i (one slot per sample, or per fixed mini-batch):

- :class:`SAGATable` (Defazio, Bach & Lacoste-Julien, NeurIPS 2014): a memory of the last value seen for every
  slot and their weighted average. SABA (Dagreou et al., NeurIPS 2022) keeps one table per oracle.
- :class:`SARAH` (Nguyen et al., ICML 2017; SPIDER, Fang et al., NeurIPS 2018): the recursive estimate
  d_t = d_{t-1} + q(w_t; xi_t) - q(w_{t-1}; xi_t) with a full refresh every `period` steps. SRBA (Dagreou et al.,
  AISTATS 2024) and VRBO (Yang, Ji & Liang, NeurIPS 2021) use it.
- :class:`FiniteSumRows`: the rows behind a `RowSampler` / `FullBatch` sampler, gathered as engine batches: fixed
  mini-batch partitions, per-sample batches (b rows as b blocks of one row, for per-sample oracle values) and
  exact weighted full passes.
- :class:`EpochCycler`: a checkpointable cycle through fixed mini-batch indices, reshuffled every epoch (the
  benchopt sampler's behaviour, without its repeated last batch).

Everything here is algorithm-agnostic: tensors in, tensors out, state as tensors (``state_dict`` clones).

Assumption for exactness of full passes and per-sample values: a loss on a batch is the mean over its rows of a
per-row loss, plus terms that do not depend on the rows (regularisers). Then the loss on the union of disjoint
batches B_k is sum_k |B_k|/n * loss(B_k), and the same holds for every derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.problem import Batch, FullBatch, RowSampler
from mbbo.state import StateFields

__all__ = [
    "SARAH",
    "EpochCycler",
    "FiniteSumRows",
    "SAGATable",
    "benchopt_period",
    "distinct_rows",
    "weighted_sum",
]


# ----------------------------------------------------------------------------------------------------------
# SAGA


class SAGATable(StateFields):
    """SAGA memory over `num_slots` slots of a finite sum Q(w) = sum_i weights_i q_i(w).

    State: ``table`` (num_slots, *shape), the last value stored for each slot (zeros at start), and
    ``average`` = sum_i weights_i table_i, kept up to date incrementally. One update with the fresh values
    q_s(w_t) of the sampled slots S (distinct) returns the SAGA direction::

        d = average + sum_{s in S} (weights_s / inclusion_s) (q_s(w_t) - table_s)

    then stores ``average += sum_s weights_s (q_s(w_t) - table_s)`` and ``table_s = q_s(w_t)``.
    ``inclusion_s`` is the probability that slot s is in S (1/K for one of K slots drawn uniformly, b/n for b
    distinct samples out of n), so d is an unbiased estimate of Q(w_t) whatever the memory holds, and d = Q(w_t)
    exactly when every slot holds its value at w_t ("fresh" memory).

    - one slot per sample: ``SAGATable.uniform(n, shape)``, S = b distinct rows, inclusion b/n: d = average +
      (1/b) sum_s (q_s - table_s), the classic mini-batch SAGA;
    - one slot per fixed mini-batch B_k (benchopt's SABA): weights |B_k|/n, one slot per step, inclusion 1/K;
      for equal batch sizes the factor weights/inclusion is 1 and d = q_k - table_k + average, benchopt's rule.

    The table stores any fixed-shape value: vectors, matrices, or several oracles concatenated along the last
    dimension (the update is linear, so a concatenation is exactly one table per part).
    """

    state_fields = ("table", "average")

    def __init__(self, weights: Tensor, shape: Sequence[int] | torch.Size, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty vector (one per slot), got shape {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        dtype = dtype or weights.dtype
        device = device if device is not None else weights.device
        self.weights = weights.to(dtype=dtype, device=device)
        self.shape = torch.Size(shape)
        self.table = torch.zeros(weights.numel(), *self.shape, dtype=dtype, device=device)
        self.average = torch.zeros(self.shape, dtype=dtype, device=device)

    @classmethod
    def uniform(cls, num_slots: int, shape: Sequence[int] | torch.Size, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> SAGATable:
        """Slots of equal weight 1/num_slots (the average of the table)."""
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {num_slots!r}")
        return cls(torch.full((num_slots,), 1.0 / num_slots, dtype=dtype, device=device), shape)

    @property
    def num_slots(self) -> int:
        return self.weights.numel()

    def _check(self, slots: Tensor, values: Tensor) -> None:
        if slots.dim() != 1:
            raise ValueError(f"slots must be a vector of slot indices, got shape {tuple(slots.shape)}")
        if values.shape != (slots.numel(), *self.shape):
            raise ValueError(f"values must have shape {(slots.numel(), *self.shape)}, got {tuple(values.shape)}")
        if slots.numel() > 1 and torch.unique(slots).numel() != slots.numel():
            raise ValueError("slots of one update must be distinct (sample without replacement)")

    def update(self, slots: Tensor, values: Tensor, inclusion: float | Tensor) -> Tensor:
        """SAGA direction for fresh `values` (k, *shape) of the distinct `slots` (k,), then stores them.

        ``inclusion``: probability that each slot is sampled (a float, or a tensor (k,) per slot).
        """
        self._check(slots, values)
        incl = torch.as_tensor(inclusion, dtype=values.dtype, device=values.device)
        if bool((incl <= 0).any()) or bool((incl > 1).any()):
            raise ValueError(f"inclusion probabilities must lie in (0, 1], got {inclusion!r}")
        diff = values - self.table[slots]
        w = self.weights[slots]
        expand = (-1, *([1] * len(self.shape)))
        direction = self.average + ((w / incl).reshape(expand) * diff).sum(0)
        self.average = self.average + (w.reshape(expand) * diff).sum(0)
        self.table[slots] = values
        return direction

    def store(self, slots: Tensor, values: Tensor) -> None:
        """Writes `values` into `slots` and updates the average, without a direction (memory initialisation)."""
        self._check(slots, values)
        diff = values - self.table[slots]
        self.average = self.average + (self.weights[slots].reshape(-1, *([1] * len(self.shape))) * diff).sum(0)
        self.table[slots] = values

    def reset(self) -> None:
        """Empty memory (zeros), as at construction."""
        self.table = torch.zeros_like(self.table)
        self.average = torch.zeros_like(self.average)

    def recompute_average(self) -> Tensor:
        """sum_i weights_i table_i from scratch (the incremental ``average`` equals it up to rounding)."""
        return torch.einsum("n,n...->...", self.weights, self.table)


# ----------------------------------------------------------------------------------------------------------
# SARAH / SPIDER


@dataclass(frozen=True)
class SARAH:
    """Recursive (SARAH / SPIDER) estimator with a periodic full refresh::

        d_t = Q(w_t)                                   if t mod period == 0   (full batch, or a large batch)
        d_t = d_{t-1} + q(w_t; xi_t) - q(w_{t-1}; xi_t)   otherwise           (same sample xi_t at both points)

    Nguyen, Liu, Scheinberg & Takac (ICML 2017), SARAH; Fang, Li, Lin & Zhang (NeurIPS 2018), SPIDER. The two
    values on one sample come from one two-point oracle call. `t` counts the steps since the start (or since a
    restart); ``period = 1`` refreshes at every step, i.e. full-batch gradients. The estimate is biased
    (E[d_t] = Q(w_t) only along the recursion's expectation), which is why it is refreshed.
    """

    period: int

    def __post_init__(self) -> None:
        if not isinstance(self.period, int) or isinstance(self.period, bool) or self.period < 1:
            raise ValueError(f"period must be an integer in [1, inf), got {self.period!r}")

    def refresh_due(self, t: int) -> bool:
        return t % self.period == 0

    def update(self, d: Tensor, new: Tensor, old: Tensor) -> Tensor:
        return d + (new - old)


def benchopt_period(n_inner: int, n_outer: int, period_frac: float, batch_size: int) -> int:
    """benchopt's SRBA / VRBO period, int((n_inner + n_outer) * period_frac / batch_size), at least 1."""
    return max(1, int((n_inner + n_outer) * period_frac / batch_size))


# ----------------------------------------------------------------------------------------------------------
# rows of a finite-sum problem


def weighted_sum(parts: Sequence[tuple[float, Any]]) -> Any:
    """sum_k w_k out_k over outputs that are tensors or (nested) tuples of tensors (None stays None)."""
    def combine(items: list[tuple[float, Any]]) -> Any:
        first = items[0][1]
        if first is None:
            return None
        if isinstance(first, tuple):
            return tuple(combine([(w, o[i]) for w, o in items]) for i in range(len(first)))
        total = items[0][0] * first
        for w, o in items[1:]:
            total = total + w * o
        return total

    if not parts:
        raise ValueError("weighted_sum of no parts")
    return combine(list(parts))


class FiniteSumRows:
    """The n rows behind a finite-sum sampler of a single-block problem, served as engine batches.

    Accepts a :class:`~mbbo.problem.RowSampler` or :class:`~mbbo.problem.FullBatch` (rows shared by all blocks, or
    ``per_block=True`` data, of which block `block` is used). Batches have the engine's layout: a leading block
    dimension of 1 (``(1, b, ...)``) and the row numbers under ``index``, as the samplers return them.
    """

    def __init__(self, sampler: Any, block: int = 0) -> None:
        reason = self.unsupported(sampler)
        if reason:
            raise ValueError(reason)
        data: dict[str, Tensor] = sampler.data
        self.data = {k: (v[block] if sampler.per_block else v) for k, v in data.items()}
        self.n_rows = next(iter(self.data.values())).shape[0]
        self.device = next(iter(self.data.values())).device

    @staticmethod
    def unsupported(sampler: Any) -> str | None:
        """Why `sampler` is not a finite sum of rows (None when it is)."""
        if isinstance(sampler, RowSampler | FullBatch):
            return None
        return (f"needs a finite-sum problem whose samplers draw rows of stored data (RowSampler or FullBatch), "
                f"got a {type(sampler).__name__}")

    def gather(self, index: Tensor) -> Batch:
        """The rows `index` (b,) as one mini-batch: tensors (1, b, ...), ``index`` (1, b)."""
        index = index.to(self.device)
        out = {k: v[index].unsqueeze(0) for k, v in self.data.items()}
        out["index"] = index.unsqueeze(0)
        return out

    def per_sample(self, index: Tensor) -> Batch:
        """The rows `index` (b,) as b mini-batches of one row: tensors (b, 1, ...), ``index`` (b, 1).

        Evaluated with block indices zeros(b) (all rows belong to block 0), the vmapped oracles then return one
        value per row: the per-sample quantities a SAGA table per sample needs.
        """
        index = index.to(self.device)
        out = {k: v[index].unsqueeze(1) for k, v in self.data.items()}
        out["index"] = index.unsqueeze(1)
        return out

    def partition(self, batch_size: int) -> list[Tensor]:
        """Fixed contiguous mini-batches [k b, min((k+1) b, n)), the last one possibly smaller."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        rows = torch.arange(self.n_rows, device=self.device)
        return list(rows.split(batch_size))

    def full_pass(self, fn: Callable[[Batch], Any], chunk_size: int | None = None) -> Any:
        """The full-batch value of `fn` (an oracle on one mini-batch, returning tensors or tuples of tensors):
        sum over contiguous chunks of (chunk size / n) * fn(chunk); one chunk of all rows when chunk_size is None."""
        chunks = self.partition(chunk_size or self.n_rows)
        return weighted_sum([(c.numel() / self.n_rows, fn(self.gather(c))) for c in chunks])


class EpochCycler(StateFields):
    """Cycles through K fixed mini-batch indices, in a fresh random order every epoch.

    benchopt's sampler does the same with two differences that are not reproduced: its first epoch is in the
    natural order, and an off-by-one makes every epoch draw K + 1 batches (the last one twice).
    """

    state_fields = ("order", "position")

    def __init__(self, num_batches: int) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        self.num_batches = num_batches
        self.order = torch.zeros(num_batches, dtype=torch.long)
        self.position = num_batches  # the first draw starts an epoch

    def next(self, generator: torch.Generator) -> int:
        if self.position >= self.num_batches:
            self.order = torch.randperm(self.num_batches, generator=generator, device=generator.device).cpu()
            self.position = 0
        k = int(self.order[self.position])
        self.position += 1
        return k


def distinct_rows(n_rows: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """`batch_size` distinct rows out of n, uniformly (each row is included with probability b/n)."""
    if batch_size > n_rows:
        raise ValueError(f"batch_size {batch_size} exceeds the number of rows {n_rows}")
    return torch.randperm(n_rows, generator=generator, device=generator.device)[:batch_size]

