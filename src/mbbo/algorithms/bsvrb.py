"""BSVRB_v1, BSVRB_v2 (Hu, Qiu, Guo, Zhang, Yang, ICML 2023) and the moving-average baseline of
Hu, Zhong, Yang (NeurIPS 2022), as one blockwise engine with different trackers.

Per iteration t: sample B of the m blocks (I_t) and, for each, a lower mini-batch zeta_i and an upper
mini-batch xi_i. With the same samples at (x_t, y_t) and (x_{t-1}, y_{t-1}):

    s_i  <- MSVR(s_i; grad_y g_i)                                   (both versions)
  v1:  H_i <- Proj_{H >= mu I}(MSVR(H_i; grad_yy g_i))
       G   = (1/B) sum_i grad_x f_i - (grad_xy g_i) H_i^{-1} grad_y f_i       (a linear solve, no inverse)
  v2:  u_i <- MSVR(u_i; (grad_yy g_i) v_i - grad_y f_i)               (residual of H v = grad_y f)
       G   = (1/B) sum_i grad_x f_i - (grad_xy g_i) v_i
    z <- STORM(z; G)   (G at x_t with the new estimators and at x_{t-1} with the previous ones)
    x <- x - eta z
    for ALL blocks: y_i <- y_i - tau s_i;   v2: v_i <- Proj_{||v|| <= C}(v_i - tau_v u_i)

The all-block updates are applied lazily (`mbbo.blocks.MovingBlocks`): O(B) blocks per iteration, equal to
the eager form (`lazy=False`). Estimators of all blocks are initialised from one mini-batch each at (x_0, y_0)
(`estimator_init="first_batch"`), a chunk of blocks at a time (`blockwise_tables`). The lower step sizes tau,
tau_v default to the authors' values scaled for m / B (`MultiBlockConfig`, `lower_lr_scaling`), for both
lower-update forms: the delayed step's dc_i grows like m / B exactly as the lazy replay's step count.

Options reproducing the authors' code (BSVRB_ICML2023, HO/main.py `BSVRB()`), each O(B) per iteration:
  * `block_sampling="reshuffle"`: blocks from a permutation consumed B per iteration (`BlockSampler`);
  * `lower_update="delayed"`: only sampled blocks move, by dc_i missed steps along the fresh estimate,
    y_i <- y_i - tau dc_i s_i, v_i <- Proj(v_i - tau_v dc_i u_i) (`DelayedBlocks`); the estimates of a sampled
    block are evaluated at its stored y_i, v_i. The authors use it for v2 and the eager rule for v1;
  * `estimator_init="uniform"`: s_i, H_i / u_i, z and v_i drawn U[0, 1), the iteration starts with STORM/MSVR
    at x_{-1} = x_0 (the authors draw a separate random previous point; the library uses the start point);
  * v1: `hessian_guard="frobenius_rescale"` (`proj_mat`: rescale H up to Frobenius norm `hessian_bound`; not
    a projection, see `mbbo.projections.frobenius_rescale`) and `hessian_timing="previous"` (the hypergradient
    at x_t uses H_i as it stood before this iteration's update, and at x_{t-1} as before the previous one).

The moving-average method (`ma_v1`, `ma_v2`) replaces MSVR by an EMA (gamma = 0), STORM on x by an EMA, and
moves only the sampled blocks' lower variables, as described in the BSVRB paper's comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper, MultiBlockAlgorithm, MultiBlockConfig
from mbbo.blocks import BlockSampler, DelayedBlocks, MovingBlocks
from mbbo.oracles import XGrad
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.projections import cholesky_solve, floor_and_factor, frobenius_rescale, project_ball
from mbbo.state import UNSET
from mbbo.trackers import EMA, MSVR, STORM
from mbbo.validation import (
    check_choice,
    check_flag,
    check_int,
    check_nonnegative,
    check_optional,
    check_positive,
    check_unit,
)

LOWER_UPDATE = ("eager", "delayed")
HESSIAN_GUARD = ("eigen_floor", "frobenius_rescale")
HESSIAN_TIMING = ("updated", "previous")


@dataclass
class BlockwiseConfig(MultiBlockConfig):
    """Shared hyper-parameters; defaults from the authors' run scripts (m = 100, B = 10, b = 32)."""

    alpha: float = 0.9
    gamma: float | str = 1.0
    lazy: bool = True
    init_batch_size: int | None = None
    lower_update: str = "eager"

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        m = problem.num_blocks
        check_unit("alpha", self.alpha)
        check_choice("lower_update", self.lower_update, LOWER_UPDATE)
        check_flag("lazy", self.lazy)
        if isinstance(self.gamma, str):
            if self.gamma != "theory":
                raise ValueError(f"gamma must be a number >= 0 or 'theory', got {self.gamma!r}")
            if self.alpha == 1.0 and self.block_batch < m:
                raise ValueError("gamma='theory' needs alpha < 1 when block_batch < m")
        else:
            check_nonnegative("gamma", self.gamma)
        check_optional(check_int, "init_batch_size", self.init_batch_size, 1)

    def msvr(self, num_blocks: int) -> MSVR:
        if self.gamma == "theory":
            return MSVR.theory(self.alpha, num_blocks, self.block_batch)
        return MSVR(self.alpha, float(self.gamma))


