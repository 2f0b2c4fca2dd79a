"""The multi-block quadratic (T3) in a large-m form: per-block coefficients generated from a seed on the fly.

Same problem family as `mbbo.tasks.quadratic` (closed forms, same stochastic oracles), with structured
coefficients so that a block's data are O(d_x d_y) numbers drawn from (seed, block id) when the block is
sampled, never stored: memory O(1) per block instead of m (2 d_y^2 + d_x^2 + 2 d_x d_y) numbers.

    A_i = Q_i diag(lam_i) Q_i,  Q_i = I - 2 w_i w_i^T / ||w_i||^2 (a Householder reflection), lam_i in [mu, L]
    F_i = P_i diag(phi_i) P_i,  P_i likewise, phi_i in [0.5, 2];   H_i = diag(eta_i), eta_i in [0.5, 2]
    C_i, K_i: N(0, 1 / d_x) entries;  a_i, h_i, f_i: N(0, 1) entries

    g_i(x, y) = 1/2 y^T A_i y + x^T C_i y + a_i^T y
    f_i(x, y) = 1/2 y^T F_i y + x^T K_i y + 1/2 x^T H_i x + h_i^T x + f_i^T y

A_i y and A_i^{-1} z cost O(d_y) (Q_i is symmetric and orthogonal). Random numbers come from a counter-based
hash (splitmix64 of seed, coefficient, block and entry), so any subset of blocks is generated alike, in any order,
on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mbbo.problem import Batch, MultiBlockProblem
from mbbo.tasks.quadratic import _ScaledNoise

_MASK = (1 << 53) - 1
_KEYS = {"w_g": 1, "lam_g": 2, "C": 3, "a": 4, "w_f": 5, "phi": 6, "K": 7, "eta": 8, "h": 9, "f": 10}


def _as_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def hashed_uniform(seed: int, key: int, blocks: Tensor, count: int, dtype: torch.dtype) -> Tensor:
    """(len(blocks), count) uniforms in (0, 1), a pure function of (seed, key, block, entry) (splitmix64)."""
    entry = torch.arange(count, dtype=torch.int64, device=blocks.device)
    z = (blocks.to(torch.int64)[:, None] * count + entry) * _GOLDEN + _as_int64(seed * 1_000_003 + key * 7919)
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    z = z ^ _shift(z, 31)
    return ((_shift(z, 11) & _MASK).to(torch.float64) + 0.5).mul_(2.0**-53).to(dtype)


def hashed_normal(seed: int, key: int, blocks: Tensor, count: int, dtype: torch.dtype) -> Tensor:
    """(len(blocks), count) standard normals (Box-Muller on two hashed uniform streams)."""
    u1 = hashed_uniform(seed, key, blocks, count, torch.float64)
    u2 = hashed_uniform(seed, key + 1000, blocks, count, torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


def _reflect(w: Tensor, y: Tensor) -> Tensor:
    """Q y with Q = I - 2 w w^T / ||w||^2, over the last dimension."""
    return y - 2.0 * w * (w * y).sum(-1, keepdim=True) / (w * w).sum(-1, keepdim=True)


class SeededBlockData:
    """One coefficient of all m blocks, generated when indexed: `table[blocks]` -> (len(blocks), *shape)."""

    def __init__(self, quadratic: SeededQuadratic, name: str) -> None:
        self.quadratic = quadratic
        self.name = name
        self.shape = (quadratic.num_blocks, *quadratic.coefficient_shape(name))

    def __getitem__(self, blocks: Tensor) -> Tensor:
        return self.quadratic.coefficients(blocks, (self.name,))[self.name]


@dataclass
class SeededQuadratic:
    """A multi-block quadratic whose coefficients are generated per block from `seed` (see module docstring)."""

    num_blocks: int
    dim_x: int
    dim_y: int
    seed: int = 0
    mu: float = 1.0
    L: float = 4.0
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.dim_x < 1 or self.dim_y < 1:
            raise ValueError(f"num_blocks, dim_x, dim_y must be >= 1, got {self.num_blocks}, {self.dim_x}, "
                             f"{self.dim_y}")
        if not 0 < self.mu <= self.L:
            raise ValueError(f"need 0 < mu <= L, got mu={self.mu}, L={self.L}")

    def coefficient_shape(self, name: str) -> tuple[int, ...]:
        dx, dy = self.dim_x, self.dim_y
        return {"C": (dx, dy), "K": (dx, dy), "eta": (dx,), "h": (dx,)}.get(name, (dy,))

    def coefficients(self, blocks: Tensor, names: tuple[str, ...] = tuple(_KEYS)) -> dict[str, Tensor]:
        """The named coefficients of the given blocks, generated from (seed, block)."""
        out = {}
        for name in names:
            shape = self.coefficient_shape(name)
            count = math.prod(shape)
            key = _KEYS[name]
            if name in ("lam_g", "phi", "eta"):
                low, high = (self.mu, self.L) if name == "lam_g" else (0.5, 2.0)
                value = low + (high - low) * hashed_uniform(self.seed, key, blocks, count, self.dtype)
            else:
                value = hashed_normal(self.seed, key, blocks, count, self.dtype)
                if name in ("C", "K"):
                    value = value / math.sqrt(self.dim_x)
            out[name] = value.view(blocks.shape[0], *shape)
        return out

    # --- the losses of one block (vmapped by the engine) ------------------------------------------------
    def lower_loss(self, x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
        scale = 1.0 + batch["hessian_noise"].mean()
        qy = _reflect(batch["w_g"], y)
        return 0.5 * scale * (qy * batch["lam_g"] * qy).sum() + x @ (batch["C"] @ y) + (
            batch["a"] + batch["noise_g"].mean(0)) @ y

    def upper_loss(self, x: Tensor, y: Tensor, batch: Batch, block: Tensor) -> Tensor:
        py = _reflect(batch["w_f"], y)
        return (0.5 * (py * batch["phi"] * py).sum() + x @ (batch["K"] @ y) + 0.5 * (x * batch["eta"] * x).sum()
                + batch["h"] @ x + (batch["f"] + batch["noise_f"].mean(0)) @ y)

    def problem(self, *, noise: float = 0.0, hessian_noise: float = 0.0, batch_size: int = 1) -> MultiBlockProblem:
        """The engine's problem (x0 = 0, y0 = 0); block data are generated for the sampled blocks only."""
        if noise < 0 or hessian_noise < 0:
            raise ValueError(f"noise levels must be >= 0, got noise={noise}, hessian_noise={hessian_noise}")
        dy = self.dim_y
        lower = _ScaledNoise({"noise_g": (dy,), "hessian_noise": ()}, batch_size, noise, hessian_noise, self.dtype)
        upper = _ScaledNoise({"noise_f": (dy,)}, batch_size, noise, 0.0, self.dtype)
        data = {name: SeededBlockData(self, name) for name in _KEYS}
        return MultiBlockProblem(self.upper_loss, self.lower_loss, torch.zeros(self.dim_x, dtype=self.dtype),
                                 torch.zeros(self.num_blocks, dy, dtype=self.dtype), lower, upper,
                                 block_data=data, name="quadratic-seeded")

    # --- closed forms for a set of blocks --------------------------------------------------------------
    def block_metrics(self, x: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(grad F_i(x) (k, d_x), F_i(x) (k,), y_i*(x) (k, d_y)) for the given blocks, O(k d_x d_y)."""
        c = self.coefficients(blocks)

        def a_inv(z: Tensor) -> Tensor:
            return _reflect(c["w_g"], _reflect(c["w_g"], z) / c["lam_g"])

        def f_times(y: Tensor) -> Tensor:
            return _reflect(c["w_f"], c["phi"] * _reflect(c["w_f"], y))

        y = -a_inv(c["a"] + x @ c["C"])
        grad_y_f = f_times(y) + x @ c["K"] + c["f"]
        v = a_inv(grad_y_f)
        cv = torch.einsum("kxy,ky->kx", c["C"], v)
        grad = torch.einsum("kxy,ky->kx", c["K"], y) + c["eta"] * x + c["h"] - cv
        value = (0.5 * (y * f_times(y)).sum(-1) + (x @ c["K"] * y).sum(-1) + 0.5 * (c["eta"] * x * x).sum(-1)
                 + c["h"] @ x + (c["f"] * y).sum(-1))
        return grad, value, y

    def dense_coefficients(self, blocks: Tensor) -> dict[str, Tensor]:
        """A, C, a, F, K, H, h, f of the given blocks as dense matrices (tests: compare with MultiBlockQuadratic)."""
        c = self.coefficients(blocks)
        eye = torch.eye(self.dim_y, dtype=self.dtype).expand(blocks.shape[0], -1, -1)

        def householder(w: Tensor) -> Tensor:
            return eye - 2.0 * w[:, :, None] * w[:, None, :] / (w * w).sum(-1)[:, None, None]

        qg, qf = householder(c["w_g"]), householder(c["w_f"])
        return {"A": qg @ torch.diag_embed(c["lam_g"]) @ qg, "C": c["C"], "a": c["a"],
                "F": qf @ torch.diag_embed(c["phi"]) @ qf, "K": c["K"], "H": torch.diag_embed(c["eta"]),
                "h": c["h"], "f": c["f"]}
