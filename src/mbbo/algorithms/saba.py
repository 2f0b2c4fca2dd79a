"""SABA (Dagreou, Ablin, Vaiter & Moreau, NeurIPS 2022) and SRBA (Dagreou, Moreau, Vaiter & Ablin, AISTATS 2024):
the SOBA directions (`mbbo.algorithms.soba`) with variance-reduced oracles, for finite-sum problems

    g(x, y) = sum_i w_i g_i(x, y),   f(x, y) = sum_j w'_j f_j(x, y)   (rows of the lower / upper data).

SABA: every oracle of the SOBA directions -- grad_y g, (grad_yy g) v, (grad_xy g) v, grad_y f, grad_x f -- is
replaced by its SAGA estimate (`mbbo.variance_reduction.SAGATable`), with constant step sizes::

    d_q = average_q + (w_s / p_s) (q_s(x, y, v) - table_q[s]),   table_q[s] <- q_s(x, y, v)     (each oracle q)
    y <- y - rho d_gy,   v <- v - rho_v (d_hv - d_fy),   x <- x - gamma (d_fx - d_jv)

Two memories (``memory``):

- ``"batch"`` (default; benchopt's ``solvers/saba.py``, the reference of the benchmark comparison): the rows
  are cut into fixed contiguous mini-batches of `batch_size` rows, one SAGA slot per mini-batch, visited in a
  fresh random order every epoch (`EpochCycler`), weight |B_k| / n. benchopt differs in three details not
  reproduced: its first epoch is unshuffled, every epoch repeats its last batch once (an off-by-one), and its
  last partial batch reads an overlapping full-size slice while being weighted (n mod b) / n. Here a partial
  last batch is read as is and its correction is scaled by K |B_k| / n (1 for full batches), which keeps the
  direction unbiased.
- ``"sample"``: one slot per row (classic SAGA, the paper's analysis): `batch_size` distinct rows per step,
  per-sample oracle values from one vmapped call (b rows as b blocks of one row), direction
  average + (1/b) sum_s (q_s - table[s]). Needs a dense x (a table of n x d_x per-sample cross terms).

Memory starts at zero as in benchopt (``init_memory="zero"``; its ``mode_init_memory`` option is ignored by its
code), or with one full pass at the initial point (``"full"``). Oracle counts: a per-sample evaluation of b
rows counts as one mini-batch call, like the mini-batch of the other algorithms; a full pass counts one call
per chunk (``full_batch_chunk``, default: all rows in one call).

SRBA: SARAH-type recursive estimates of the three SOBA directions (`mbbo.variance_reduction.SARAH`), refreshed
by a full pass every `period` iterations (benchopt: period = int((n_inner + n_outer) * period_frac / b))::

    t mod period == 0:  (d_y, d_v, d_x) = D(x_t, y_t, v_t; all rows)
    otherwise:          d <- d + D(x_t, y_t, v_t; B, B') - D(x_{t-1}, y_{t-1}, v_{t-1}; B, B')   (one 2-point call)
    y <- y - rho d_y,   v <- Proj(v - rho_v d_v),   x <- x - gamma d_x

benchopt's ``solvers/srba.py`` has no projection (``v_radius=None``). Instead of a full pass,
``refresh_batch_size`` draws one large mini-batch (for problems whose samplers are not finite sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.algorithms.soba import SOBA, SOBAConfig, soba_directions, soba_move, soba_oracle_calls
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.state import UNSET
from mbbo.validation import check_choice, check_int, check_optional, check_positive
from mbbo.variance_reduction import (
    SARAH,
    EpochCycler,
    FiniteSumRows,
    SAGATable,
    benchopt_period,
    distinct_rows,
)


def finite_sum_reason(problem: MultiBlockProblem) -> str | None:
    """Why the lower or upper sampler of `problem` is not a finite sum of stored rows (None when both are)."""
    for which, sampler in (("lower", problem.lower_sampler), ("upper", problem.upper_sampler)):
        reason = FiniteSumRows.unsupported(sampler)
        if reason:
            return f"it {reason} (the {which} sampler)"
    return None


def sampler_batch_size(sampler: Any, batch_size: int | None) -> int:
    """The mini-batch size in use: `batch_size`, else the sampler's own, else all its rows (FullBatch)."""
    if batch_size is not None:
        return batch_size
    own = getattr(sampler, "batch_size", None)
    return int(own) if own is not None else FiniteSumRows(sampler).n_rows


