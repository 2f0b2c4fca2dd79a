"""Per-block tables: block sampling, and lower variables that move every iteration but are touched lazily.

Several multi-block methods update *every* block's lower variable at every iteration with a direction that
changes only when the block is sampled (BSVRB: y_i <- y_i - tau s_i; BSVRB_v2: v_i <- Proj(v_i - tau_v u_i);
RSVRB: y_i <- y_i - tau s_i with s_i decaying by (1 - beta) while unsampled). `MovingBlocks` stores each
block's value at the iteration it was last written and replays the missed steps in closed form when the
block is read again, so an iteration costs O(B) blocks instead of O(m). `lazy=False` runs the literal
all-block update instead (used to test that both agree).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbbo.projections import project_ball
from mbbo.state import StateFields
from mbbo.validation import check_choice

BLOCK_SAMPLING = ("uniform", "reshuffle")

# blocks per chunk in O(m) passes (initialisation, evaluation): bounds their temporaries
CHUNK_BLOCKS = 8192


def block_chunks(num_blocks: int, chunk: int, device: torch.device | str = "cpu") -> list[Tensor]:
    """The block ids 0..m-1 as consecutive index tensors of at most `chunk` blocks."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return [torch.arange(s, min(s + chunk, num_blocks), device=device) for s in range(0, num_blocks, chunk)]


class BlockSampler(StateFields):
    """Draws B distinct blocks out of m at each iteration.

    `mode="uniform"`: B distinct blocks uniformly, independently at each iteration (B = m: all blocks, in order).
    Cost O(B) whatever m: B indices are drawn with replacement and repeats are redrawn (sequential rejection,
    which yields a uniformly random ordered B-subset); expected draws B m / (m - B) <= 2B for B <= m / 2.
    For B > m / 2 a permutation of the m blocks is cheaper and is used instead.
    `mode="reshuffle"` (the authors' code, BSVRB_ICML2023 HO/main.py): a random permutation of the m blocks is
    consumed B blocks per iteration and redrawn every m // B iterations, so every block is sampled once per
    window of m // B iterations and delays are at most 2 m / B - 1. The permutation and the position in it are
    state (`state_dict`); drawing it costs O(m) once every m // B iterations, i.e. amortised O(B).

    `strata=S` (an mbbo extension, not in the paper; S = 1 is the sampling above, unchanged): stratified sampling
    over the S residue classes {i : i mod S = s}. Each iteration draws B / S blocks from every class, by `mode`
    within the class (its m / S blocks; reshuffle: one permutation per class, all redrawn every m // B
    iterations); the sample lists one block of each class in turn. S must divide m and B, so every block is
    still sampled with probability B / m and the block mean stays unbiased. A block-sharded run whose R ranks
    own the blocks i mod R (`mbbo.distributed.BlockShard`) with R dividing S then gives every rank exactly B / R
    of the sampled blocks at every iteration: no rank waits for a busier one (uniform sampling over all blocks
    leaves the ranks E|n_0 - n_1| ~ 0.8 sqrt(B) blocks apart at R = 2). Uniform mode draws all classes at once
    (`distinct_uniform`); reshuffle draws S permutations every m // B iterations.
    """

    state_fields = ("order", "position")

    def __init__(self, num_blocks: int, block_batch: int, mode: str = "uniform", strata: int = 1) -> None:
        if not isinstance(block_batch, int) or not 1 <= block_batch <= num_blocks:
            raise ValueError(
                f"block_batch must be an integer in [1, m] = [1, {num_blocks}], got {block_batch!r}")
        check_choice("block_sampling", mode, BLOCK_SAMPLING)
        check_block_strata(strata, num_blocks, block_batch)
        self.num_blocks = num_blocks
        self.block_batch = block_batch
        self.mode = mode
        self.strata = strata
        self.order: Tensor | None = None  # reshuffle: the current permutation of each class, one after the other
        self.position = 0  # reshuffle: iterations taken from it

    @property
    def period(self) -> int:
        """Iterations per permutation in reshuffle mode: m // B."""
        return self.num_blocks // self.block_batch

    def sample(self, generator: torch.Generator, device: torch.device) -> Tensor:
        s = self.strata
        n, k = self.num_blocks // s, self.block_batch // s  # blocks per class, and drawn from each
        if self.mode == "reshuffle":
            if self.order is None or self.position == self.period:
                self.order = torch.cat([torch.randperm(n, generator=generator, device=generator.device)
                                        for _ in range(s)])
                self.position = 0
            start = self.position * k
            self.position += 1
            within = self.order.view(s, n)[:, start: start + k]
        else:
            within = distinct_uniform(n, k, generator, rows=s)
        if s == 1:
            return within[0].to(device)
        classes = torch.arange(s, device=within.device)
        return (within.T * s + classes).reshape(-1).to(device)


