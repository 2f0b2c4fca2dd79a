"""Building blocks of the blockwise methods (BSVRB_v1, BSVRB_v2 and the moving-average method, `mbbo.algorithms.bsvrb`):
small functions of (algorithm, ...) that each method's `step()`, `__init__` and `restart` call explicitly, so that no
method inherits behaviour from another one or from a family base (each derives directly from `MultiBlockAlgorithm`).

Each takes the algorithm for its configuration, random streams, counted oracles and block shard; state lives in the
algorithm's declared `State` (`BlockwiseState` and the version's estimator tables). The trackers (MSVR / STORM for
BSVRB, EMA for the moving-average method) are chosen by each method's `step()`; `moving_average=True` selects the
moving-average method's lower moves: under `lower_update="eager"` only the sampled blocks move (by one step, at
write time, `moved_rows`), so its tables move no block on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from mbbo.algorithms.base import MultiBlockAlgorithm
from mbbo.algorithms.pieces import two_points
from mbbo.blocks import BlockSampler, DelayedBlocks, MovingBlocks
from mbbo.oracles import XGrad
from mbbo.problem import Batch
from mbbo.projections import cholesky_solve, floor_and_factor, frobenius_rescale, project_ball
from mbbo.state import UNSET
from mbbo.trackers import EMA, MSVR, STORM

LowerTable = MovingBlocks | DelayedBlocks
Tracker = MSVR | EMA | STORM


@dataclass
class BlockwiseState(MultiBlockAlgorithm.State):
    """What every blockwise method keeps besides its estimator tables."""

    y: MovingBlocks | DelayedBlocks = UNSET  # the lower variables, moved along the lower-gradient estimators s_i
    z: Tensor = UNSET  # STORM (EMA) estimate of the hypergradient
    fresh: bool = True  # the first iteration after an initialisation from mini-batches uses one point
    block_sampler: BlockSampler = UNSET


class BlockSample(NamedTuple):
    """One iteration's samples: blocks and a lower and an upper mini-batch for each (with the blocks' constants)."""

    sampled: Tensor  # the B sampled blocks (global ids)
    blocks: Tensor  # their table rows on this process (all of them in a 1-process run)
    lower: Batch
    upper: Batch
    rows: tuple[Tensor | None, Tensor | None] = (None, None)  # block-sharded: all B blocks' lower / upper rows


class BlockDraw(NamedTuple):
    """One iteration's samples (`BlockSample`'s fields) and the points its estimators are evaluated at."""

    sampled: Tensor
    blocks: Tensor
    lower: Batch
    upper: Batch
    rows: tuple[Tensor | None, Tensor | None]
    y: Tensor  # the sampled blocks' current lower variables, (B, d_y)
    ys: Tensor  # y_t (and y_{t-1}) of the sampled blocks, (P, B, d_y); x at the same points: `x_points`


# --- construction, restarts ----------------------------------------------------------------------------------


def start_blockwise(alg: MultiBlockAlgorithm) -> None:
    """The block sampler (`block_sampling`) and z = 0."""
    alg.block_sampler = BlockSampler(alg.problem.num_blocks, alg.config.block_batch, alg.config.block_sampling,
                                     alg.config.block_strata)
    alg.z = torch.zeros_like(alg.x)


def initial_estimators(alg: MultiBlockAlgorithm, how: str, rows: Callable[[Tensor, Batch, Batch], dict[str, Tensor]],
                       filled: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """All blocks' estimator tables: `rows(blocks, lower, upper)` from one mini-batch each (of `init_batch_size`) at
    the current point, in chunks (`blockwise_tables`), after which the first iteration uses one point; or `filled()`
    ("uniform" / "zeros", z too), after which it is an ordinary two-point iteration."""
    if how == "first_batch":
        tables = alg.blockwise_tables(rows, alg.config.init_batch_size)
    else:
        tables = filled()
        alg.z = alg.filled(alg.x, how)
    alg.fresh = how == "first_batch"
    return tables


def is_delayed(alg: MultiBlockAlgorithm) -> bool:
    return alg.config.lower_update == "delayed"


def table_step(alg: MultiBlockAlgorithm, name: str, *, moving_average: bool) -> float:
    """The step size (named `name`) by which a lower table moves its blocks: 0 for the eager moving-average method,
    which moves only the sampled blocks, at write time (`moved_rows`)."""
    return 0.0 if moving_average and not is_delayed(alg) else alg.hyper(name)


def lower_table(alg: MultiBlockAlgorithm, values: Tensor, directions: Tensor, step: str, *, moving_average: bool,
                radius: float | None = None) -> LowerTable:
    """The table of lower (or linear-system) variables moved along `directions` by the step size named `step`:
    `DelayedBlocks` (`lower_update="delayed"`) or `MovingBlocks` (lazy or eager); takes both tensors over."""
    if is_delayed(alg):
        return DelayedBlocks(values, directions, alg.hyper(step), radius=radius, start=alg.iteration, copy=False)
    table = MovingBlocks(values, directions, table_step(alg, step, moving_average=moving_average), radius=radius,
                         lazy=alg.config.lazy, copy=False)
    table.stamps.fill_(alg.iteration)
    return table


# --- the iteration -------------------------------------------------------------------------------------------


def sample_blocks(alg: MultiBlockAlgorithm) -> BlockSample:
    """Samples B blocks and a lower and an upper mini-batch for each, with the blocks' constants."""
    sampled = alg.block_sampler.sample(alg.generators["blocks"], alg.x.device)
    lower, upper, rows = alg.sample_batches_and_rows(sampled)
    blocks = alg.shard.local(sampled)
    return BlockSample(sampled, blocks, alg.oracles.with_block_data(lower, blocks),
                       alg.oracles.with_block_data(upper, blocks), rows)


