"""Per-block tables: block sampling, and lower variables that move every iteration but are touched lazily.

Several multi-block methods update *every* block's lower variable at every iteration with a direction that
changes only when the block is sampled (BSVRB: y_i <- y_i - tau s_i; BSVRB_v2: v_i <- Proj(v_i - tau_v u_i);
RSVRB: y_i <- y_i - tau s_i with s_i decaying by (1 - beta) while unsampled). `MovingBlocks` stores each
block's value at the iteration it was last written and replays the missed steps in closed form when the
block is read again, so an iteration costs O(B) blocks instead of O(m). `lazy=False` runs the literal
all-block update instead (used to test that both agree).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mbbo.projections import project_ball


class BlockSampler:
    """Draws B distinct blocks out of m, uniformly, independently at each iteration (B = m: all blocks)."""

    def __init__(self, num_blocks: int, block_batch: int) -> None:
        if not isinstance(block_batch, int) or not 1 <= block_batch <= num_blocks:
            raise ValueError(
                f"block_batch must be an integer in [1, m] = [1, {num_blocks}], got {block_batch!r}")
        self.num_blocks = num_blocks
        self.block_batch = block_batch

    def sample(self, generator: torch.Generator, device: torch.device) -> Tensor:
        if self.block_batch == self.num_blocks:
            return torch.arange(self.num_blocks, device=device)
        perm = torch.randperm(self.num_blocks, generator=generator, device=generator.device)
        return perm[: self.block_batch].to(device)


class MovingBlocks:
    """Per-block variables w_i moved at every iteration along a per-block direction d_i:

        w_i <- Proj(w_i - step * d_i)   for all i,   then d_i <- decay * d_i for unsampled i,

    where d_i is replaced only when block i is sampled (`write`). Proj is the ball of `radius` (or none).
    Lazy mode keeps (w_i, d_i) as of the last write at iteration c_i and reads w at iteration t as the
    (t - c_i)-fold update: w_c - step * d_c * sum_{j<k} decay^j in closed form when no projection is
    active along the way (checked exactly: the path is a segment, inside the ball iff its end is), and by
    replaying the k projected steps, vectorised over the blocks that need it, otherwise.
    """

    def __init__(self, values: Tensor, directions: Tensor, step: float, *, radius: float | None = None,
                 decay: float = 1.0, lazy: bool = True) -> None:
        self.values = values.clone()
        self.directions = directions.clone()
        self.step = float(step)
        self.radius = radius
        self.decay = float(decay)
        self.lazy = lazy
        self.stamps = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
        self.previous = self.values.clone() if not lazy else None

    # --- closed forms -------------------------------------------------------------------------------
    def _weight(self, k: Tensor) -> Tensor:
        """sum_{j<k} decay^j (= k without decay)."""
        kf = k.to(self.values.dtype)
        if self.decay == 1.0:
            return kf
        return (1.0 - self.decay**kf) / (1.0 - self.decay)

    def _expand(self, w: Tensor, like: Tensor) -> Tensor:
        return w.view(-1, *([1] * (like.dim() - 1)))

    def _replay(self, start: Tensor, direction: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Exact k-fold projected steps for each row; returns (w after k steps, w after k-1 steps)."""
        cur, prev = start.clone(), start.clone()
        d = direction.clone()
        for j in range(1, int(k.max()) + 1):
            active = self._expand(k >= j, cur)
            nxt = cur - self.step * d
            if self.radius is not None:
                nxt = project_ball(nxt, self.radius)
            prev = torch.where(active, cur, prev)
            cur = torch.where(active, nxt, cur)
            d = d * self.decay
        return cur, prev

    def read(self, blocks: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(w_i at iteration t, w_i at iteration t - 1) for the given blocks (before this iteration's move)."""
        if not self.lazy:
            return self.values[blocks], self.previous[blocks]  # type: ignore[index]
        start, direction = self.values[blocks], self.directions[blocks]
        k = t - self.stamps[blocks]
        cur = start - self.step * self._expand(self._weight(k), start) * direction
        prev = start - self.step * self._expand(self._weight((k - 1).clamp_min(0)), start) * direction
        if self.radius is not None:
            outside = torch.linalg.vector_norm(cur, dim=-1) > self.radius
            if bool(outside.any()):
                rows = outside.nonzero().squeeze(-1)
                c, p = self._replay(start[rows], direction[rows], k[rows])
                cur, prev = cur.index_copy(0, rows, c), prev.index_copy(0, rows, p)
        return cur, prev

    def direction(self, blocks: Tensor, t: int) -> Tensor:
        """d_i as it stands during iteration t before this iteration's write (decayed while unsampled)."""
        if not self.lazy or self.decay == 1.0:
            return self.directions[blocks]
        k = (t - 1 - self.stamps[blocks]).clamp_min(0)
        return self.directions[blocks] * self._expand(self.decay ** k.to(self.values.dtype),
                                                      self.directions[blocks])

    def write(self, blocks: Tensor, current: Tensor, new_directions: Tensor, t: int) -> None:
        """Stores w_i at iteration t (as read) and its new direction; the move of iteration t is implied."""
        self.values[blocks] = current
        self.directions[blocks] = new_directions
        self.stamps[blocks] = t

    def end_iteration(self, sampled: Tensor, t: int) -> None:
        """Eager mode only: move every block now (lazy mode needs nothing)."""
        if self.lazy:
            return
        if self.decay != 1.0:
            # unsampled directions decay at this iteration; the sampled ones were just written
            fresh = torch.zeros(self.values.shape[0], dtype=torch.bool, device=self.values.device)
            fresh[sampled] = True
            self.directions = torch.where(self._expand(fresh, self.directions), self.directions,
                                          self.directions * self.decay)
        self.previous = self.values.clone()
        moved = self.values - self.step * self.directions
        self.values = project_ball(moved, self.radius) if self.radius is not None else moved
        self.stamps.fill_(t + 1)

    def current_all(self, t: int) -> Tensor:
        """Every block's value at iteration t (O(m); for evaluation)."""
        return self.read(torch.arange(self.values.shape[0], device=self.values.device), t)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values, "directions": self.directions, "stamps": self.stamps,
                "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = state["values"].clone()
        self.directions = state["directions"].clone()
        self.stamps = state["stamps"].clone()
        self.previous = None if state["previous"] is None else state["previous"].clone()