def check_block_strata(strata: object, num_blocks: int, block_batch: int) -> None:
    """`block_strata` S (`BlockSampler`): a positive integer dividing both m and B (ValueError naming them)."""
    if isinstance(strata, bool) or not isinstance(strata, int) or strata < 1:
        raise ValueError(f"block_strata must be a positive integer, got {strata!r}")
    if num_blocks % strata or block_batch % strata:
        raise ValueError(
            f"block_strata = {strata} must divide the number of blocks m = {num_blocks} and block_batch B = "
            f"{block_batch} (B / S blocks drawn from each of S classes of m / S blocks); use a common divisor "
            "of m and B, e.g. the number of processes, or 1")


def distinct_uniform(n: int, k: int, generator: torch.Generator, rows: int = 1) -> Tensor:
    """`rows` independent uniformly random ordered k-subsets of [0, n) (all of them, in order, when k = n),
    (rows, k) on the generator's device. For k <= n / 2, sequential rejection vectorised over the rows (O(rows k)
    expected): each row keeps its first occurrences in order and draws the missing values at its end, until no
    value repeats; a permutation per row otherwise. One row draws from the stream what the sampler always drew."""
    gdev = generator.device
    if k == n:
        return torch.arange(n, device=gdev).repeat(rows, 1)
    if 2 * k > n:
        return torch.stack([torch.randperm(n, generator=generator, device=gdev)[:k] for _ in range(rows)])
    drawn = torch.randint(n, (rows, k), generator=generator, device=gdev)
    offsets = n * torch.arange(rows, device=gdev).unsqueeze(1)  # values of different rows never collide
    while True:
        repeat = ~first_occurrences((drawn + offsets).view(-1)).view(rows, k)
        missing = int(repeat.sum())
        if missing == 0:
            return drawn
        order = torch.sort(repeat.to(torch.uint8), dim=1, stable=True).indices  # kept values first, in order
        drawn = drawn.gather(1, order)
        drawn[repeat.gather(1, order)] = torch.randint(n, (missing,), generator=generator, device=gdev)


def first_occurrences(values: Tensor) -> Tensor:
    """Boolean mask of the entries of a 1-d tensor that do not repeat an earlier entry (O(n log n))."""
    order = torch.sort(values, stable=True).indices
    ranked = values[order]
    repeat = torch.zeros_like(values, dtype=torch.bool)
    repeat[order[1:]] = ranked[1:] == ranked[:-1]
    return ~repeat