def draw_blocks(alg: MultiBlockAlgorithm, two: bool) -> BlockDraw:
    """`sample_blocks`, and the sampled blocks' lower variables at the current (and, `two`, the previous) point."""
    sample = sample_blocks(alg)
    y_cur, y_prev = alg.y.read(sample.blocks, alg.iteration)
    return BlockDraw(*sample, y_cur, two_points(y_cur, y_prev, not two))


def x_points(alg: MultiBlockAlgorithm, two: bool) -> Tensor:
    """x_t (and, `two`, x_{t-1}) stacked, (P, d_x): inside the update, where a compiled graph gathers the batch rows
    of both without copying d_x-vectors."""
    return two_points(alg.x, alg.x_prev, not two)


def track(tracker: Tracker, u: Tensor, values: Tensor) -> Tensor:
    """`tracker` on values (P, ...) at the current (0) and previous (-1) point."""
    return tracker.update(u, values[0], values[-1])


def moved_rows(alg: MultiBlockAlgorithm, rows: Tensor, direction: Tensor, step: str, *, moving_average: bool,
               radius: float | None = None) -> Tensor:
    """The rows to write back: under the eager moving-average method, moved by one (projected) step along the
    fresh estimate; otherwise as read (the table moves them)."""
    if not moving_average or is_delayed(alg):
        return rows
    moved = rows - alg.hyper(step) * direction
    return moved if radius is None else project_ball(moved, radius)


def mean_hypergradient(alg: MultiBlockAlgorithm, gx_f: XGrad | None, cross: XGrad) -> Tensor:
    """(1/B) sum_i grad_x f_i - cross_i over the blocks of `cross` (all sampled blocks), per point: (P, d_x)."""
    g = -cross.block_mean(alg.problem.dim_x)
    return g if gx_f is None else g + gx_f.block_mean(alg.problem.dim_x)


def reduced_hypergradient(alg: MultiBlockAlgorithm, draw: BlockSample | BlockDraw, gx_f: XGrad | None,
                          cross: XGrad) -> Tensor:
    """`mean_hypergradient` over the sampled blocks (the blocks of other processes gathered first when blocks are
    sharded: `gather_xgrads`)."""
    cross_all, gx_f = alg.gather_xgrads([cross, gx_f], draw.sampled, rows=draw.rows)
    assert cross_all is not None
    return mean_hypergradient(alg, gx_f, cross_all)


def hypergradient_step(alg: MultiBlockAlgorithm, cross: XGrad, gx_f: XGrad | None, upper: STORM | EMA
                       ) -> tuple[Tensor, Tensor]:
    """`upper_step` along `mean_hypergradient` of all sampled blocks' terms: what a block-sharded rank computes after
    the gather, as a second compiled graph (`BilevelAlgorithm.run_update`)."""
    return upper_step(alg, mean_hypergradient(alg, gx_f, cross), upper)


def upper_step(alg: MultiBlockAlgorithm, grads: Tensor, upper: STORM | EMA) -> tuple[Tensor, Tensor]:
    """(z, x) after z <- upper(z; G_t, G_{t-1}) (G_t alone right after an initialisation from mini-batches) and
    x <- x - lr z; writes nothing."""
    z = grads[0] if alg.fresh else track(upper, alg.z, grads)
    return z, alg.x - alg.config.lr * z


