"""Multi-block quadratic bilevel problems with closed forms (specs/tasks.md, T3, multi-block part).

    g_i(x, y) = 1/2 y^T A_i y + x^T C_i y + a_i^T y                      (A_i symmetric positive definite)
    f_i(x, y) = 1/2 y^T F_i y + x^T K_i y + 1/2 x^T H_i x + h_i^T x + f_i^T y

    y_i*(x) = -A_i^{-1}(a_i + C_i^T x),   v_i = A_i^{-1} grad_y f_i,   grad F_i = K_i y_i* + H_i x + h_i - C_i v_i.

Stochastic oracles: a sample adds `noise_g^T y` to g_i and `noise_f^T y` to f_i (unbiased gradient noise of
standard deviation `noise`) and scales the quadratic term of g_i by a factor with mean 1 and standard deviation
`hessian_noise` (noisy Hessians). With `interpolating=True` every block's hypergradient vanishes at one common
x* (so block sampling adds no noise at the solution and variance-reduced methods converge exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mbbo.problem import Batch, MultiBlockProblem, NoiseSampler
from mbbo.tasks.block_eval import (
    block_chunks,
    check_eval_blocks,
    evaluation_blocks,
    gather_block_rows,
    lower_rows,
    mean_and_sem,
    owned_blocks,
)
from mbbo.tasks.registry import TaskSpec, register_task

if TYPE_CHECKING:  # quadratic_seeded imports this module
    from mbbo.tasks.quadratic_seeded import SeededQuadratic


def _spd(n: int, d: int, low: float, high: float, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=dtype))
    eig = low + (high - low) * torch.rand(n, d, generator=gen, dtype=dtype)
    return (q * eig.unsqueeze(-2)) @ q.transpose(-1, -2)


@dataclass
class MultiBlockQuadratic:
    """Coefficients (leading dimension m) and closed forms of a multi-block quadratic bilevel problem."""

    A: Tensor
    C: Tensor
    a: Tensor
    F: Tensor
    K: Tensor
    H: Tensor
    h: Tensor
    f: Tensor

    @classmethod
    def random(
        cls,
        num_blocks: int,
        dim_x: int,
        dim_y: int,
        *,
        seed: int = 0,
        mu: float = 1.0,
        L: float = 4.0,
        interpolating: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> MultiBlockQuadratic:
        """Random instance: Hessians of g with spectra in [mu, L]; upper Hessians in [0.5, 2]."""
        if num_blocks < 1 or dim_x < 1 or dim_y < 1:
            raise ValueError(f"num_blocks, dim_x, dim_y must be >= 1, got {num_blocks}, {dim_x}, {dim_y}")
        if not 0 < mu <= L:
            raise ValueError(f"need 0 < mu <= L, got mu={mu}, L={L}")
        gen = torch.Generator().manual_seed(seed)
        m, dx, dy = num_blocks, dim_x, dim_y
        A = _spd(m, dy, mu, L, gen, dtype)
        C = torch.randn(m, dx, dy, generator=gen, dtype=dtype) / dx**0.5
        a = torch.randn(m, dy, generator=gen, dtype=dtype)
        F = _spd(m, dy, 0.5, 2.0, gen, dtype)
        H = _spd(m, dx, 0.5, 2.0, gen, dtype)
        if interpolating:
            # f_i = 1/2 (y - y_i*(x*))^T F_i (y - y_i*(x*)) + 1/2 (x - x*)^T H_i (x - x*) (+ const)
            x_star = torch.randn(dx, generator=gen, dtype=dtype)
            K = torch.zeros(m, dx, dy, dtype=dtype)
            pb = cls(A, C, a, F, K, H, torch.zeros(m, dx, dtype=dtype), torch.zeros(m, dy, dtype=dtype))
            target = pb.lower_solution(x_star)
            return cls(
                A,
                C,
                a,
                F,
                K,
                H,
                -(H @ x_star.unsqueeze(-1)).squeeze(-1),
                -(F @ target.unsqueeze(-1)).squeeze(-1),
            )
        K = torch.randn(m, dx, dy, generator=gen, dtype=dtype) / dx**0.5
        h = torch.randn(m, dx, generator=gen, dtype=dtype)
        f = torch.randn(m, dy, generator=gen, dtype=dtype)
        return cls(A, C, a, F, K, H, h, f)

    @property
    def num_blocks(self) -> int:
        return self.A.shape[0]

    # --- closed forms ---------------------------------------------------------------------------------
    def lower_solution(self, x: Tensor) -> Tensor:
        """y_i*(x) = -A_i^{-1}(a_i + C_i^T x): (m, d_y)."""
        rhs = self.a + torch.einsum("mxy,x->my", self.C, x)
        return -torch.linalg.solve(self.A, rhs)

    def upper_grad_y(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.einsum("myz,mz->my", self.F, y) + torch.einsum("mxy,x->my", self.K, x) + self.f

    def upper_grad_x(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.einsum("mxy,my->mx", self.K, y) + torch.einsum("mxz,z->mx", self.H, x) + self.h

    def linear_system_solution(self, x: Tensor) -> Tensor:
        """v_i = A_i^{-1} grad_y f_i(x, y_i*(x))."""
        return torch.linalg.solve(self.A, self.upper_grad_y(x, self.lower_solution(x)))

    def block_hypergradients(self, x: Tensor) -> Tensor:
        """grad F_i(x) for every block: (m, d_x)."""
        y = self.lower_solution(x)
        v = self.linear_system_solution(x)
        return self.upper_grad_x(x, y) - torch.einsum("mxy,my->mx", self.C, v)

    def hypergradient(self, x: Tensor) -> Tensor:
        """grad F(x) = (1/m) sum_i grad F_i(x)."""
        return self.block_hypergradients(x).mean(0)

    def block_objectives(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """F_i(x) = f_i(x, y_i*(x)) for every block: (m,) (y: y*(x) if already computed)."""
        y = self.lower_solution(x) if y is None else y
        quad = 0.5 * torch.einsum("my,myz,mz->m", y, self.F, y) + torch.einsum("x,mxy,my->m", x, self.K, y)
        lin = 0.5 * torch.einsum("x,mxz,z->m", x, self.H, x) + self.h @ x + (self.f * y).sum(-1)
        return quad + lin

    def objective(self, x: Tensor) -> Tensor:
        return self.block_objectives(x).mean()

    def subset(self, blocks: Tensor) -> MultiBlockQuadratic:
        """The quadratic restricted to the given blocks."""
        return MultiBlockQuadratic(*(getattr(self, k)[blocks] for k in ("A", "C", "a", "F", "K", "H", "h", "f")))

    def block_metrics(self, x: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(grad F_i(x) (k, d_x), F_i(x) (k,), y_i*(x) (k, d_y)) for the given blocks."""
        sub = self.subset(blocks)
        y = sub.lower_solution(x)
        return sub.block_hypergradients(x), sub.block_objectives(x, y), y

    def minimiser(self) -> Tensor:
        """x* solving grad F(x) = 0 (F is a convex quadratic: one linear solve)."""
        dx = self.C.shape[1]
        zero = torch.zeros(dx, dtype=self.A.dtype)
        g0 = self.hypergradient(zero)
        jac = torch.stack([self.hypergradient(e) - g0 for e in torch.eye(dx, dtype=self.A.dtype)], dim=1)
        return torch.linalg.solve(jac, -g0)

    # --- as a problem of the engine -------------------------------------------------------------------
    def lower_loss(self, x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
        scale = 1.0 + batch["hessian_noise"].mean()
        A, C, a = batch["A"], batch["C"], batch["a"]
        # matrix-vector products (A @ y), whose vmap batching rules avoid copying A per point
        return 0.5 * scale * (y @ (A @ y)) + x @ (C @ y) + (a + batch["noise_g"].mean(0)) @ y

    def upper_loss(self, x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
        F, K, H, h, f = batch["F"], batch["K"], batch["H"], batch["h"], batch["f"]
        return 0.5 * (y @ (F @ y)) + x @ (K @ y) + 0.5 * (x @ (H @ x)) + h @ x + (f + batch["noise_f"].mean(0)) @ y

    def problem(
        self,
        *,
        noise: float = 0.0,
        hessian_noise: float = 0.0,
        batch_size: int = 1,
        x0: Tensor | None = None,
        y0: Tensor | None = None,
    ) -> MultiBlockProblem:
        """The engine's problem; `noise`/`hessian_noise` are per-sample standard deviations."""
        if noise < 0 or hessian_noise < 0:
            raise ValueError(f"noise levels must be >= 0, got noise={noise}, hessian_noise={hessian_noise}")
        m, dx, dy = self.num_blocks, self.C.shape[1], self.C.shape[2]
        dtype = self.A.dtype
        lower = _ScaledNoise({"noise_g": (dy,), "hessian_noise": ()}, batch_size, noise, hessian_noise, dtype)
        upper = _ScaledNoise({"noise_f": (dy,)}, batch_size, noise, 0.0, dtype)
        x0 = torch.zeros(dx, dtype=dtype) if x0 is None else x0
        y0 = torch.zeros(m, dy, dtype=dtype) if y0 is None else y0
        coefficients = {
            "A": self.A,
            "C": self.C,
            "a": self.a,
            "F": self.F,
            "K": self.K,
            "H": self.H,
            "h": self.h,
            "f": self.f,
        }
        return MultiBlockProblem(
            self.upper_loss, self.lower_loss, x0, y0, lower, upper, block_data=coefficients, name="quadratic"
        )


class _ScaledNoise(NoiseSampler):
    """Mini-batch means of per-sample noise, drawn directly: N(0, std^2 / b) gradient noise (`noise_g` or
    `noise_f`) and N(0, hessian_std^2 / b) Hessian-scale noise, as one row per block (the losses average rows)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], batch_size: int, std: float, hessian_std: float,
                 dtype: torch.dtype) -> None:
        super().__init__(shapes, batch_size, std=std, dtype=dtype)
        self.hessian_std = hessian_std

    def sample(self, blocks: Tensor, generator: torch.Generator, batch_size: int | None = None) -> Batch:
        b = batch_size or self.batch_size
        out = {}
        for key, shape in self.shapes.items():
            std = self.hessian_std if key == "hessian_noise" else self.std
            draw = torch.randn(blocks.shape[0], 1, *shape, generator=generator, dtype=self.dtype)
            out[key] = draw * (std / b**0.5)
        return out


# ---------------------------------------------------------------------------------------------------------
# the registered task (`mbbo run --task quadratic`)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class QuadraticSettings:
    """Settings of the multi-block quadratic task (see :mod:`mbbo.tasks.quadratic`).

    Attributes:
        num_blocks, dim_x, dim_y: m, d_x and d_y.
        mu, L: spectrum range of the lower Hessians A_i (defaults in [0.25, 0.5]: the algorithms' default lower
            step sizes, up to 1, are then stable with MSVR's gamma = 1).
        interpolating: every block's hypergradient vanishes at one common x*.
        noise: per-sample standard deviation of the gradient noise.
        hessian_noise: per-sample standard deviation of the lower Hessian scale.
        batch_size: samples per sampled block.
        data_seed: seed of the random instance.
        form: "dense" (stored coefficient matrices, m (2 d_y^2 + d_x^2 + 2 d_x d_y) numbers) or "seeded"
            (`mbbo.tasks.quadratic_seeded`: structured coefficients generated per block from the seed when the
            block is sampled; memory O(1) per block, for large m).
        eval_blocks: blocks the metrics average over: None (all, in chunks), "auto" (all up to 1000, else a
            seeded subset of 1000) or K (a seeded subset of K); see `mbbo.tasks.block_eval`.
    """

    num_blocks: int = 10
    dim_x: int = 10
    dim_y: int = 5
    mu: float = 0.25
    L: float = 0.5
    interpolating: bool = False
    noise: float = 0.1
    hessian_noise: float = 0.0
    batch_size: int = 1
    data_seed: int = 0
    form: str = "dense"
    eval_blocks: int | str | None = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.form not in ("dense", "seeded"):
            raise ValueError(f"form must be 'dense' or 'seeded', got {self.form!r}")
        check_eval_blocks(self.eval_blocks)
        if self.form == "seeded" and self.interpolating:
            raise ValueError("interpolating=True needs form='dense' (the seeded form has no common minimiser)")
        for name in ("num_blocks", "dim_x", "dim_y", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.mu) and math.isfinite(self.L) and 0 < self.mu <= self.L):
            raise ValueError(f"need 0 < mu <= L (finite), got mu={self.mu!r}, L={self.L!r}")
        for name in ("noise", "hessian_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class QuadraticEvaluator:
    """Closed-form metrics of the multi-block quadratic; one epoch is one pass over the blocks.

    Metrics average over the evaluated blocks (all, or the seeded subset of `eval_blocks`), in chunks of
    `chunk` blocks: `grad_norm` = ||mean_i grad F_i(x)||, `objective` = mean_i F_i(x), `lower_error` =
    mean_i ||y_i - y_i*(x)||, with the standard errors `objective_sem` and `lower_error_sem` (0 for all blocks).
    """

    quadratic: MultiBlockQuadratic | SeededQuadratic
    eval_blocks: int | str | None = None
    seed: int = 0
    chunk: int = 4096

    def __post_init__(self) -> None:
        self.blocks = evaluation_blocks(self.quadratic.num_blocks, self.eval_blocks, self.seed)

    def iterations_per_epoch(self, block_batch: int) -> int:
        """ceil(m / B): an epoch samples as many blocks as there are."""
        return max(1, math.ceil(self.quadratic.num_blocks / block_batch))

    @torch.no_grad()
    def evaluate(self, algorithm: Any) -> dict[str, float]:
        q, m = self.quadratic, self.quadratic.num_blocks
        dtype = q.A.dtype if isinstance(q, MultiBlockQuadratic) else q.dtype
        x: Tensor = algorithm.x.to(dtype)
        grad_sum, values, errors = torch.zeros_like(x), [], []
        for blocks in block_chunks(self.blocks, m, self.chunk):
            mine = owned_blocks(algorithm, blocks)  # block-sharded: this process's blocks, gathered next
            grad, value, y_star = q.block_metrics(x, mine)
            y = lower_rows(algorithm, mine).to(dtype).reshape(len(mine), -1)
            grad, value, error = gather_block_rows(algorithm, blocks,
                                                   [grad, value, torch.linalg.vector_norm(y - y_star, dim=-1)])
            grad_sum += grad.sum(0)
            values.append(value)
            errors.append(error)
        value_all, error_all = torch.cat(values), torch.cat(errors)
        objective, objective_sem = mean_and_sem(value_all, m)
        lower_error, lower_error_sem = mean_and_sem(error_all, m)
        return {"grad_norm": float(torch.linalg.vector_norm(grad_sum / value_all.shape[0])),
                "objective": objective, "objective_sem": objective_sem,
                "lower_error": lower_error, "lower_error_sem": lower_error_sem}


def build_quadratic(settings: QuadraticSettings, dtype: torch.dtype, device: torch.device
                    ) -> tuple[MultiBlockProblem, QuadraticEvaluator]:
    """Draw the instance (or set up the seeded one) and build its stochastic problem (the task's builder)."""
    from mbbo.tasks.quadratic_seeded import SeededQuadratic  # lazy: that module imports this one

    s = settings
    quadratic: MultiBlockQuadratic | SeededQuadratic
    if s.form == "seeded":
        quadratic = SeededQuadratic(s.num_blocks, s.dim_x, s.dim_y, seed=s.data_seed, mu=s.mu, L=s.L, dtype=dtype)
    else:
        quadratic = MultiBlockQuadratic.random(s.num_blocks, s.dim_x, s.dim_y, seed=s.data_seed, mu=s.mu, L=s.L,
                                               interpolating=s.interpolating, dtype=dtype)
    problem = quadratic.problem(noise=s.noise, hessian_noise=s.hessian_noise, batch_size=s.batch_size)
    return problem, QuadraticEvaluator(quadratic, s.eval_blocks, s.data_seed)


register_task(TaskSpec(
    name="quadratic",
    description="T3: multi-block quadratic bilevel problem with closed-form hypergradient (stochastic oracles)",
    settings_cls=QuadraticSettings,
    builder=build_quadratic,
    metrics=("grad_norm", "objective", "lower_error"),
    finite_sum=False,
    devices=("cpu",),
    distributed=True,
    sharded=True,
))
