"""Client-side local solvers and the server's aggregation rule.

:class:`LocalSolver` runs ``steps`` mini-batch steps on every participating client at once (rows of a (k, d)
table), plain or with an SVRG-style correction::

    SGD:   z_i <- z_i - lr * grad_i(z_i; xi_t)
    SVRG:  z_i <- z_i - lr * (grad_i(z_i; xi_t) - grad_i(z_anchor; xi_t) + c)

with the same batch xi_t at both points and a server-provided correction c. FedNest uses it for the inner
local epochs (z = y, c = the averaged full gradient u; FedInn) and for the tau local outer steps (z = x,
c = the global hypergradient h; FedOut), LFedNest for its local hypergradient steps.

:class:`Aggregator` is the server's weighted mean over the sampled clients: plain (``"mean"``) or weighted by
client size (``"size"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mbbo.federated.data import ClientBatch
from mbbo.validation import check_int, check_real

__all__ = ["WEIGHTINGS", "Aggregator", "LocalSolver"]

WEIGHTINGS = ("mean", "size")


@dataclass(frozen=True)
class LocalSolver:
    """``steps`` local steps of size ``lr``; ``variance_reduced`` selects SVRG over SGD (see module doc)."""

    steps: int
    lr: float
    variance_reduced: bool = False

    def __post_init__(self) -> None:
        check_int("local steps", self.steps, 0)
        check_real("local lr", self.lr, 0.0, None, low_open=True)

    def run(self, start: Tensor, grad: Callable[[Tensor, ClientBatch], Tensor], batch: Callable[[int], ClientBatch],
            anchor: Tensor | None = None, correction: Tensor | None = None) -> Tensor:
        """The last iterate from ``start`` (k, d). ``batch(t)`` is step t's batch, ``grad(z, b)`` the per-client
        gradients (k, d); SVRG needs ``anchor`` and ``correction`` (broadcastable to (k, d))."""
        if self.variance_reduced and (anchor is None or correction is None):
            raise ValueError("the SVRG local solver needs an anchor point and a correction")
        z = start
        for t in range(self.steps):
            b = batch(t)
            g = grad(z, b)
            if self.variance_reduced:
                assert anchor is not None and correction is not None
                g = g - grad(anchor, b) + correction
            z = z - self.lr * g
        return z


@dataclass(frozen=True)
class Aggregator:
    """Server mean over sampled clients: weights 1 (``"mean"``) or the clients' sizes (``"size"``)."""

    weighting: str = "mean"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")

    def weights(self, sizes: Tensor, dtype: object) -> Tensor:
        """Unnormalised weights of clients with the given sizes."""
        w = sizes.to(dtype)  # type: ignore[arg-type]
        return w if self.weighting == "size" else w.new_ones(w.shape)

    def partial_sums(self, values: list[Tensor], sizes: Tensor) -> Tensor:
        """[sum_i w_i v_i (flattened, concatenated), sum_i w_i] over this process's clients: the all-reduce
        payload of one server round."""
        dtype = values[0].dtype
        w = self.weights(sizes, dtype)
        parts = [(w.view(-1, *([1] * (v.dim() - 1))) * v).sum(0).flatten() for v in values]
        return torch.cat([*parts, w.sum().reshape(1)])

    @staticmethod
    def finish(total: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        """Splits a reduced payload into the weighted means of the given (per-client-row) shapes."""
        out, start, weight = [], 0, total[-1]
        for shape in shapes:
            n = 1
            for s in shape:
                n *= s
            out.append((total[start:start + n] / weight).view(shape))
            start += n
        return out