@dataclass
class BSVRBv1Config(BlockwiseConfig):
    hessian_floor: float = 1e-6
    hessian_guard: str = "eigen_floor"
    hessian_bound: float = 10.0
    hessian_timing: str = "updated"

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_positive("hessian_floor", self.hessian_floor)
        check_choice("hessian_guard", self.hessian_guard, HESSIAN_GUARD)
        check_positive("hessian_bound", self.hessian_bound)
        check_choice("hessian_timing", self.hessian_timing, HESSIAN_TIMING)


@dataclass
class BSVRBv2Config(BlockwiseConfig):
    linsys_lr: float | None = None
    v_radius: float = 10.0

    # run_BSVRBv2.sh: tau = tau_v = 1 (scaled for m / B, see MultiBlockConfig)
    paper_steps: ClassVar[dict[str, float]] = {"lower_lr": 1.0, "linsys_lr": 1.0}

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_positive("v_radius", self.v_radius)


class _Blockwise(MultiBlockAlgorithm):
    """The shared blockwise iteration; subclasses provide the estimators of the hypergradient."""

    @dataclass
    class State(MultiBlockAlgorithm.State):
        y: MovingBlocks | DelayedBlocks = UNSET  # the lower variables, moved along the lower-gradient estimators s_i
        z: Tensor = UNSET  # STORM (EMA) estimate of the hypergradient
        fresh: bool = True  # the first iteration after an initialisation from mini-batches uses one point
        block_sampler: BlockSampler = UNSET

    moving_average: ClassVar[bool] = False
    shardable = True

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.block_sampler = BlockSampler(problem.num_blocks, self.config.block_batch, self.config.block_sampling)
        self.z = torch.zeros_like(self.x)
        self._initialise(self.shard.table(problem.y0), self.config.estimator_init)

    def _initialise(self, y: Tensor, how: str) -> None:
        """Estimators of all blocks: from one mini-batch each (of `init_batch_size`) at (x, y), in chunks, then
        the first iteration uses one point; or filled (U[0, 1) / zeros), then it is an ordinary two-point
        iteration."""
        if how == "first_batch":
            tables = self.blockwise_tables(
                lambda blocks, lower, upper: self._init_estimators(blocks, lower, upper, y),
                self.config.init_batch_size)
        else:
            tables = self._fill_estimators(y, how)
            self.z = self.filled(self.x, how)
        self._set_estimators(tables)
        # y may be the problem's y0 (the table is written in place); the estimator tables are fresh
        self.y = self._lower_table(y.clone(), tables["s"], "lower_lr")
        self.fresh = how == "first_batch"

    def _lower_table(self, values: Tensor, directions: Tensor, step: str, radius: float | None = None
                     ) -> MovingBlocks | DelayedBlocks:
        """The table of lower variables moved along `directions` by the step size named `step`; takes both
        tensors over (no copy)."""
        if self.delayed:
            return DelayedBlocks(values, directions, self.hyper(step), radius=radius, start=self.iteration,
                                 copy=False)
        table = MovingBlocks(values, directions, self._move_step(step), radius=radius, lazy=self.config.lazy,
                             copy=False)
        table.stamps.fill_(self.iteration)
        return table

    def restart(self) -> None:
        """Re-initialises the estimators from a mini-batch at the current point (lower variables carried over),
        whatever `estimator_init` was."""
        self._initialise(self.lower_variables(), "first_batch")

    # --- configuration of the variants ---------------------------------------------------------------
    @property
    def delayed(self) -> bool:
        return self.config.lower_update == "delayed"

    @property
    def accumulates_lower_steps(self) -> bool:  # type: ignore[override]
        # the eager moving-average method moves a block only when it samples it, by one step; the delayed
        # form (any method) moves it by the dc_i steps it missed
        return self.delayed or not self.moving_average

    def _move_step(self, name: str) -> float:
        # the eager moving-average method moves only sampled blocks, at write time
        return 0.0 if self.moving_average and not self.delayed else self.hyper(name)

    @property
    def lower_tracker(self) -> MSVR | EMA:
        cfg = self.config
        return EMA(cfg.alpha) if self.moving_average else cfg.msvr(self.problem.num_blocks)

    @property
    def upper_tracker(self) -> STORM | EMA:
        return EMA(self.config.beta) if self.moving_average else STORM(self.config.beta)

    def track(self, u: Tensor, values: Tensor) -> Tensor:
        """Lower tracker on values (P, ...) at the current (0) and previous (-1) point."""
        return self.lower_tracker.update(u, values[0], values[-1])

    def hypergradient(self, gx_f: XGrad | None, cross: XGrad) -> Tensor:
        """(1/B) sum_i grad_x f_i - cross_i over the sampled blocks, per point: (P, d_x) (the blocks of other
        processes gathered first when blocks are sharded: `gather_xgrads`)."""
        cross_all, gx_f = self.gather_xgrads([cross, gx_f], self.sampled)
        assert cross_all is not None
        g = -cross_all.block_mean(self.problem.dim_x)
        return g if gx_f is None else g + gx_f.block_mean(self.problem.dim_x)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step = self._move_step("lower_lr")

    # --- the iteration ------------------------------------------------------------------------------
    def step(self) -> None:
        t, cfg = self.iteration, self.config
        self.sampled = self.block_sampler.sample(self.generators["blocks"], self.x.device)
        lower, upper = self.sample_batches(self.sampled)
        blocks = self.shard.local(self.sampled)  # table rows of the sampled blocks this process owns
        y_cur, y_prev = self.y.read(blocks, t)
        two_points = not self.fresh and not self.moving_average
        xs = torch.stack([self.x, self.x_prev]) if two_points else self.x.unsqueeze(0)
        ys = torch.stack([y_cur, y_prev]) if two_points else y_cur.unsqueeze(0)
        grads, s_new = self._estimate(blocks, xs, ys, lower, upper, t)
        self.z = grads[0] if self.fresh else self.upper_tracker.update(self.z, grads[0], grads[-1])
        self.fresh = False
        if self.moving_average and not self.delayed:
            y_cur = y_cur - self.hyper("lower_lr") * s_new
        self.y.write(blocks, y_cur, s_new, t)
        self.y.end_iteration(blocks, t)
        self._end_iteration(blocks, t)
        self.x_prev = self.x
        self.x = self.x - cfg.lr * self.z
        self.iteration += 1

    def is_finite(self) -> bool:
        """NaN/inf guard of one step, O(B): x, the x tracker and the block rows this step wrote."""
        return (bool(torch.isfinite(self.x).all()) and bool(torch.isfinite(self.z).all())
                and all(table.last_write_finite() for table in self._block_tables()))

    def _block_tables(self) -> list[MovingBlocks | DelayedBlocks]:
        return [self.y]

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """Per sampled block and point (two points, one for the moving-average methods): grad_y g, the
        Hessian (v1) or an HVP (v2), a cross product and grad f."""
        n = self.config.block_batch * (1 if self.moving_average else 2)
        second = "hessian_yy" if isinstance(self, BSVRBv1) else "hvp"
        upper_x = int(self.problem.upper_depends_on_x)
        return {"grad_y_g": n, second: n, "cross": n, "grad_y_f": n, "grad_x_f": n * upper_x}

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower variables, estimators, stamps)."""
        return sum(table.nbytes() for table in self._block_tables())

    def _init_estimators(self, blocks: Tensor, lower: Batch, upper: Batch, y: Tensor) -> dict[str, Tensor]:
        """The initial estimators' rows of the given blocks (`s` for the lower gradients, and the variant's)."""
        raise NotImplementedError

    def _fill_estimators(self, y: Tensor, how: str) -> dict[str, Tensor]:
        """All blocks' estimators filled by `estimator_init` ("uniform" / "zeros"), as `_init_estimators`."""
        raise NotImplementedError

    def _set_estimators(self, tables: dict[str, Tensor]) -> None:
        """Takes the variant's estimator tables over (`s` goes to the lower-variable table)."""
        raise NotImplementedError

    def _estimate(self, blocks: Tensor, xs: Tensor, ys: Tensor, lower: Batch, upper: Batch, t: int
                  ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _end_iteration(self, blocks: Tensor, t: int) -> None:
        pass


class BSVRBv1(_Blockwise):
    """BSVRB_v1: MSVR on the lower gradients and on the explicit Hessians (low-dimensional y_i).

    `hessian_guard="eigen_floor"` (default): Hessian estimates are projected onto {H >= hessian_floor * I} by an
    eigenvalue floor (eigen-decomposing only the matrices that a Cholesky check finds below the floor).
    `hessian_floor` should not exceed the strong-convexity constant of the g_i (T1: lam = 1e-5; the default
    1e-6 leaves the projection idle almost always there, while 1e-4 would clip every sampled-Hessian estimate,
    whose rank is at most b). `"frobenius_rescale"` is the authors' guard (see the module docstring).
    `self.hessians` holds the guarded estimates; what the solves take (`_factor`: their Cholesky factors under
    eigen_floor, the matrices under frobenius_rescale) is recomputed for the B sampled blocks (O(B d^3),
    bit-identical) rather than stored (m d^2 more memory). `hessian_timing="previous"` keeps one more table,
    each block's H_i as before its last update (`hessians_before`), and when that update was.
    """

    @dataclass
    class State(_Blockwise.State):
        hessians: Tensor = UNSET  # the guarded Hessian estimates H_i, (m, d_y, d_y)
        hessians_before: Tensor | None = None  # hessian_timing='previous': H_i before its last update
        hessian_stamps: Tensor | None = None  # ... and the iteration of that update

    name = "bsvrb_v1"
    Config = BSVRBv1Config

    def _guard(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(guarded H, what `_solve` takes)."""
        cfg = self.config
        if cfg.hessian_guard == "eigen_floor":
            return floor_and_factor(h, cfg.hessian_floor)
        guarded = frobenius_rescale(h, cfg.hessian_bound)
        return guarded, guarded

    def _factor(self, h: Tensor) -> Tensor:
        """What `_solve` takes for stored (already guarded) estimates H."""
        return torch.linalg.cholesky(h) if self.config.hessian_guard == "eigen_floor" else h

    def _solve(self, factors: Tensor, rhs: Tensor) -> Tensor:
        if self.config.hessian_guard == "eigen_floor":
            return cholesky_solve(factors, rhs)
        return torch.linalg.solve(factors, rhs)

    def _init_estimators(self, blocks: Tensor, lower: Batch, upper: Batch, y: Tensor) -> dict[str, Tensor]:
        xs, ys = self.x.unsqueeze(0), y[blocks].unsqueeze(0)
        gy, hess = self.oracles.lower_hessian(xs, ys, lower, blocks)
        return {"s": gy[0], "hessians": self._guard(hess[0])[0]}

    def _fill_estimators(self, y: Tensor, how: str) -> dict[str, Tensor]:
        s0 = self.filled_table(y, how)
        h0 = self.filled_table(y.new_empty(y.shape[0], y.shape[1], y.shape[1]), how)
        # the authors apply their Frobenius guard after updates only
        return {"s": s0, "hessians": self._guard(h0)[0] if self.config.hessian_guard == "eigen_floor" else h0}

    def _set_estimators(self, tables: dict[str, Tensor]) -> None:
        self.hessians = tables["hessians"]
        self._written_hessians: tuple[Tensor, ...] = ()
        if self.config.hessian_timing == "previous":
            # H_i as before each block's last update, and when that was
            self.hessians_before = self.hessians.clone()
            self.hessian_stamps = torch.full((self.hessians.shape[0],), self.iteration - 1, dtype=torch.long,
                                             device=self.hessians.device)

    def is_finite(self) -> bool:
        return super().is_finite() and all(bool(torch.isfinite(h).all()) for h in self._written_hessians)

    def _estimate(self, blocks: Tensor, xs: Tensor, ys: Tensor, lower: Batch, upper: Batch, t: int
                  ) -> tuple[Tensor, Tensor]:
        gy, hess = self.oracles.lower_hessian(xs, ys, lower, blocks)
        gx_f, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)
        s_new = self.track(self.y.direction(blocks, t), gy)
        # eigen_floor's floor check yields the new estimates' Cholesky factors
        stored = self.hessians[blocks]
        h_new, factor_new = self._guard(self.track(stored, hess))
        two_points = xs.shape[0] > 1
        if self.config.hessian_timing == "updated":
            # G_new uses the new Hessian estimates, G_old the previous ones (same samples)
            factors = torch.stack([factor_new, self._factor(stored)]) if two_points else factor_new.unsqueeze(0)
            self._written_hessians = (h_new,)
        else:
            # G_new uses H_i as it stood at the start of the iteration, G_old as at the start of the previous one
            pair = [stored]
            if two_points:
                just_updated = (self.hessian_stamps[blocks] == t - 1)[:, None, None]
                pair.append(torch.where(just_updated, self.hessians_before[blocks], stored))
            factors = self._factor(torch.stack(pair))
            self.hessians_before[blocks], self.hessian_stamps[blocks] = stored, t
            self._written_hessians = (h_new, stored)
        self.hessians[blocks] = h_new
        w = self._solve(factors, gy_f)
        return self.hypergradient(gx_f, self.oracles.cross(xs, ys, w, lower, blocks)), s_new

    def hessian_estimates(self) -> Tensor:
        """The guarded Hessian estimates H_i of all blocks, (m, d_y, d_y)."""
        return self.hessians.clone()

    def table_bytes(self) -> int:
        extra = [self.hessians]
        if self.config.hessian_timing == "previous":
            extra += [self.hessians_before, self.hessian_stamps]
        return super().table_bytes() + sum(v.numel() * v.element_size() for v in extra)


class BSVRBv2(_Blockwise):
    """BSVRB_v2: Hessian-vector products only. v_i approximately solves (grad_yy g_i) v = grad_y f_i by
    projected steps along an MSVR estimate u_i of the residual, updated for all blocks (lazily)."""

    @dataclass
    class State(_Blockwise.State):
        v: MovingBlocks | DelayedBlocks | None = None  # linear-system variables, moved along residual estimators u_i

    name = "bsvrb_v2"
    Config = BSVRBv2Config

    def _init_estimators(self, blocks: Tensor, lower: Batch, upper: Batch, y: Tensor) -> dict[str, Tensor]:
        """s_i = grad_y g_i and u_i = (grad_yy g_i) v_i - grad_y f_i at the current point (v_i = 0 at start,
        carried over on restarts)."""
        xs, ys = self.x.unsqueeze(0), y[blocks].unsqueeze(0)
        restarting = self.v is not None
        v0 = self.v.current(blocks, self.iteration) if restarting else torch.zeros_like(ys[0])
        gy, hv, _ = self.oracles.lower_products(xs, ys, v0.unsqueeze(0), lower, blocks)
        _, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)
        return {"s": gy[0], "v": v0, "u": hv[0] - gy_f[0]}

    def _fill_estimators(self, y: Tensor, how: str) -> dict[str, Tensor]:
        """s_i, u_i and (under "uniform", as the authors) v_i filled; v_i = 0 under "zeros"."""
        s0, u0, v0 = self.filled_table(y, how), self.filled_table(y, how), self.filled_table(y, how)
        return {"s": s0, "u": u0, "v": v0}

    def _set_estimators(self, tables: dict[str, Tensor]) -> None:
        self.v = self._lower_table(tables["v"], tables["u"], "linsys_lr", self.config.v_radius)

    def _block_tables(self) -> list[MovingBlocks | DelayedBlocks]:
        return [self.y, self.v]

    def _estimate(self, blocks: Tensor, xs: Tensor, ys: Tensor, lower: Batch, upper: Batch, t: int
                  ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        v_cur, v_prev = self.v.read(blocks, t)
        vs = torch.stack([v_cur, v_prev])[: xs.shape[0]]
        gy, hv, cross = self.oracles.lower_products(xs, ys, vs, lower, blocks)
        gx_f, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)
        s_new = self.track(self.y.direction(blocks, t), gy)
        u_new = self.track(self.v.direction(blocks, t), hv - gy_f)
        if self.moving_average and not self.delayed:
            v_cur = project_ball(v_cur - self.hyper("linsys_lr") * u_new, cfg.v_radius)
        self.v.write(blocks, v_cur, u_new, t)
        return self.hypergradient(gx_f, cross), s_new

    def _end_iteration(self, blocks: Tensor, t: int) -> None:
        self.v.end_iteration(blocks, t)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.v.step = self._move_step("linsys_lr")

    def linear_system_variables(self) -> Tensor:
        """Current v_i of all blocks, (m, d_y)."""
        return self.v.current_all(self.iteration)


@dataclass
class MAConfig(BSVRBv1Config):
    """Moving-average method: alpha weights the EMA of the lower estimators, beta the EMA of x."""

    gamma: float | str = 0.0


@dataclass
class MAv2Config(BSVRBv2Config):
    gamma: float | str = 0.0


class MovingAverageV1(BSVRBv1):
    """Hu, Zhong, Yang (NeurIPS 2022), explicit-Hessian version: EMA trackers of grad_y g_i and
    grad_yy g_i for the sampled blocks, EMA of the hypergradient on x, sampled lower variables moved."""

    name = "ma_v1"
    Config = MAConfig
    moving_average = True


class MovingAverageV2(BSVRBv2):
    """Hu, Zhong, Yang (NeurIPS 2022), Hessian-vector version: v_i by SGD on the quadratic with an EMA of
    its residual, for the sampled blocks only."""

    name = "ma_v2"
    Config = MAv2Config
    moving_average = True
