"""Projections used by the bilevel algorithms (row-wise over leading batch dimensions)."""

from __future__ import annotations

import torch
from torch import Tensor

from mbbo.validation import check_real


def project_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row (last dim) onto {||v|| <= radius}: v * min(1, radius / ||v||)."""
    check_real("radius", radius, 0.0, None)
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


def floored_eigh(h: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the eigenvalue-floored symmetrised H: (eigenvalues >= floor, eigenvectors)."""
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (h + h.transpose(-1, -2)))
    return eigvals.clamp_min(floor), eigvecs


def eig_compose(eigvals: Tensor, eigvecs: Tensor) -> Tensor:
    """U diag(lambda) U^T."""
    return (eigvecs * eigvals.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)


def eig_solve(eigvals: Tensor, eigvecs: Tensor, rhs: Tensor) -> Tensor:
    """H^{-1} rhs for H = U diag(lambda) U^T (lambda > 0): U ((U^T rhs) / lambda)."""
    coeffs = (eigvecs.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1) / eigvals
    return (eigvecs @ coeffs.unsqueeze(-1)).squeeze(-1)


def floor_and_factor(h: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Eigenvalue floor of symmetric H (..., d, d) and the Cholesky factor of the result.

    Equal to `eigenvalue_floor` but cheaper when H is already >= floor * I: that is checked by a Cholesky
    factorisation of H - floor * I, and only the matrices that fail it are eigen-decomposed.
    Returns (projected H, lower Cholesky factor of projected H) for `cholesky_solve`.
    """
    sym = 0.5 * (h + h.transpose(-1, -2))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    _, info = torch.linalg.cholesky_ex(sym - floor * eye)
    bad = info != 0
    if bool(bad.any()):
        sym = sym.clone()
        sym[bad] = eigenvalue_floor(sym[bad], floor)
    return sym, torch.linalg.cholesky(sym)


def cholesky_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """H^{-1} rhs from the lower Cholesky factor of H; rhs (..., d)."""
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


def frobenius_rescale(h: Tensor, bound: float) -> Tensor:
    """The authors' Hessian guard (`proj_mat`, BSVRB_ICML2023 HO/main.py): H * bound / ||H||_F whenever
    ||H||_F < bound, H otherwise. It keeps ||H||_F >= bound; it is NOT a projection onto {H >= mu I} (an
    indefinite H stays indefinite), so solves with it use LU (`torch.linalg.solve`)."""
    norm = torch.linalg.matrix_norm(h).unsqueeze(-1).unsqueeze(-1)
    return torch.where(norm < bound, h * (bound / norm), h)
