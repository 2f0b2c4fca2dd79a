"""RSVRB (Guo, Hu, Zhang, Yang 2021, arXiv 2105.02266), the multi-block baseline of the BSVRB paper, as
in the authors' `RSVRB()` (BSVRB_ICML2023, HO/main.py), with the library's fixes (eigenvalue floor instead
of a Frobenius rescale, linear solves instead of inverses).

Per iteration t: blocks I_t (B of m) with samples, and an independent second block sample I'_t.
Randomised STORM (`mbbo.trackers.RandomizedSTORM`, ratio m/B) on four per-block estimators:
s_i ~ grad_y g_i, v_i ~ grad_y f_i, V_i ~ grad_xy g_i (a d_x x d_y matrix), H_i ~ grad_yy g_i:

    i in I_t:  e_i <- (1 - beta)(e_i - (m/B) e_i(x_{t-1}, y_{i,t-1}; xi)) + (m/B) e_i(x_t, y_{i,t}; xi)
    i not in I_t:  e_i <- (1 - beta) e_i;         H_i <- Proj_{H >= mu I}(H_i)
    y_i <- y_i - tau s_i                                              for ALL blocks
    G_t = (1/B) sum_{j in I'_t} [grad_x f_j - V_j H_j^{-1} v_j]      (estimators after iteration t)
    d <- (1 - beta)(d - G_{t-1}) + G_t                               (G_{t-1}: same blocks, estimators of t-1)
    x <- x - eta d

Everything unsampled is decayed lazily: each block stores its estimators at its last update and reads
them scaled by (1 - beta)^k (`MovingBlocks` for y_i and s_i; stamps for v_i, V_i, H_i). H_i is stored as
its floored eigen-decomposition, so floor((1-beta)^k H) = U max((1-beta)^k Lambda, mu) U^T costs no new
eigh. When x is sparse (one entry per data row), V_i is kept as decaying sparse row contributions
(`DecayingSparseRows`), never as a dense n x d_y matrix per block. grad_x f (absent in the HO task) is
sampled on I'_t at both points rather than tracked per block.

The sampled blocks are processed in ascending block order (the authors loop over all blocks), which fixes
which block gets which slice of a reshuffled row batch. `block_sampling="reshuffle"` draws I_t and I'_t from
two permutations consumed in step (the authors' `task_ind`, `task_ind2`). `estimator_init="uniform"` draws
s_i, v_i, H_i (then symmetrised and floored) and d from U[0, 1) as the authors do, except V_i, which starts at
zero: a dense U[0, 1) n x d_y matrix per block would cost O(m n d_y) memory, and its weight decays as
(1 - beta)^t. Restarts re-initialise from a mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mbbo.algorithms.base import Hyper, MultiBlockAlgorithm, MultiBlockConfig
from mbbo.blocks import BlockSampler, DecayingSparseRows, MovingBlocks
from mbbo.oracles import XGrad
from mbbo.problem import Batch, MultiBlockProblem
from mbbo.projections import eig_compose, eig_solve, floored_eigh
from mbbo.state import UNSET
from mbbo.trackers import STORM, RandomizedSTORM
from mbbo.validation import check_positive, check_real


@dataclass
class RSVRBConfig(MultiBlockConfig):
    """Defaults from run_RSVRB.sh: eta = 1e-3, tau = 0.5, beta = 0.9, B = 10."""

    hessian_floor: float = 1e-6
    jacobian_tolerance: float = 1e-16

    def validate(self, problem: MultiBlockProblem) -> None:
        super().validate(problem)
        check_positive("hessian_floor", self.hessian_floor)
        check_real("jacobian_tolerance", self.jacobian_tolerance, 0.0, 1.0, high_open=True)


class RSVRB(MultiBlockAlgorithm):
    """Randomised stochastic variance-reduced bilevel method (see module docstring)."""

    @dataclass
    class State(MultiBlockAlgorithm.State):
        y: MovingBlocks = UNSET  # lower variables, moved along s_i decaying by q = 1 - beta while unsampled
        d: Tensor = UNSET  # STORM estimate of the hypergradient
        fresh: bool = True  # the first iteration after an initialisation from mini-batches uses one point
        stamps: Tensor = UNSET  # iteration of each block's last estimator update (estimators decay lazily)
        grad_f: Tensor = UNSET  # estimates of grad_y f_i
        eigvals: Tensor = UNSET  # eigen-decomposition of the Hessian estimates, eigenvalues floored
        eigvecs: Tensor = UNSET
        jacobian: DecayingSparseRows | Tensor = UNSET  # cross-Jacobian estimates (sparse rows when x is sparse)
        block_sampler: BlockSampler = UNSET
        second_sampler: BlockSampler = UNSET  # the independent block sample of the upper gradient

    name = "rsvrb"
    Config = RSVRBConfig
    shardable = True

    def __init__(self, problem: MultiBlockProblem, config: Hyper | None = None, *, seed: int = 0,
                 compile: bool = False, **overrides: Any) -> None:
        super().__init__(problem, config, seed=seed, compile=compile, **overrides)
        cfg, pb = self.config, problem
        m = pb.num_blocks
        self.block_sampler = BlockSampler(m, cfg.block_batch, cfg.block_sampling, cfg.block_strata)
        self.second_sampler = BlockSampler(m, cfg.block_batch, cfg.block_sampling, cfg.block_strata)
        self.tracker = RandomizedSTORM(cfg.beta, m, cfg.block_batch)
        self.q = 1.0 - cfg.beta
        self.d = torch.zeros_like(self.x)
        self._initialise(self.shard.table(pb.y0), cfg.estimator_init)

    def _initialise(self, y: Tensor, how: str) -> None:
        """All blocks' estimators from one mini-batch each at (x, y) (in chunks, `blockwise_tables`), or filled
        (see the module docstring), as of the previous iteration."""
        cfg, pb, t = self.config, self.problem, self.iteration
        sparse: list[DecayingSparseRows] = []

        def rows(blocks: Tensor, lower: Batch, upper: Batch) -> dict[str, Tensor]:
            xs, ys = self.x.unsqueeze(0), y[blocks].unsqueeze(0)
            gy, hess, jac = self.oracles.lower_second_order(xs, ys, lower, blocks)
            _, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)
            eigvals, eigvecs = floored_eigh(hess[0], cfg.hessian_floor)
            out = {"s": gy[0], "grad_f": gy_f[0], "eigvals": eigvals, "eigvecs": eigvecs}
            if not pb.sparse_x:
                return {**out, "jacobian": jac.values[0]}
            if not sparse:  # its row count is the mini-batch size, known from the first chunk
                sparse.append(self._sparse_jacobian(jac.values.shape[2]))
            sparse[0].add(blocks, jac.index, jac.values[0], t - 1)
            return out

        if how == "first_batch":
            tables = self.blockwise_tables(rows)
        else:
            s0, grad_f = self.filled_table(y, how), self.filled_table(y, how)
            eigvals, eigvecs = floored_eigh(self.filled_table(y.new_empty(y.shape[0], y.shape[1], y.shape[1]), how),
                                            cfg.hessian_floor)
            self.d = self.filled(self.x, how)
            tables = {"s": s0, "grad_f": grad_f, "eigvals": eigvals, "eigvecs": eigvecs}
            if pb.sparse_x:
                sparse.append(self._sparse_jacobian(self.lower_sampler.batch_size))
            else:
                tables["jacobian"] = self.x.new_zeros(self.shard.num_local, pb.dim_x, pb.dim_y)
        self.y = MovingBlocks(y.clone(), tables["s"], self.hyper("lower_lr"), decay=self.q, copy=False)
        self.y.stamps.fill_(t)
        # estimators stamped t - 1; read at iteration k as value * q^(k - stamp)
        self.stamps = torch.full((self.shard.num_local,), t - 1, dtype=torch.long, device=self.x.device)
        self.grad_f, self.eigvals, self.eigvecs = tables["grad_f"], tables["eigvals"], tables["eigvecs"]
        self.jacobian = sparse[0] if sparse else tables["jacobian"]
        self._written = self.x[:0]
        self.fresh = how == "first_batch"

    def _sparse_jacobian(self, rows: int) -> DecayingSparseRows:
        """An empty table of the cross-Jacobian estimates' sparse rows (`rows` per contribution)."""
        return DecayingSparseRows(self.shard.num_local, rows, self.problem.dim_y, self.q,
                                  tolerance=self.config.jacobian_tolerance, dtype=self.x.dtype, device=self.x.device)

    def restart(self) -> None:
        """Re-initialises the estimators from a mini-batch at the current point (lower variables carried over)."""
        self._initialise(self.lower_variables(), "first_batch")

    def set_hyper(self, **changes: Any) -> None:
        super().set_hyper(**changes)
        self.y.step = self.hyper("lower_lr")

    # --- lazily decayed estimators --------------------------------------------------------------------
    def _factor(self, blocks: Tensor, t: int) -> Tensor:
        return self.q ** (t - self.stamps[blocks]).to(self.x.dtype)

    def _estimates(self, blocks: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """(v_i, H_i eigenvalues floored, eigenvectors) as they stand after iteration t."""
        f = self._factor(blocks, t)
        lam = (self.eigvals[blocks] * f[:, None]).clamp_min(self.config.hessian_floor)
        return self.grad_f[blocks] * f[:, None], lam, self.eigvecs[blocks]

    def _jacobian_times(self, blocks: Tensor, w: Tensor, t: int) -> XGrad:
        """V_i(t) w_i for the given blocks, as (1, B, ...) x-space values."""
        if isinstance(self.jacobian, DecayingSparseRows):
            index, values = self.jacobian.matvec(blocks, w, t)
            return XGrad(values.unsqueeze(0), index)
        f = self._factor(blocks, t)
        return XGrad((torch.einsum("bxy,by->bx", self.jacobian[blocks], w) * f[:, None]).unsqueeze(0))

    def _cross_terms(self, blocks: Tensor, t: int) -> XGrad:
        """V_j H_j^{-1} v_j of the given blocks with the estimators after iteration t."""
        v, lam, vecs = self._estimates(blocks, t)
        return self._jacobian_times(blocks, eig_solve(lam, vecs, v), t)

    def _hypergradient(self, cross: XGrad, gx_f: XGrad | None, point: int) -> Tensor:
        """(1/B) sum_j grad_x f_j - V_j H_j^{-1} v_j over the second sample (all of its blocks)."""
        g = -cross.block_mean(self.problem.dim_x)[0]
        return g if gx_f is None else g + gx_f.point(point).block_mean(self.problem.dim_x)[0]

    # --- the iteration --------------------------------------------------------------------------------
    def step(self) -> None:
        t, cfg, pb = self.iteration, self.config, self.problem
        gen = self.generators
        # ascending order, as the authors' loop over all blocks assigns the row slices
        sampled = self.block_sampler.sample(gen["blocks"], self.x.device).sort().values
        second_sampled = self.second_sampler.sample(gen["extra"], self.x.device).sort().values
        lower, upper = self.sample_batches(sampled)
        # table rows of the sampled blocks this process owns (all of them in a 1-process run)
        blocks, second = self.shard.local(sampled), self.shard.local(second_sampled)
        y_cur, y_prev = self.y.read(blocks, t)
        two = not self.fresh
        xs = torch.stack([self.x, self.x_prev]) if two else self.x.unsqueeze(0)
        ys = torch.stack([y_cur, y_prev]) if two else y_cur.unsqueeze(0)

        gy, hess, jac = self.oracles.lower_second_order(xs, ys, lower, blocks)
        _, gy_f = self.oracles.upper_grads(xs, ys, upper, blocks)

        gx_f = None
        if pb.upper_depends_on_x:
            y2_cur, y2_prev = self.y.read(second, t)
            y2 = torch.stack([y2_cur, y2_prev]) if two else y2_cur.unsqueeze(0)
            _, upper2 = self.sample_batches(second_sampled)
            gx_f, _ = self.oracles.upper_grads(xs, y2, upper2, second)
        cross_old = self._cross_terms(second, t - 1) if two else None

        # randomised STORM on the sampled blocks (previous values = as after iteration t-1)
        track = self.tracker.update
        v_prev, lam_prev, vecs_prev = self._estimates(blocks, t - 1)
        s_new = track(self.y.direction(blocks, t), gy[0], gy[-1])
        self.grad_f[blocks] = track(v_prev, gy_f[0], gy_f[-1])
        h_new = track(eig_compose(lam_prev, vecs_prev), hess[0], hess[-1])
        self.eigvals[blocks], self.eigvecs[blocks] = floored_eigh(h_new, cfg.hessian_floor)
        scale = self.tracker.scale
        new_jac = scale * (jac.values[0] - self.q * jac.values[-1])
        if isinstance(self.jacobian, DecayingSparseRows):
            self.jacobian.add(blocks, jac.index, new_jac, t)
        else:
            f = self._factor(blocks, t - 1)
            self.jacobian[blocks] = self.q * self.jacobian[blocks] * f[:, None, None] + new_jac
        self.stamps[blocks] = t
        self.y.write(blocks, y_cur, s_new, t)
        self._written = torch.cat([self.grad_f[blocks].reshape(-1), self.eigvals[blocks].reshape(-1),
                                   new_jac.reshape(-1)])

        # one collective (block sharding) for the terms of both points, then the 1-process arithmetic
        cross_new, cross_old, gx_f = self.gather_xgrads([self._cross_terms(second, t), cross_old, gx_f],
                                                        second_sampled, uniform=not pb.sparse_x)
        assert cross_new is not None
        g_new = self._hypergradient(cross_new, gx_f, 0)
        g_old = None if cross_old is None else self._hypergradient(cross_old, gx_f, -1)
        self.d = g_new if g_old is None else STORM(cfg.beta).update(self.d, g_new, g_old)
        self.fresh = False
        self.x_prev = self.x
        self.x = self.x - cfg.lr * self.d
        self.iteration += 1

    def is_finite(self) -> bool:
        """NaN/inf guard of one step, O(B): x, its tracker and the block rows this step wrote."""
        return (bool(torch.isfinite(self.x).all()) and bool(torch.isfinite(self.d).all())
                and self.y.last_write_finite() and bool(torch.isfinite(self._written).all()))

    def oracle_calls_per_step(self) -> dict[str, int] | None:
        """Two points on the B sampled blocks (grad_y g, Hessian, Jacobian, grad f), and grad f on the second
        block sample when f depends on x."""
        n, upper_x = 2 * self.config.block_batch, int(self.problem.upper_depends_on_x)
        return {"grad_y_g": n, "hessian_yy": n, "jacobian_xy": n, "grad_y_f": n * (1 + upper_x),
                "grad_x_f": 2 * n * upper_x}

    def table_bytes(self) -> int:
        """Bytes held by the per-block tables (lower variables and the four estimators)."""
        dense = (self.stamps, self.grad_f, self.eigvals, self.eigvecs)
        return self.y.nbytes() + self.jacobian_memory_bytes() + sum(t.numel() * t.element_size() for t in dense)

    def jacobian_memory_bytes(self) -> int:
        """Bytes held by the cross-Jacobian estimates (dense table or sparse row buffers)."""
        if isinstance(self.jacobian, DecayingSparseRows):
            return sum(v.numel() * v.element_size() for v in self.jacobian.state_dict().values())
        return self.jacobian.numel() * self.jacobian.element_size()