def close_iteration(alg: MultiBlockAlgorithm, draw: BlockSample | BlockDraw, tables: tuple[LowerTable, ...], z: Tensor,
                    x: Tensor) -> None:
    """Closes the tables' iteration, stores z and x (`upper_step`); ends the iteration."""
    for table in tables:
        table.end_iteration(draw.blocks, alg.iteration)
    alg.z = z
    alg.fresh = False
    alg.x_prev = alg.x
    alg.x = x
    alg.iteration += 1


def end_iteration(alg: MultiBlockAlgorithm, draw: BlockDraw, tables: tuple[LowerTable, ...], grads: Tensor,
                  upper: STORM | EMA) -> None:
    """`upper_step`, then `close_iteration`."""
    close_iteration(alg, draw, tables, *upper_step(alg, grads, upper))


# --- guards, costs -------------------------------------------------------------------------------------------


def blockwise_finite(alg: MultiBlockAlgorithm, tables: tuple[LowerTable, ...], written: tuple[Tensor, ...] = ()
                     ) -> bool:
    """NaN/inf guard of one step, O(B): x, z, the block rows this step wrote and the `written` estimates."""
    return (bool(torch.isfinite(alg.x).all()) and bool(torch.isfinite(alg.z).all())
            and all(table.last_write_finite() for table in tables)
            and all(bool(torch.isfinite(h).all()) for h in written))


def blockwise_table_bytes(tables: tuple[LowerTable, ...], tensors: tuple[Tensor, ...] = ()) -> int:
    """Bytes held by the per-block tables (lower variables, their estimators and stamps) and estimator tensors."""
    return sum(table.nbytes() for table in tables) + sum(t.numel() * t.element_size() for t in tensors)


def blockwise_oracle_calls(alg: MultiBlockAlgorithm, second_order: str, points: int) -> dict[str, int]:
    """Per sampled block and point: grad_y g, the Hessian (`"hessian_yy"`) or an HVP (`"hvp"`), a cross product and
    grad f."""
    n = alg.config.block_batch * points
    upper_x = int(alg.problem.upper_depends_on_x)
    return {"grad_y_g": n, second_order: n, "cross": n, "grad_y_f": n, "grad_x_f": n * upper_x}


# --- BSVRB_v1 / ma_v1: explicit Hessian estimates ------------------------------------------------------------


def guard_hessians(alg: MultiBlockAlgorithm, h: Tensor) -> tuple[Tensor, Tensor]:
    """(guarded H, what `solve_hessians` takes): the eigenvalue floor and the new estimates' Cholesky factors
    (`hessian_guard="eigen_floor"`), or the authors' Frobenius rescale twice."""
    cfg = alg.config
    if cfg.hessian_guard == "eigen_floor":
        return floor_and_factor(h, cfg.hessian_floor)
    guarded = frobenius_rescale(h, cfg.hessian_bound)
    return guarded, guarded


def hessian_factors(alg: MultiBlockAlgorithm, h: Tensor) -> Tensor:
    """What `solve_hessians` takes for stored (already guarded) estimates H."""
    return torch.linalg.cholesky(h) if alg.config.hessian_guard == "eigen_floor" else h


def solve_hessians(alg: MultiBlockAlgorithm, factors: Tensor, rhs: Tensor) -> Tensor:
    if alg.config.hessian_guard == "eigen_floor":
        return cholesky_solve(factors, rhs)
    return torch.linalg.solve(factors, rhs)


def initialise_hessian_estimates(alg: MultiBlockAlgorithm, y: Tensor, how: str, *, moving_average: bool) -> None:
    """s_i and H_i of all blocks (`initial_estimators`: grad_y g_i and the guarded grad_yy g_i at (x, y_i), or
    filled, guarded under eigen_floor only as the authors apply their Frobenius guard after updates); the lower
    table from y (cloned)."""

    def rows(blocks: Tensor, lower: Batch, upper: Batch) -> dict[str, Tensor]:
        gy, hess = alg.oracles.lower_hessian(alg.x.unsqueeze(0), y[blocks].unsqueeze(0), lower, blocks)
        return {"s": gy[0], "hessians": guard_hessians(alg, hess[0])[0]}

    def filled() -> dict[str, Tensor]:
        s0 = alg.filled_table(y, how)
        h0 = alg.filled_table(y.new_empty(y.shape[0], y.shape[1], y.shape[1]), how)
        return {"s": s0, "hessians": guard_hessians(alg, h0)[0] if alg.config.hessian_guard == "eigen_floor" else h0}

    tables = initial_estimators(alg, how, rows, filled)
    alg.hessians = tables["hessians"]
    alg.written_hessians = ()
    if alg.config.hessian_timing == "previous":
        # H_i as before each block's last update, and when that was
        alg.hessians_before = alg.hessians.clone()
        alg.hessian_stamps = torch.full((alg.hessians.shape[0],), alg.iteration - 1, dtype=torch.long,
                                        device=alg.hessians.device)
    # y may be the problem's y0 (the table is written in place); the estimator tables are fresh
    alg.y = lower_table(alg, y.clone(), tables["s"], "lower_lr", moving_average=moving_average)