class FullPassRefresh:
    """The data of the periodic refreshes of SRBA and VRBO (a building block each of them holds as `refresh`).

    ``refresh_batch_size=None`` (config): exact full passes over the rows of finite-sum samplers (chunked by
    ``full_batch_chunk``); otherwise one large fresh mini-batch per refresh and level, used for every lower
    (resp. upper) quantity of that refresh.
    """

    def __init__(self, problem: MultiBlockProblem) -> None:
        finite = finite_sum_reason(problem) is None
        self.lower_rows = FiniteSumRows(problem.lower_sampler) if finite else None
        self.upper_rows = FiniteSumRows(problem.upper_sampler) if finite else None

    def evaluators(self, alg: SingleBlockAlgorithm) -> tuple[Any, Any]:
        """(lower, upper): functions fn -> fn evaluated on the refresh data of that level."""
        cfg = alg.config
        if cfg.refresh_batch_size is not None:
            lower = alg.lower_batch(cfg.refresh_batch_size)
            upper = alg.upper_batch(cfg.refresh_batch_size)
            return (lambda fn: fn(lower)), (lambda fn: fn(upper))
        assert self.lower_rows is not None and self.upper_rows is not None
        lower_rows, upper_rows = self.lower_rows, self.upper_rows
        return ((lambda fn: lower_rows.full_pass(fn, cfg.full_batch_chunk)),
                (lambda fn: upper_rows.full_pass(fn, cfg.full_batch_chunk)))

    def period(self, alg: SingleBlockAlgorithm) -> int:
        """Iterations between refreshes: the config's `period`, else benchopt's rule from the data sizes."""
        cfg = alg.config
        if cfg.period is not None:
            return int(cfg.period)
        assert self.lower_rows is not None and self.upper_rows is not None
        b = sampler_batch_size(alg.problem.lower_sampler, cfg.batch_size)
        return benchopt_period(self.lower_rows.n_rows, self.upper_rows.n_rows, cfg.period_frac, b)

    def sarah(self, alg: SingleBlockAlgorithm) -> SARAH:
        """The SARAH / SPIDER estimator with this period."""
        return SARAH(self.period(alg))


def validate_refresh(cfg: Any, problem: MultiBlockProblem) -> None:
    """Checks period / period_frac / refresh_batch_size / full_batch_chunk of SRBA and VRBO."""
    check_optional(check_int, "period", cfg.period, 1)
    check_positive("period_frac", cfg.period_frac)
    check_optional(check_int, "refresh_batch_size", cfg.refresh_batch_size, 1)
    check_optional(check_int, "full_batch_chunk", cfg.full_batch_chunk, 1)
    reason = finite_sum_reason(problem)
    if reason and cfg.refresh_batch_size is None:
        raise ValueError(f"refresh_batch_size=None asks for exact full passes, but {reason}; "
                         "set refresh_batch_size to a large mini-batch size")
    if reason and cfg.period is None:
        raise ValueError(f"period=None derives the period from the data size, but {reason}; set period")


# --- SABA -------------------------------------------------------------------------------------------------


