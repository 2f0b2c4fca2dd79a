"""Variance-reduction and momentum trackers: small pure update rules on tensors of any shape.

Each tracker keeps an estimate u of a quantity q(w_t) seen through stochastic samples q(w; xi). The
two-point trackers (STORM, MSVR, randomised STORM) need q at the current and the previous iterate on the
same sample xi; the oracles deliver both from one call. They apply equally to vectors, matrices
(Hessian estimates) and rows of per-block tables (leading block dimension).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mbbo.validation import check_nonnegative, check_unit


@dataclass(frozen=True)
class EMA:
    """Moving average: u <- (1 - beta) u + beta q(w_t; xi). (Hu, Zhong, Yang 2022; SOBA-type methods.)"""

    beta: float

    def __post_init__(self) -> None:
        check_unit("beta", self.beta)

    def update(self, u: Tensor, new: Tensor, old: Tensor | None = None) -> Tensor:
        return u.lerp(new, self.beta)


@dataclass(frozen=True)
class STORM:
    """STORM (Cutkosky & Orabona 2019): u <- q(w_t; xi) + (1 - beta) (u - q(w_{t-1}; xi)).

    beta = 1 is plain SGD; this is the x-tracker of BSVRB (the paper's beta) with the same sample xi.
    """

    beta: float

    def __post_init__(self) -> None:
        check_unit("beta", self.beta)

    def update(self, u: Tensor, new: Tensor, old: Tensor) -> Tensor:
        return new + (1.0 - self.beta) * (u - old)


@dataclass(frozen=True)
class MSVR:
    """Multi-block single-probe variance reduction (Jiang et al., NeurIPS 2022), for the sampled blocks:

        u_i <- (1 - alpha) u_i + alpha q_i(w_t; xi_i) + gamma (q_i(w_t; xi_i) - q_i(w_{t-1}; xi_i)),

    unsampled blocks unchanged. gamma = 1 - alpha is STORM on each block; the theory for B < m blocks uses
    gamma = (m - B) / (B (1 - alpha)) + (1 - alpha) (`MSVR.theory(alpha, m, B)`). gamma = 0 is a moving
    average. The BSVRB scripts use alpha = 0.9, gamma = 1.
    """

    alpha: float
    gamma: float

    def __post_init__(self) -> None:
        check_unit("alpha", self.alpha)
        check_nonnegative("gamma", self.gamma)

    @classmethod
    def theory(cls, alpha: float, num_blocks: int, block_batch: int) -> MSVR:
        check_unit("alpha", alpha)
        if alpha == 1.0 and num_blocks > block_batch:
            raise ValueError("alpha = 1 leaves the theoretical gamma = (m-B)/(B(1-alpha)) undefined; use alpha < 1")
        extra = 0.0 if num_blocks == block_batch else (num_blocks - block_batch) / (block_batch * (1.0 - alpha))
        return cls(alpha, extra + (1.0 - alpha))

    def update(self, u: Tensor, new: Tensor, old: Tensor) -> Tensor:
        return (1.0 - self.alpha) * u + (self.alpha + self.gamma) * new - self.gamma * old


@dataclass(frozen=True)
class RandomizedSTORM:
    """Randomised STORM of RSVRB (Guo, Hu, Zhang, Yang 2021), per block with sampling ratio m/B:

        i sampled:   u_i <- (1 - beta) (u_i - (m/B) q_i(w_{t-1}; xi)) + (m/B) q_i(w_t; xi)
        otherwise:   u_i <- (1 - beta) u_i

    The decay of unsampled blocks is applied lazily: a block untouched for k iterations is scaled by
    `decay(k)` = (1 - beta)^k when read.
    """

    beta: float
    num_blocks: int
    block_batch: int

    def __post_init__(self) -> None:
        check_unit("beta", self.beta)

    @property
    def scale(self) -> float:
        return self.num_blocks / self.block_batch

    def decay(self, steps: Tensor) -> Tensor:
        return (1.0 - self.beta) ** steps

    def update(self, u: Tensor, new: Tensor, old: Tensor) -> Tensor:
        return (1.0 - self.beta) * (u - self.scale * old) + self.scale * new
