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
the eager form (`lazy=False`). Estimators of all blocks are initialised from one mini-batch each at (x_0, y_0).

The moving-average method (`ma_v1`, `ma_v2`) replaces MSVR by an EMA (gamma = 0), STORM on x by an EMA, and
moves only the sampled blocks' lower variables, as described in the BSVRB paper's comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper, MultiBlockAlgorithm, MultiBlockConfig, check_positive, check_unit
from mbbo.blocks import BlockSampler, MovingBlocks
from mbbo.oracles import XGrad
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.projections import cholesky_solve, floor_and_factor, project_ball
from mbbo.trackers import EMA, MSVR, STORM


@dataclass
class BlockwiseConfig(MultiBlockConfig):
    """Shared hyper-parameters; defaults from the authors' run scripts (m = 100, B = 10, b = 32)."""

    alpha: float = 0.9
    gamma: float | str = 1.0
    lazy: bool = True
    init_batch_size: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        m = problem.num_blocks
        check_unit("alpha", self.alpha)
        if isinstance(self.gamma, str):
            if self.gamma != "theory":
                raise ValueError(f"gamma must be a number >= 0 or 'theory', got {self.gamma!r}")
            if self.alpha == 1.0 and self.block_batch < m:
                raise ValueError("gamma='theory' needs alpha < 1 when block_batch < m")
        elif not (isinstance(self.gamma, int | float) and self.gamma >= 0):
            raise ValueError(f"gamma must be a number >= 0 or 'theory', got {self.gamma!r}")
        if self.init_batch_size is not None and (not isinstance(self.init_batch_size, int)
                                                 or self.init_batch_size < 1):
            raise ValueError(f"init_batch_size must be a positive integer or None, got {self.init_batch_size!r}")

    def msvr(self, num_blocks: int) -> MSVR:
        if self.gamma == "theory":
            return MSVR.theory(self.alpha, num_blocks, self.block_batch)
        return MSVR(self.alpha, float(self.gamma))