class MovingBlocks(StateFields):
    """Per-block variables w_i moved at every iteration along a per-block direction d_i:

        w_i <- Proj(w_i - step * d_i)   for all i,   then d_i <- decay * d_i for unsampled i,

    where d_i is replaced only when block i is sampled (`write`). Proj is the ball of `radius` (or none).
    Lazy mode keeps (w_i, d_i) as of the last write at iteration c_i and reads w at iteration t as the
    (t - c_i)-fold update: w_c - step * d_c * sum_{j<k} decay^j in closed form when no projection is
    active along the way (checked exactly: the path is a segment, inside the ball iff its end is), and by
    replaying the k projected steps, vectorised over the blocks that need it, otherwise.
    """

    state_fields = ("values", "directions", "stamps", "previous", "step")

    def __init__(self, values: Tensor, directions: Tensor, step: float, *, radius: float | None = None,
                 decay: float = 1.0, lazy: bool = True, copy: bool = True) -> None:
        """`values`: w at iteration 0; `directions`: d as it stands before iteration 0 (d_{-1}); `copy=False`
        takes both tensors over (they are then modified in place) instead of copying them."""
        self.values = values.clone() if copy else values
        # lazy storage keeps the direction of the stamp's iteration: d_0 = decay * d_{-1} for every block
        if lazy and decay != 1.0:
            self.directions = directions * decay if copy else directions.mul_(decay)
        else:
            self.directions = directions.clone() if copy else directions
        self.step = float(step)
        self.radius = radius
        self.decay = float(decay)
        self.lazy = lazy
        self.stamps = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
        self.previous = self.values.clone() if not lazy else None
        self._last_write: tuple[Tensor, ...] = ()

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
        """Exact k-fold projected steps with a decaying direction for each row, step by step; returns (w after
        k steps, w after k-1 steps). (Without a decay: `ball_path_rows`.)"""
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

    def _segment(self, start: Tensor, direction: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(w after k unprojected steps, w after max(k - 1, 0) steps) from each row's start, in one pass."""
        weights = self._weight(torch.stack([k, (k - 1).clamp_min(0)]))
        both = start - self.step * weights.view(2, -1, *([1] * (start.dim() - 1))) * direction
        return both[0], both[1]

    def _outside(self, rows: Tensor) -> Tensor:
        return torch.linalg.vector_norm(rows, dim=-1) > self.radius  # type: ignore[operator]

    def _closed_form(self, blocks: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(start rows, directions, steps k since the stamps, w now, w before) by the unprojected closed form."""
        start, direction = self.values[blocks], self.directions[blocks]
        k = t - self.stamps[blocks]
        return start, direction, k, *self._segment(start, direction, k)

    def read(self, blocks: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """(w_i at iteration t, w_i at iteration t - 1) for the given blocks (before this iteration's move). `t` may
        be a 0-d tensor: in a compiled update the read is then part of the graph (the projected replays of
        paths without a decay run in the opaque `replay_ball_paths`, under `torch.cond`; with a decay they break
        the graph)."""
        if not self.lazy:
            return self.values[blocks], self.previous[blocks]  # type: ignore[index]
        start, direction, k, cur, prev = self._closed_form(blocks, t)
        if self.radius is None:
            return cur, prev
        if self.decay == 1.0 and torch.compiler.is_compiling():
            # in a compiled update's graph: the replays (an opaque operator) run only when a path left the ball
            step, radius = self.step, self.radius

            def replayed(*rows: Tensor) -> tuple[Tensor, Tensor]:
                return replay_ball_paths(*rows, step, radius)

            def segments(start: Tensor, direction: Tensor, k: Tensor, cur: Tensor, prev: Tensor
                         ) -> tuple[Tensor, Tensor]:
                return cur.clone(), prev.clone()

            # (cur and prev are views of one tensor, and a branch's operands must not alias)
            return torch.cond(self._outside(cur).any(), replayed, segments,
                              (start, direction, k, cur.clone(), prev.clone()))
        if self.decay == 1.0:
            return ball_path_rows(start, direction, k, cur, prev, self.step, self.radius)
        outside = self._outside(cur)
        if bool(outside.any()):
            rows = outside.nonzero().squeeze(-1)
            c, p = self._replay(start[rows], direction[rows], k[rows])
            cur, prev = cur.index_copy(0, rows, c), prev.index_copy(0, rows, p)
        return cur, prev

    def direction(self, blocks: Tensor, t: int | Tensor) -> Tensor:
        """d_i as it stands during iteration t before this iteration's write (decayed while unsampled)."""
        if not self.lazy or self.decay == 1.0:
            return self.directions[blocks]
        k = t - 1 - self.stamps[blocks]  # -1 only at t = 0, undoing the stored initial decay
        return self.directions[blocks] * self._expand(self.decay ** k.to(self.values.dtype),
                                                      self.directions[blocks])

    def write(self, blocks: Tensor, current: Tensor, new_directions: Tensor, t: int) -> None:
        """Stores w_i at iteration t (as read) and its new direction; the move of iteration t is implied."""
        self.values[blocks] = current
        self.directions[blocks] = new_directions
        self.stamps[blocks] = t
        self._last_write = (current, new_directions)

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

    def current(self, blocks: Tensor, t: int) -> Tensor:
        """The given blocks' values at iteration t."""
        return self.read(blocks, t)[0]

    def current_all(self, t: int, chunk: int = CHUNK_BLOCKS) -> Tensor:
        """Every block's value at iteration t (O(m); for evaluation), computed `chunk` blocks at a time so that
        the temporaries stay small next to the (m, d) result."""
        out = torch.empty_like(self.values)
        for rows in block_chunks(self.values.shape[0], chunk, self.values.device):
            out[rows] = self.read(rows, t)[0]
        return out

    def last_write_finite(self) -> bool:
        """Whether the rows stored by the last `write` (values and directions) are finite: the O(B) part of a
        NaN/inf guard (the other rows were checked when they were written)."""
        written = self._last_write if self.lazy else (self.values, self.directions)
        return all(bool(torch.isfinite(w).all()) for w in written)

    def nbytes(self) -> int:
        """Bytes held by the table (values, directions, stamps and, in eager mode, the previous values)."""
        return sum(v.numel() * v.element_size() for v in self.state_dict().values() if isinstance(v, Tensor))


class DelayedBlocks(StateFields):
    """Per-block variables moved only when their block is sampled, by all the steps it missed at once:

        i sampled at t:  w_i <- Proj(w_i - step * dc_i * d_i),   dc_i = t - (iteration of i's last update)

    with d_i the direction just written (the authors' BSVRB_v2 rule, BSVRB_ICML2023 HO/main.py, where dc_i is
    their `delay_count + 1`). Unsampled blocks do not move. Not equal to `MovingBlocks`: a sampled block's
    oracles see its stored (not caught-up) value, and the dc_i missed steps all use the fresh direction.
    Same interface as `MovingBlocks`; `read` gives (w_i now, w_i at the previous iteration), the latter being
    the value before the last update for blocks updated at t - 1. O(B) blocks per iteration.
    """

    state_fields = ("values", "before", "directions", "stamps", "step")

    def __init__(self, values: Tensor, directions: Tensor, step: float, *, radius: float | None = None,
                 start: int = 0, copy: bool = True) -> None:
        """`copy=False` takes `values` and `directions` over (modified in place) instead of copying them."""
        self.values = values.clone() if copy else values
        self.before = values.clone()
        self.directions = directions.clone() if copy else directions
        self.step = float(step)
        self.radius = radius
        # as if every block had been updated just before `start` (dc = 1 at a block's first update)
        self.stamps = torch.full((values.shape[0],), start - 1, dtype=torch.long, device=values.device)
        self._last_write: tuple[Tensor, ...] = ()

    def read(self, blocks: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        cur = self.values[blocks]
        just_updated = (self.stamps[blocks] == t - 1).view(-1, *([1] * (cur.dim() - 1)))
        return cur, torch.where(just_updated, self.before[blocks], cur)

    def current(self, blocks: Tensor, t: int) -> Tensor:
        """The given blocks' stored values (unsampled blocks do not move)."""
        return self.values[blocks]

    def direction(self, blocks: Tensor, t: int | Tensor) -> Tensor:
        return self.directions[blocks]

    def delays(self, blocks: Tensor, t: int) -> Tensor:
        """dc_i = 1 + iterations since block i was last updated."""
        return t - self.stamps[blocks]

    def write(self, blocks: Tensor, current: Tensor, new_directions: Tensor, t: int) -> None:
        """Stores the new direction and moves the sampled blocks by their dc_i missed steps."""
        dc = self.delays(blocks, t).to(current.dtype).view(-1, *([1] * (current.dim() - 1)))
        moved = current - self.step * dc * new_directions
        if self.radius is not None:
            moved = project_ball(moved, self.radius)
        # values before `before`: in this order Inductor writes both in place in a compiled update (the other
        # order copied the whole `before` table, O(m) per iteration)
        self.values[blocks] = moved
        self.before[blocks] = current
        self.directions[blocks] = new_directions
        self.stamps[blocks] = t
        self._last_write = (moved, new_directions)

    def end_iteration(self, sampled: Tensor, t: int) -> None:
        """Nothing: unsampled blocks do not move."""

    def current_all(self, t: int, chunk: int = CHUNK_BLOCKS) -> Tensor:
        """Every block's stored value (O(m); for evaluation)."""
        return self.values.clone()

    def last_write_finite(self) -> bool:
        """Whether the rows moved and stored by the last `write` are finite (O(B), as `MovingBlocks`)."""
        return all(bool(torch.isfinite(w).all()) for w in self._last_write)

    def nbytes(self) -> int:
        """Bytes held by the table (values, values before the last update, directions, stamps)."""
        return sum(v.numel() * v.element_size() for v in self.state_dict().values() if isinstance(v, Tensor))


def ball_path(start: Tensor, direction: Tensor, step: float, radius: float, k: int) -> tuple[Tensor, Tensor]:
    """(w_k, w_{k-1}) of w_{j+1} = Proj_{||w|| <= R}(w_j - step d) from w_0 = `start` (||w_0|| <= R), exactly.

    The path stays in the plane of w_0 and d. With e = d / ||d||, c = step ||d||, w = alpha e + beta e_2: the
    unprojected segment alpha_j = alpha_0 - j c leaves the ball at a step known in closed form; from there on
    the iterate stays on the sphere (a step from a point with alpha < c / 2 leaves the ball, and projecting
    it gives alpha < 0), and only the ratio rho = -alpha / beta changes: rho <- rho + (c / R) sqrt(1 + rho^2)
    (the projection rescales alpha and beta alike). That map's iterates have no closed form (in s = asinh rho
    it is s <- asinh(sinh(s + delta) / cosh delta), tanh delta = c / R, not a shift), so they run on Python
    floats: O(k) scalar operations (about 0.1 us each) for a row that reaches the sphere, O(1) otherwise,
    O(d) to map back.
    """
    w0, d = start.double(), direction.double()
    dnorm = float(torch.linalg.vector_norm(d))
    c = step * dnorm
    if k <= 0 or c == 0.0:
        return start.clone(), start.clone()
    e = d / dnorm
    alpha0 = float(w0 @ e)
    perp = w0 - alpha0 * e
    beta0 = float(torch.linalg.vector_norm(perp))
    e2 = perp / beta0 if beta0 > 0.0 else torch.zeros_like(perp)
    half_chord = math.sqrt(max(radius * radius - beta0 * beta0, 0.0))
    # the linear steps j = 1 .. inside stay in the ball; step inside + 1 is the first one projected
    inside = max(0, math.floor((alpha0 + half_chord) / c))
    while inside > 0 and (alpha0 - inside * c) ** 2 + beta0 * beta0 > radius * radius:
        inside -= 1  # guards the floor against rounding at the boundary

    def at(alpha: float, beta: float) -> Tensor:
        return (alpha * e + beta * e2).to(start.dtype)

    if k <= inside:
        return at(alpha0 - k * c, beta0), at(alpha0 - (k - 1) * c, beta0)
    # step inside + 1 is projected; after it every step is (alpha < 0 on the sphere, see above)
    alpha, beta = alpha0 - (inside + 1) * c, beta0
    norm = math.hypot(alpha, beta)
    if norm > radius:
        alpha, beta = alpha * radius / norm, beta * radius / norm
    if k == inside + 1:
        return at(alpha, beta), at(alpha0 - inside * c, beta0)
    if beta == 0.0:  # on the axis: the projection undoes every step
        return at(-radius, 0.0), at(-radius, 0.0)
    rho, a, sqrt = -alpha / beta, c / radius, math.sqrt
    for _ in range(k - inside - 2):
        rho += a * sqrt(1.0 + rho * rho)
    prev_rho = rho
    rho += a * sqrt(1.0 + rho * rho)

    def on_sphere(r: float) -> Tensor:
        h = sqrt(1.0 + r * r)
        return at(-radius * r / h, radius / h)

    return on_sphere(rho), on_sphere(prev_rho)


def ball_path_rows(start: Tensor, direction: Tensor, k: Tensor, cur: Tensor, prev: Tensor, step: float,
                   radius: float) -> tuple[Tensor, Tensor]:
    """(w_k, w_{k-1}) of k steps w <- Proj_{||w|| <= radius}(w - step d) per row, from the unprojected closed form
    (`cur`, `prev` from `start`, `direction`, `k`): the rows whose end left the ball are replayed by `ball_path`
    (written into `cur` and `prev`, which are returned), the others are left as they are."""
    outside = torch.linalg.vector_norm(cur, dim=-1) > radius
    if bool(outside.any()):
        for i in outside.nonzero().squeeze(-1).tolist():
            cur[i], prev[i] = ball_path(start[i], direction[i], step, radius, int(k[i]))
    return cur, prev


@torch.library.custom_op("mbbo::replay_ball_paths", mutates_args=())
def replay_ball_paths(start: Tensor, direction: Tensor, k: Tensor, cur: Tensor, prev: Tensor, step: float,
                      radius: float) -> tuple[Tensor, Tensor]:
    """`ball_path_rows` as one opaque operator, so that a compiled graph calls it without a graph break (it holds
    the data-dependent branch and the rows' Python loops)."""
    return ball_path_rows(start, direction, k, cur.clone(), prev.clone(), step, radius)  # outputs may not alias


@replay_ball_paths.register_fake
def _replay_ball_paths_shapes(start: Tensor, direction: Tensor, k: Tensor, cur: Tensor, prev: Tensor, step: float,
                              radius: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(cur), torch.empty_like(prev)


class DecayingSparseRows(StateFields):
    """Per-block sums of sparse row contributions that decay geometrically:

        E_i(t) = sum_k decay^(t - c_k) C_k,   C_k of shape (b, d) at rows r_k (b of them),

    the form RSVRB's randomised STORM gives to the cross-Jacobian estimate grad_xy g_i when x has one
    entry per data row: each update touches only the b sampled rows, and older contributions shrink by
    `decay` per iteration. A slot is reused once its weight decay^(t - c_k) falls below `tolerance`
    (relative to a fresh contribution; 0 keeps every slot until the weight underflows to exactly 0);
    capacity doubles when every slot of a block is still alive. Memory: m x capacity x b x d.
    """

    state_fields = ("rows", "values", "stamps")

    EMPTY = -(2**40)

    def __init__(self, num_blocks: int, rows: int, dim: int, decay: float, *, tolerance: float = 0.0,
                 capacity: int = 2, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
                 ) -> None:
        self.decay = float(decay)
        self.tolerance = float(tolerance)
        self.rows = torch.zeros(num_blocks, capacity, rows, dtype=torch.long, device=device)
        self.values = torch.zeros(num_blocks, capacity, rows, dim, dtype=dtype, device=device)
        self.stamps = torch.full((num_blocks, capacity), self.EMPTY, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.stamps.shape[1]

    def _weights(self, blocks: Tensor, t: int) -> Tensor:
        age = (t - self.stamps[blocks]).to(self.values.dtype)
        w = self.decay**age
        return torch.where(w > self.tolerance, w, torch.zeros_like(w))

    def _grow(self) -> None:
        k = self.capacity
        self.rows = torch.cat([self.rows, torch.zeros_like(self.rows)], dim=1)
        self.values = torch.cat([self.values, torch.zeros_like(self.values)], dim=1)
        self.stamps = torch.cat([self.stamps, torch.full_like(self.stamps, self.EMPTY)], dim=1)
        assert self.capacity == 2 * k

    def add(self, blocks: Tensor, rows: Tensor, contribution: Tensor, t: int) -> None:
        """Adds C (B, b, d) at rows (B, b) with stamp t to each given block."""
        weights = self._weights(blocks, t)
        slot = weights.argmin(dim=1)
        if bool((weights.gather(1, slot[:, None]) > 0).any()):
            self._grow()
            weights = self._weights(blocks, t)
            slot = weights.argmin(dim=1)
        self.rows[blocks, slot] = rows
        self.values[blocks, slot] = contribution
        self.stamps[blocks, slot] = t

    def matvec(self, blocks: Tensor, w: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """E_i(t) w_i for each given block as sparse rows: (index (B, K*b), values (B, K*b))."""
        weights = self._weights(blocks, t)
        live = bool((weights > 0).all())
        rows, values = self.rows[blocks], self.values[blocks]
        if not live:  # skip the dead slots' rows (they would add exact zeros)
            keep = (weights > 0).any(dim=0)
            rows, values, weights = rows[:, keep], values[:, keep], weights[:, keep]
        prod = torch.einsum("bkrd,bd->bkr", values, w) * weights.unsqueeze(-1)
        return rows.reshape(rows.shape[0], -1), prod.reshape(prod.shape[0], -1)

    def dense(self, block: int, num_rows: int, t: int) -> Tensor:
        """E_i(t) as a dense (num_rows, d) matrix (tests)."""
        b = torch.tensor([block], device=self.stamps.device)
        weights = self._weights(b, t)[0]
        out = self.values.new_zeros(num_rows, self.values.shape[-1])
        contrib = self.values[block] * weights[:, None, None]
        return out.index_add_(0, self.rows[block].reshape(-1), contrib.reshape(-1, contrib.shape[-1]))
