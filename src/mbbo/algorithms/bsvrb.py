"""BSVRB_v1, BSVRB_v2 (Hu, Qiu, Guo, Zhang, Yang, ICML 2023) and the moving-average baseline of
Hu, Zhong, Yang (NeurIPS 2022): four small classes composing the same building blocks
(`mbbo.algorithms.blockwise`) with different trackers.

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

from torch import Tensor

from mbbo.algorithms.base import Hyper, MultiBlockAlgorithm, MultiBlockConfig
from mbbo.algorithms.blockwise import (
    BlockwiseState,
    blockwise_finite,
    blockwise_oracle_calls,
    blockwise_table_bytes,
    draw_blocks,
    end_iteration,
    hessian_hypergradients,
    hessian_tensors,
    initialise_hessian_estimates,
    initialise_linear_systems,
    is_delayed,
    linear_system_step,
    moved_rows,
    start_blockwise,
    table_step,
)
from mbbo.blocks import DelayedBlocks, MovingBlocks
from mbbo.problem import MultiBlockProblem
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


class BSVRBv1(MultiBlockAlgorithm):
    """BSVRB_v1: MSVR on the lower gradients and on the explicit Hessians (low-dimensional y_i).

    `hessian_guard="eigen_floor"` (default): Hessian estimates are projected onto {H >= hessian_floor * I} by an
    eigenvalue floor (eigen-decomposing only the matrices that a Cholesky check finds below the floor).
    `hessian_floor` should not exceed the strong-convexity constant of the g_i (T1: lam = 1e-5; the default
    1e-6 leaves the projection idle almost always there, while 1e-4 would clip every sampled-Hessian estimate,
    whose rank is at most b). `"frobenius_rescale"` is the authors' guard (see the module docstring).
    `self.hessians` holds the guarded estimates; what the solves take (their Cholesky factors under
    eigen_floor, the matrices under frobenius_rescale) is recomputed for the B sampled blocks (O(B d^3),
    bit-identical) rather than stored (m d^2 more memory). `hessian_timing="previous"` keeps one more table,
    each block's H_i as before its last update (`hessians_before`), and when that update was.
    """

    @dataclass
    class State(BlockwiseState):
        hessians: Tensor = UNSET  # the guarded Hessian estimates H_i, (m, d_y, d_y)
        hessians_before: Tensor | None = None  # hessian_timing='previous': H_i before its last update
        hessian_stamps: Tensor | None = None  # ... and the iteration of that update

    name = "bsvrb_v1"
    Config = BSVRBv1Config
    shardable = True
    written_hessians: tuple[Tensor, ...]  # the Hessian estimates the last step wrote (`is_finite`)

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_blockwise(self)
        y0 = self.shard.table(problem.y0)
        initialise_hessian_estimates(self, y0, self.config.estimator_init, moving_average=False)

    def step(self) -> None:
        draw = draw_blocks(self, two=not self.fresh)
        grads, s_new = hessian_hypergradients(self, draw, self.config.msvr(self.problem.num_blocks))
        self.y.write(draw.blocks, draw.y, s_new, self.iteration)
        end_iteration(self, draw, (self.y,), grads, STORM(self.config.beta))

    def restart(self) -> None:
        """Re-initialises the estimators from a mini-batch at the current point (lower variables carried over),
        whatever `estimator_init` was."""
        initialise_hessian_estimates(self, self.lower_variables(), "first_batch", moving_average=False)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step = self.hyper("lower_lr")

    def is_finite(self) -> bool:
        """NaN/inf guard of one step, O(B): x, z, the block rows and Hessian estimates this step wrote."""
        return blockwise_finite(self, (self.y,), self.written_hessians)

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """Per sampled block, at two points: grad_y g, the Hessian, a cross product and grad f."""
        return blockwise_oracle_calls(self, "hessian_yy", 2)

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower variables, estimators, stamps)."""
        return blockwise_table_bytes((self.y,), hessian_tensors(self))

    def hessian_estimates(self) -> Tensor:
        """The guarded Hessian estimates H_i of all blocks, (m, d_y, d_y)."""
        return self.hessians.clone()