@dataclass
class SABAConfig(SOBAConfig):
    """Defaults: benchopt SABA's best parameters on quadratics_021424 (step_size 0.1, outer_ratio 1), which are
    also its class defaults; constant steps (exponents 0)."""

    lr_exponent: float = 0.0
    lower_lr_exponent: float = 0.0
    linsys_lr_exponent: float = 0.0
    memory: str = "batch"
    init_memory: str = "zero"
    full_batch_chunk: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_choice("memory", self.memory, ("batch", "sample"))
        check_choice("init_memory", self.init_memory, ("zero", "full"))
        check_optional(check_int, "full_batch_chunk", self.full_batch_chunk, 1)
        if self.memory == "sample" and problem.sparse_x:
            raise ValueError("memory='sample' keeps per-sample cross terms of size d_x and needs a dense x; "
                             "this problem has sparse_x=True: use memory='batch'")
        if finite_sum_reason(problem) is None:
            for which, sampler in (("lower", problem.lower_sampler), ("upper", problem.upper_sampler)):
                n = FiniteSumRows(sampler).n_rows
                b = sampler_batch_size(sampler, self.batch_size)
                if self.memory == "sample" and b > n:
                    raise ValueError(f"batch_size={b} exceeds the {n} rows of the {which} data (memory='sample' "
                                     "draws distinct rows)")