def hessian_hypergradients(alg: MultiBlockAlgorithm, draw: BlockDraw, tracker: MSVR | EMA) -> tuple[Tensor, Tensor]:
    """(G per point (P, d_x), the new s_i): s_i and H_i tracked on the sampled blocks (H_i guarded and stored),
    G = (1/B) sum_i grad_x f_i - (grad_xy g_i) H_i^{-1} grad_y f_i by linear solves, with the H_i of
    `hessian_timing`."""
    blocks, xs, ys, t = draw.blocks, x_points(alg, draw.ys.shape[0] > 1), draw.ys, alg.iteration
    gy, hess = alg.oracles.lower_hessian(xs, ys, draw.lower, blocks)
    gx_f, gy_f = alg.oracles.upper_grads(xs, ys, draw.upper, blocks)
    s_new = track(tracker, alg.y.direction(blocks, t), gy)
    # eigen_floor's floor check yields the new estimates' Cholesky factors
    stored = alg.hessians[blocks]
    h_new, factor_new = guard_hessians(alg, track(tracker, stored, hess))
    two = xs.shape[0] > 1
    if alg.config.hessian_timing == "updated":
        # G_new uses the new Hessian estimates, G_old the previous ones (same samples)
        factors = torch.stack([factor_new, hessian_factors(alg, stored)]) if two else factor_new.unsqueeze(0)
        alg.written_hessians = (h_new,)
    else:
        # G_new uses H_i as it stood at the start of the iteration, G_old as at the start of the previous one
        pair = [stored]
        if two:
            just_updated = (alg.hessian_stamps[blocks] == t - 1)[:, None, None]
            pair.append(torch.where(just_updated, alg.hessians_before[blocks], stored))
        factors = hessian_factors(alg, torch.stack(pair))
        alg.hessians_before[blocks], alg.hessian_stamps[blocks] = stored, t
        alg.written_hessians = (h_new, stored)
    alg.hessians[blocks] = h_new
    w = solve_hessians(alg, factors, gy_f)
    return reduced_hypergradient(alg, draw, gx_f, alg.oracles.cross(xs, ys, w, draw.lower, blocks)), s_new


def hessian_tensors(alg: MultiBlockAlgorithm) -> tuple[Tensor, ...]:
    """The Hessian estimates' tables (and under hessian_timing="previous" their previous values and stamps)."""
    if alg.config.hessian_timing == "previous":
        return (alg.hessians, alg.hessians_before, alg.hessian_stamps)
    return (alg.hessians,)


# --- BSVRB_v2 / ma_v2: Hessian-vector products ---------------------------------------------------------------


def initialise_linear_systems(alg: MultiBlockAlgorithm, y: Tensor, how: str, *, moving_average: bool) -> None:
    """s_i, u_i and v_i of all blocks (`initial_estimators`: grad_y g_i and u_i = (grad_yy g_i) v_i - grad_y f_i
    at (x, y_i), v_i = 0 at start and carried over on restarts; or filled, v_i too (U[0, 1) as the authors, or
    0)); the tables of v (along u) and of y (cloned, along s)."""

    def rows(blocks: Tensor, lower: Batch, upper: Batch) -> dict[str, Tensor]:
        xs, ys = alg.x.unsqueeze(0), y[blocks].unsqueeze(0)
        v0 = alg.v.current(blocks, alg.iteration) if alg.v is not None else torch.zeros_like(ys[0])
        gy, hv, _ = alg.oracles.lower_products(xs, ys, v0.unsqueeze(0), lower, blocks)
        _, gy_f = alg.oracles.upper_grads(xs, ys, upper, blocks)
        return {"s": gy[0], "v": v0, "u": hv[0] - gy_f[0]}

    def filled() -> dict[str, Tensor]:
        s0, u0, v0 = alg.filled_table(y, how), alg.filled_table(y, how), alg.filled_table(y, how)
        return {"s": s0, "u": u0, "v": v0}

    tables = initial_estimators(alg, how, rows, filled)
    alg.v = lower_table(alg, tables["v"], tables["u"], "linsys_lr", moving_average=moving_average,
                        radius=alg.config.v_radius)
    alg.y = lower_table(alg, y.clone(), tables["s"], "lower_lr", moving_average=moving_average)