class BSVRBv2(MultiBlockAlgorithm):
    """BSVRB_v2: Hessian-vector products only. v_i approximately solves (grad_yy g_i) v = grad_y f_i by
    projected steps along an MSVR estimate u_i of the residual, updated for all blocks (lazily)."""

    @dataclass
    class State(BlockwiseState):
        v: MovingBlocks | DelayedBlocks | None = None  # linear-system variables, moved along residual estimators u_i

    name = "bsvrb_v2"
    Config = BSVRBv2Config
    shardable = True
    compiles_whole_update = True

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_blockwise(self)
        y0 = self.shard.table(problem.y0)
        initialise_linear_systems(self, y0, self.config.estimator_init, moving_average=False)

    def step(self) -> None:
        linear_system_step(self, self.config.msvr(self.problem.num_blocks), STORM(self.config.beta),
                           moving_average=False, two=not self.fresh)

    def restart(self) -> None:
        """Re-initialises the estimators from a mini-batch at the current point (lower and linear-system variables
        carried over), whatever `estimator_init` was."""
        initialise_linear_systems(self, self.lower_variables(), "first_batch", moving_average=False)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step, self.v.step = self.hyper("lower_lr"), self.hyper("linsys_lr")

    def is_finite(self) -> bool:
        """NaN/inf guard of one step, O(B): x, z and the block rows this step wrote."""
        return blockwise_finite(self, (self.y, self.v))

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """Per sampled block, at two points: grad_y g, an HVP, a cross product and grad f."""
        return blockwise_oracle_calls(self, "hvp", 2)

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower and linear-system variables, estimators, stamps)."""
        return blockwise_table_bytes((self.y, self.v))

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


class MovingAverageV1(MultiBlockAlgorithm):
    """Hu, Zhong, Yang (NeurIPS 2022), explicit-Hessian version: EMA trackers of grad_y g_i and
    grad_yy g_i for the sampled blocks, EMA of the hypergradient on x, sampled lower variables moved.
    The estimators, guards and options are BSVRB_v1's (same pieces, same `State`)."""

    State = BSVRBv1.State
    name = "ma_v1"
    Config = MAConfig
    shardable = True
    written_hessians: tuple[Tensor, ...]

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_blockwise(self)
        y0 = self.shard.table(problem.y0)
        initialise_hessian_estimates(self, y0, self.config.estimator_init, moving_average=True)

    @property
    def accumulates_lower_steps(self) -> bool:  # type: ignore[override]
        # the eager form moves a block only when it samples it, by one step; the delayed form by the dc_i it missed
        return is_delayed(self)

    def step(self) -> None:
        draw = draw_blocks(self, two=False)
        grads, s_new = hessian_hypergradients(self, draw, EMA(self.config.alpha))
        y_new = moved_rows(self, draw.y, s_new, "lower_lr", moving_average=True)
        self.y.write(draw.blocks, y_new, s_new, self.iteration)
        end_iteration(self, draw, (self.y,), grads, EMA(self.config.beta))

    def restart(self) -> None:
        """Re-initialises the estimators from a mini-batch at the current point (lower variables carried over)."""
        initialise_hessian_estimates(self, self.lower_variables(), "first_batch", moving_average=True)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step = table_step(self, "lower_lr", moving_average=True)

    def is_finite(self) -> bool:
        """NaN/inf guard of one step, O(B): x, z, the block rows and Hessian estimates this step wrote."""
        return blockwise_finite(self, (self.y,), self.written_hessians)

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """Per sampled block, at one point: grad_y g, the Hessian, a cross product and grad f."""
        return blockwise_oracle_calls(self, "hessian_yy", 1)

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower variables, estimators, stamps)."""
        return blockwise_table_bytes((self.y,), hessian_tensors(self))

    def hessian_estimates(self) -> Tensor:
        """The guarded Hessian estimates H_i of all blocks, (m, d_y, d_y)."""
        return self.hessians.clone()


class MovingAverageV2(MultiBlockAlgorithm):
    """Hu, Zhong, Yang (NeurIPS 2022), Hessian-vector version: v_i by SGD on the quadratic with an EMA of
    its residual, for the sampled blocks only. The estimators and options are BSVRB_v2's (same pieces, same
    `State`)."""

    State = BSVRBv2.State
    name = "ma_v2"
    Config = MAv2Config
    shardable = True
    compiles_whole_update = True

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        start_blockwise(self)
        y0 = self.shard.table(problem.y0)
        initialise_linear_systems(self, y0, self.config.estimator_init, moving_average=True)

    @property
    def accumulates_lower_steps(self) -> bool:  # type: ignore[override]
        # the eager form moves a block only when it samples it, by one step; the delayed form by the dc_i it missed
        return is_delayed(self)

    def step(self) -> None:
        linear_system_step(self, EMA(self.config.alpha), EMA(self.config.beta), moving_average=True, two=False)

    def restart(self) -> None:
        """Re-initialises the estimators from a mini-batch at the current point (lower and linear-system variables
        carried over)."""
        initialise_linear_systems(self, self.lower_variables(), "first_batch", moving_average=True)

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step = table_step(self, "lower_lr", moving_average=True)
        self.v.step = table_step(self, "linsys_lr", moving_average=True)

    def is_finite(self) -> bool:
        """NaN/inf guard of one step, O(B): x, z and the block rows this step wrote."""
        return blockwise_finite(self, (self.y, self.v))

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """Per sampled block, at one point: grad_y g, an HVP, a cross product and grad f."""
        return blockwise_oracle_calls(self, "hvp", 1)

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower and linear-system variables, estimators, stamps)."""
        return blockwise_table_bytes((self.y, self.v))

    def linear_system_variables(self) -> Tensor:
        """Current v_i of all blocks, (m, d_y)."""
        return self.v.current_all(self.iteration)