class SABA(SingleBlockAlgorithm):
    """SABA: SOBA with SAGA on all five oracles (see module doc). Per iteration: one lower mini-batch (grad_y g,
    H v, J v from one graph) and one upper mini-batch (grad f), like SOBA; memory O(slots x (2 d_y + d_x))
    for the lower level and O(slots x (d_y + d_x)) for the upper level."""

    @dataclass
    class State(SOBA.State):
        lower_table: SAGATable = UNSET  # SAGA memory of the lower oracles (grad_y g | H v | J v)
        upper_table: SAGATable = UNSET  # SAGA memory of the upper oracles (grad_y f | grad_x f)
        lower_cycler: EpochCycler | None = None  # memory='batch': the order of the lower mini-batches
        upper_cycler: EpochCycler | None = None

    name = "saba"
    Config = SABAConfig
    #: "always" or "by default": whether the algorithm needs samplers over stored rows (static fit checks)
    needs_finite_sum: ClassVar[str | None] = "always"
    v: Tensor
    FIXED = ("memory", "init_memory", "batch_size")

    @classmethod
    def unsuitable_for(cls, problem: MultiBlockProblem) -> str | None:
        return super().unsuitable_for(problem) or finite_sum_reason(problem)

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)
        cfg, pb = self.config, problem
        self.lower_rows, self.upper_rows = FiniteSumRows(pb.lower_sampler), FiniteSumRows(pb.upper_sampler)
        self.lower_size = sampler_batch_size(pb.lower_sampler, cfg.batch_size)
        self.upper_size = sampler_batch_size(pb.upper_sampler, cfg.batch_size)
        dy, dx, dtype, dev = pb.dim_y, pb.dim_x, self.x.dtype, self.x.device
        if cfg.memory == "batch":
            self.lower_parts = self.lower_rows.partition(self.lower_size)
            self.upper_parts = self.upper_rows.partition(self.upper_size)
            self.lower_cycler, self.upper_cycler = EpochCycler(len(self.lower_parts)), EpochCycler(
                len(self.upper_parts))
            lw = self._part_weights(self.lower_parts, self.lower_rows.n_rows)
            uw = self._part_weights(self.upper_parts, self.upper_rows.n_rows)
        else:
            lw = torch.full((self.lower_rows.n_rows,), 1.0 / self.lower_rows.n_rows, dtype=dtype, device=dev)
            uw = torch.full((self.upper_rows.n_rows,), 1.0 / self.upper_rows.n_rows, dtype=dtype, device=dev)
        # one table per level, oracles concatenated: lower (grad_y g | H v | J v), upper (grad_y f | grad_x f)
        self.lower_table = SAGATable(lw, (2 * dy + dx,), dtype=dtype, device=dev)
        self.upper_table = SAGATable(uw, (dy + dx,), dtype=dtype, device=dev)
        self._init_memory()

    @staticmethod
    def _part_weights(parts: list[Tensor], n: int) -> Tensor:
        return torch.tensor([p.numel() / n for p in parts], dtype=torch.float64)

    # --- oracle values per slot ---------------------------------------------------------------------------
    def _one_call(self, b: int, fn: Any) -> Any:
        """Runs a per-sample oracle call on b rows and counts it as one mini-batch call per oracle kind."""
        before = dict(self.oracles.counts)
        out = fn()
        for kind, count in self.oracles.counts.items():
            self.oracles.counts[kind] = before.get(kind, 0) + (count - before.get(kind, 0)) // b
        return out

    def _lower_values(self, batch: Batch, b: int | None) -> Tensor:
        """(k, 2 d_y + d_x) rows (grad_y g | H v | J v): k = 1 for a mini-batch, k = b per sample."""
        if b is None:
            gy, hv, jv = self.lower_products(self.x, self.y, self.v, batch)
            return torch.cat([gy, hv, jv]).unsqueeze(0)
        blocks = torch.zeros(b, dtype=torch.long, device=self.x.device)
        ys = self.y.expand(1, b, -1)
        vs = self.v.expand(1, b, -1)
        gy, hv, jv = self._one_call(b, lambda: self.oracles.lower_products(self.x.unsqueeze(0), ys, vs, batch,
                                                                           blocks))
        return torch.cat([gy[0], hv[0], jv.values[0]], dim=-1)

    def _upper_values(self, batch: Batch, b: int | None) -> Tensor:
        """(k, d_y + d_x) rows (grad_y f | grad_x f)."""
        if b is None:
            gx_f, gy_f = self.upper_grads(self.x, self.y, batch)
            return torch.cat([gy_f, gx_f]).unsqueeze(0)
        blocks = torch.zeros(b, dtype=torch.long, device=self.x.device)
        gx, gy = self._one_call(b, lambda: self.oracles.upper_grads(self.x.unsqueeze(0), self.y.expand(1, b, -1),
                                                                    batch, blocks))
        gx_dense = torch.zeros(b, self.problem.dim_x, dtype=gy.dtype, device=gy.device) if gx is None \
            else gx.values[0]
        return torch.cat([gy[0], gx_dense], dim=-1)

    def _init_memory(self) -> None:
        self.lower_table.reset()
        self.upper_table.reset()
        if self.config.init_memory != "full":
            return
        if self.config.memory == "batch":
            for k, part in enumerate(self.lower_parts):
                self.lower_table.store(torch.tensor([k]), self._lower_values(self.lower_rows.gather(part), None))
            for k, part in enumerate(self.upper_parts):
                self.upper_table.store(torch.tensor([k]), self._upper_values(self.upper_rows.gather(part), None))
            return
        chunk = self.config.full_batch_chunk
        for rows, table, values in ((self.lower_rows, self.lower_table, self._lower_values),
                                    (self.upper_rows, self.upper_table, self._upper_values)):
            for part in rows.partition(chunk or rows.n_rows):
                table.store(part, values(rows.per_sample(part), part.numel()))

    def _sample(self, level: str) -> tuple[Tensor, Batch, int | None, float]:
        """(slots, batch, per-sample count or None, inclusion probability) for the lower or upper level."""
        rows = self.lower_rows if level == "lower" else self.upper_rows
        gen = self.generators[level]
        if self.config.memory == "batch":
            cycler = self.lower_cycler if level == "lower" else self.upper_cycler
            parts = self.lower_parts if level == "lower" else self.upper_parts
            k = cycler.next(gen)
            return torch.tensor([k]), rows.gather(parts[k]), None, 1.0 / len(parts)
        b = self.lower_size if level == "lower" else self.upper_size
        idx = distinct_rows(rows.n_rows, b, gen)
        return idx, rows.per_sample(idx), b, b / rows.n_rows

    # --- the iteration --------------------------------------------------------------------------------------
    def step(self) -> None:
        dy = self.problem.dim_y
        slots, batch, b, p = self._sample("lower")
        d_lower = self.lower_table.update(slots, self._lower_values(batch, b), p)
        slots, batch, b, p = self._sample("upper")
        d_upper = self.upper_table.update(slots, self._upper_values(batch, b), p)
        d_gy, d_hv, d_jv = d_lower[:dy], d_lower[dy:2 * dy], d_lower[2 * dy:]
        d_fy, d_fx = d_upper[:dy], d_upper[dy:]
        soba_move(self, d_gy, d_hv, d_fy, d_fx - d_jv)

    def restart(self) -> None:
        """Re-initialises the SAGA memories (zero, or a full pass at the current point)."""
        self._init_memory()

    def set_hyper(self, **changes: Any) -> None:
        fixed = sorted(set(changes) & set(self.FIXED))
        if fixed:
            raise ValueError(f"{fixed} fix the SAGA memory layout and cannot change after construction")
        super().set_hyper(**changes)

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        return soba_oracle_calls(self)

    def linear_system_variables(self) -> Tensor:
        return self.v.unsqueeze(0)