@dataclass
class BSVRBv1Config(BlockwiseConfig):
    hessian_floor: float = 1e-6

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_positive("hessian_floor", self.hessian_floor)


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

    moving_average: ClassVar[bool] = False

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.block_sampler = BlockSampler(problem.num_blocks, self.config.block_batch)
        self.z = torch.zeros_like(self.x)
        self._initialise(problem.y0)

    def _initialise(self, y: Tensor) -> None:
        """Estimators of all blocks from one mini-batch each (of `init_batch_size`) at (x, y), in chunks."""
        cfg, t = self.config, self.iteration
        tables = self.blockwise_tables(lambda blocks, lower, upper: self._init_estimators(blocks, lower, upper, y),
                                       cfg.init_batch_size)
        self._set_estimators(tables)
        # y may be the problem's y0 (the table is written in place); the estimator tables are fresh
        self.y = MovingBlocks(y.clone(), tables["s"], self._move_step("lower_lr"), lazy=cfg.lazy, copy=False)
        self.y.stamps.fill_(t)
        self.fresh = True

    def restart(self) -> None:
        """Re-initialises the estimators at the current point (lower variables carried over)."""
        self._initialise(self.lower_variables())

    # --- configuration of the variants ---------------------------------------------------------------
    def _move_step(self, name: str) -> float:
        # the moving-average method moves only sampled blocks, at write time
        return 0.0 if self.moving_average else self.hyper(name)

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
        """(1/B) sum_i grad_x f_i - cross_i, per point: (P, d_x)."""
        g = -cross.block_mean(self.problem.dim_x)
        return g if gx_f is None else g + gx_f.block_mean(self.problem.dim_x)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step = self._move_step("lower_lr")

    # --- the iteration ------------------------------------------------------------------------------
    def step(self) -> None:
        t, cfg = self.iteration, self.config
        blocks = self.block_sampler.sample(self.generators["blocks"], self.x.device)
        lower, upper = self.sample_batches(blocks)
        y_cur, y_prev = self.y.read(blocks, t)
        two_points = not self.fresh and not self.moving_average
        xs = torch.stack([self.x, self.x_prev]) if two_points else self.x.unsqueeze(0)
        ys = torch.stack([y_cur, y_prev]) if two_points else y_cur.unsqueeze(0)
        grads, s_new = self._estimate(blocks, xs, ys, lower, upper, t)
        self.z = grads[0] if self.fresh else self.upper_tracker.update(self.z, grads[0], grads[-1])
        self.fresh = False
        if self.moving_average:
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

    def _block_tables(self) -> list[MovingBlocks]:
        return [self.y]

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower variables, estimators, stamps)."""
        return sum(table.nbytes() for table in self._block_tables())

    def _init_estimators(self, blocks: Tensor, lower: Batch, upper: Batch, y: Tensor) -> dict[str, Tensor]:
        """The initial estimators' rows of the given blocks (`s` for the lower gradients, and the variant's)."""
        raise NotImplementedError

    def _set_estimators(self, tables: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _estimate(self, blocks: Tensor, xs: Tensor, ys: Tensor, lower: Batch, upper: Batch, t: int
                  ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _end_iteration(self, blocks: Tensor, t: int) -> None:
        pass

    def _tensors(self) -> dict[str, Any]:
        return {"z": self.z.clone(), "y": self.y.state_dict(), "fresh": self.fresh}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        self.z = state["z"].clone()
        self.fresh = bool(state["fresh"])
        self.y.load_state_dict(state["y"])
        self.y.step = self._move_step("lower_lr")


class BSVRBv1(_Blockwise):
    """BSVRB_v1: MSVR on the lower gradients and on the explicit Hessians (low-dimensional y_i).

    Hessian estimates are projected onto {H >= hessian_floor * I} by an eigenvalue floor (eigen-decomposing
    only the matrices that a Cholesky check finds below the floor). `hessian_floor` should not exceed the
    strong-convexity constant of the g_i (T1: lam = 1e-5; the default 1e-6 leaves the projection idle almost
    always there, while 1e-4 would clip every sampled-Hessian estimate, whose rank is at most b).
    """

    name = "bsvrb_v1"
    Config = BSVRBv1Config

    def _init_estimators(self, blocks: Tensor, lower: Batch, upper: Batch, y: Tensor) -> dict[str, Tensor]:
        xs, ys = self.x.unsqueeze(0), y[blocks].unsqueeze(0)
        gy, hess = self.oracles.lower_hessian(xs, ys, lower, blocks)
        hessians, _ = floor_and_factor(hess[0], self.config.hessian_floor)
        return {"s": gy[0], "hessians": hessians}

    def _set_estimators(self, tables: dict[str, Tensor]) -> None:
        self.hessians = tables["hessians"]
        self._written_hessians = self.hessians[:0]

    def is_finite(self) -> bool:
        return super().is_finite() and bool(torch.isfinite(self._written_hessians).all())

    def _estimate(self, blocks: Tensor, xs: Tensor, ys: Tensor, lower: Batch, upper: Batch, t: int
                  ) -> tuple[Tensor, Tensor]:
        gy, hess = self.oracles.lower_hessian(xs, ys, lower, blocks)
        gx_f, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)
        s_new = self.track(self.y.direction(blocks, t), gy)
        # the floor check yields the new estimates' Cholesky factors; the previous estimates' factors are
        # recomputed (O(B d^3), bit-identical) rather than stored (m d^2 more memory)
        h_new, factor_new = floor_and_factor(self.track(self.hessians[blocks], hess), self.config.hessian_floor)
        factors = factor_new.unsqueeze(0)
        if xs.shape[0] > 1:
            factors = torch.stack([factor_new, torch.linalg.cholesky(self.hessians[blocks])])
        self.hessians[blocks] = h_new
        self._written_hessians = h_new
        # G_new uses the new Hessian estimates, G_old the previous ones (same samples)
        w = cholesky_solve(factors, gy_f)
        return self.hypergradient(gx_f, self.oracles.cross(xs, ys, w, lower, blocks)), s_new

    def hessian_estimates(self) -> Tensor:
        """The floored Hessian estimates H_i of all blocks, (m, d_y, d_y)."""
        return self.hessians.clone()

    def table_bytes(self) -> int:
        return super().table_bytes() + self.hessians.numel() * self.hessians.element_size()

    def _tensors(self) -> dict[str, Any]:
        return {**super()._tensors(), "hessians": self.hessians.clone()}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        super()._load_tensors(state)
        self.hessians = state["hessians"].clone()


class BSVRBv2(_Blockwise):
    """BSVRB_v2: Hessian-vector products only. v_i approximately solves (grad_yy g_i) v = grad_y f_i by
    projected steps along an MSVR estimate u_i of the residual, updated for all blocks (lazily)."""

    name = "bsvrb_v2"
    Config = BSVRBv2Config

    def _init_estimators(self, blocks: Tensor, lower: Batch, upper: Batch, y: Tensor) -> dict[str, Tensor]:
        """s_i = grad_y g_i and u_i = (grad_yy g_i) v_i - grad_y f_i at the current point (v_i = 0 at start,
        carried over on restarts)."""
        xs, ys = self.x.unsqueeze(0), y[blocks].unsqueeze(0)
        restarting = hasattr(self, "v")
        v0 = self.v.current(blocks, self.iteration) if restarting else torch.zeros_like(ys[0])
        gy, hv, _ = self.oracles.lower_products(xs, ys, v0.unsqueeze(0), lower, blocks)
        _, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)
        return {"s": gy[0], "v": v0, "u": hv[0] - gy_f[0]}

    def _set_estimators(self, tables: dict[str, Tensor]) -> None:
        cfg = self.config
        self.v = MovingBlocks(tables["v"], tables["u"], self._move_step("linsys_lr"), radius=cfg.v_radius,
                              lazy=cfg.lazy, copy=False)
        self.v.stamps.fill_(self.iteration)

    def _block_tables(self) -> list[MovingBlocks]:
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
        if self.moving_average:
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

    def _tensors(self) -> dict[str, Any]:
        return {**super()._tensors(), "v": self.v.state_dict()}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        super()._load_tensors(state)
        self.v.load_state_dict(state["v"])
        self.v.step = self._move_step("linsys_lr")


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
    accumulates_lower_steps = False


class MovingAverageV2(BSVRBv2):
    """Hu, Zhong, Yang (NeurIPS 2022), Hessian-vector version: v_i by SGD on the quadratic with an EMA of
    its residual, for the sampled blocks only."""

    name = "ma_v2"
    Config = MAv2Config
    moving_average = True
    accumulates_lower_steps = False
