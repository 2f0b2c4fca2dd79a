"""Projections used by the bilevel algorithms (row-wise over leading batch dimensions)."""

from __future__ import annotations

import torch
from torch import Tensor


def project_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row (last dim) onto {||v|| <= radius}: v * min(1, radius / ||v||)."""
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v * torch.clamp(radius / norm.clamp_min(torch.finfo(v.dtype).tiny), max=1.0)


def eigenvalue_floor(h: Tensor, floor: float) -> Tensor:
    """Projection of symmetric matrices (..., d, d) onto {H >= floor * I}: U max(Lambda, floor) U^T.

    H is symmetrised first. This is the PSD projection the theory needs (BSVRB, RSVRB), not the
    Frobenius-norm rescale of the authors' code.
    """
    sym = 0.5 * (h + h.transpose(-1, -2))
    eigvals, eigvecs = torch.linalg.eigh(sym)
    return (eigvecs * eigvals.clamp_min(floor).unsqueeze(-2)) @ eigvecs.transpose(-1, -2)


def solve_spd(h: Tensor, rhs: Tensor) -> Tensor:
    """Solves H w = rhs for a batch of symmetric positive definite H (..., d, d), rhs (..., d).

    Cholesky when it succeeds, LU (torch.linalg.solve) otherwise; never an explicit inverse.
    """
    chol, info = torch.linalg.cholesky_ex(h)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    return torch.linalg.solve(h, rhs)