# --- SRBA -------------------------------------------------------------------------------------------------


@dataclass
class SRBAConfig(SOBAConfig):
    """Defaults: benchopt SRBA's best parameters on quadratics_021424 (step_size 0.1, outer_ratio 1,
    period_frac 0.5); constant steps (exponents 0). ``period`` overrides the period_frac rule."""

    lr_exponent: float = 0.0
    lower_lr_exponent: float = 0.0
    linsys_lr_exponent: float = 0.0
    period: int | None = None
    period_frac: float = 0.5
    refresh_batch_size: int | None = None
    full_batch_chunk: int | None = None

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        validate_refresh(self, problem)


class SRBA(SingleBlockAlgorithm):
    """SRBA: SARAH estimates of the SOBA directions with a periodic full refresh (see module doc). Per
    non-refresh iteration: one lower and one upper mini-batch, each evaluated at two points in one call."""

    @dataclass
    class State(SOBA.State):
        d_y: Tensor = UNSET  # SARAH estimates of the SOBA directions
        d_v: Tensor = UNSET
        d_x: Tensor = UNSET
        y_prev: Tensor = UNSET
        v_prev: Tensor = UNSET
        since_refresh: int = 0  # iterations since the last full refresh

    name = "srba"
    Config = SRBAConfig
    #: whether the algorithm needs samplers over stored rows (static fit checks)
    needs_finite_sum: ClassVar[str | None] = "by default"
    v: Tensor

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        self.v = torch.zeros_like(self.y)
        self.refresh = FullPassRefresh(problem)
        self.d_y = torch.zeros_like(self.y)
        self.d_v = torch.zeros_like(self.y)
        self.d_x = torch.zeros_like(self.x)
        self.y_prev = self.y.clone()
        self.v_prev = self.v.clone()
        self.since_refresh = 0

    def step(self) -> None:
        sarah = self.refresh.sarah(self)
        if sarah.refresh_due(self.since_refresh):
            lower, upper = self.refresh.evaluators(self)
            gy, hv, jv = lower(lambda b: self.lower_products(self.x, self.y, self.v, b))
            gx_f, gy_f = upper(lambda b: self.upper_grads(self.x, self.y, b))
            self.d_y, self.d_v, self.d_x = gy, hv - gy_f, gx_f - jv
        else:
            bs = self.config.batch_size
            xs, ys, vs = (torch.stack(p) for p in ((self.x, self.x_prev), (self.y, self.y_prev),
                                                   (self.v, self.v_prev)))
            gy, hv, jv, gx_f, gy_f = soba_directions(self, xs, ys, vs, self.lower_batch(bs), self.upper_batch(bs))
            dv, dx = hv - gy_f, gx_f - jv
            self.d_y = sarah.update(self.d_y, gy[0], gy[1])
            self.d_v = sarah.update(self.d_v, dv[0], dv[1])
            self.d_x = sarah.update(self.d_x, dx[0], dx[1])
        self.y_prev, self.v_prev = self.y, self.v
        # soba_move(..., H v, b, ...) moves v along H v - b: passing (d_v, 0) moves it along d_v
        soba_move(self, self.d_y, self.d_v, torch.zeros_like(self.d_v), self.d_x)
        self.since_refresh += 1

    def restart(self) -> None:
        """The next iteration refreshes the estimates."""
        self.since_refresh = 0

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        return None  # a refresh iteration makes a full pass, the others two points

    def linear_system_variables(self) -> Tensor:
        return self.v.unsqueeze(0)