class LinearSystemRows(NamedTuple):
    """What an iteration of BSVRB_v2 / ma_v2 reads from its tables for the sampled blocks."""

    y: tuple[Tensor, Tensor]  # y_i now and at the previous iteration
    v: tuple[Tensor, Tensor]  # v_i now and at the previous iteration
    s: Tensor  # the lower-gradient estimators s_i
    u: Tensor  # the residual estimators u_i


def linear_system_rows(alg: MultiBlockAlgorithm, blocks: Tensor, t: int | Tensor) -> LinearSystemRows:
    """The rows of `blocks` at iteration t (`t` a 0-d tensor inside a compiled update)."""
    return LinearSystemRows(alg.y.read(blocks, t), alg.v.read(blocks, t), alg.y.direction(blocks, t),
                            alg.v.direction(blocks, t))


def linear_system_terms(alg: MultiBlockAlgorithm, sample: BlockSample, t: Tensor, two: bool, tracker: MSVR | EMA,
                        moving_average: bool) -> tuple[XGrad, XGrad | None]:
    """The per-block part of a BSVRB_v2 / ma_v2 iteration: the sampled blocks' rows read at iteration t (a 0-d
    tensor), s_i and the residual estimates u_i of (grad_yy g_i) v = grad_y f_i tracked, the rows written back
    (`moved_rows`); returns the blocks' hypergradient terms (grad_xy g_i) v_i and grad_x f_i, per point."""
    rows = linear_system_rows(alg, sample.blocks, t)
    xs, ys, vs = x_points(alg, two), two_points(*rows.y, not two), two_points(*rows.v, not two)
    gy, hv, cross = alg.oracles.lower_products(xs, ys, vs, sample.lower, sample.blocks)
    gx_f, gy_f = alg.oracles.upper_grads(xs, ys, sample.upper, sample.blocks)
    s_new = track(tracker, rows.s, gy)
    u_new = track(tracker, rows.u, hv - gy_f)
    alg.v.write(sample.blocks, moved_rows(alg, rows.v[0], u_new, "linsys_lr", moving_average=moving_average,
                                          radius=alg.config.v_radius), u_new, t)
    alg.y.write(sample.blocks, moved_rows(alg, rows.y[0], s_new, "lower_lr", moving_average=moving_average), s_new, t)
    return cross, gx_f


def linear_system_update(alg: MultiBlockAlgorithm, sample: BlockSample, t: Tensor, two: bool, tracker: MSVR | EMA,
                         upper: STORM | EMA, moving_average: bool) -> tuple[Tensor, Tensor]:
    """A BSVRB_v2 / ma_v2 iteration between sampling and `close_iteration` (`BilevelAlgorithm.run_update`: one
    compiled graph under compile=True in a 1-process run): `linear_system_terms`, then
    G = (1/B) sum_i grad_x f_i - (grad_xy g_i) v_i and `upper_step`: returns (z, x)."""
    cross, gx_f = linear_system_terms(alg, sample, t, two, tracker, moving_average)
    return upper_step(alg, reduced_hypergradient(alg, sample, gx_f, cross), upper)


def linear_system_step(alg: MultiBlockAlgorithm, tracker: MSVR | EMA, upper: STORM | EMA, *, moving_average: bool,
                       two: bool) -> None:
    """One BSVRB_v2 / ma_v2 iteration: `sample_blocks` (eager), `linear_system_update` (compiled as one graph under
    compile=True), `close_iteration`. Block-sharded, the graph ends with the per-block terms
    (`linear_system_terms`); the collective (`gather_xgrads`) follows, then `hypergradient_step` (a second graph)."""
    sample = sample_blocks(alg)
    t = torch.tensor(alg.iteration, device=alg.x.device)
    if alg.shard.distributed:
        cross, gx_f = alg.run_update(linear_system_terms, sample, t, two, tracker, moving_average)
        cross_all, gx_f_all = alg.gather_xgrads([cross, gx_f], sample.sampled, rows=sample.rows)
        assert cross_all is not None
        z, x = alg.run_update(hypergradient_step, cross_all, gx_f_all, upper)
    else:
        z, x = alg.run_update(linear_system_update, sample, t, two, tracker, upper, moving_average)
    close_iteration(alg, sample, (alg.y, alg.v), z, x)
