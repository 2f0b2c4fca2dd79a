"""Small convex quadratic programs with linear inequality constraints, solved by Clarabel (an interior-point
solver, `clarabel` on PyPI) and polished on the active set.

    solve_qp:            argmin_y 1/2 y^T P y + q^T y   subject to   G y <= c      (primal y, multipliers mu >= 0)
    project_halfspaces:  argmin_p 1/2 ||p - v||^2        subject to   G p <= c      (the projection onto an
                                                                                   intersection of half-spaces)

Polishing: the interior-point answer is accurate to the solver's tolerance (~1e-9); the active set (rows with a
clearly positive multiplier) is then solved exactly from the KKT system

    [P  G_A^T] [y  ]   [-q ]
    [G_A   0 ] [mu_A] = [c_A],

and the polished point is kept when it is feasible and its multipliers are non-negative (else the solver's point
is returned). Used for the exact lower solve of SFLCB's warm start, LV-HBA's joint projection and the penalty
method's projections. Everything is float64 on the CPU; results come back in the dtype and device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import clarabel
import numpy as np
import torch
from scipy import sparse
from scipy.linalg import solve_triangular
from torch import Tensor

__all__ = ["QPInfeasibleError", "QPResult", "project_halfspaces", "solve_qp"]

_SOLVED = ("Solved", "AlmostSolved")


class QPInfeasibleError(ValueError):
    """The constraints G y <= c of a QP admit no point (or the solver failed); the message says which."""


@dataclass(frozen=True)
class QPResult:
    """Solution y, multipliers mu >= 0 of G y <= c (one per row), the solver's status and whether polished."""

    solution: Tensor
    multipliers: Tensor
    status: str
    polished: bool


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _clarabel(P: np.ndarray, q: np.ndarray, G: np.ndarray, c: np.ndarray, tol: float
              ) -> tuple[np.ndarray, np.ndarray, str]:
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.max_threads = 1
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
    settings.tol_ktratio = 1e-8
    P_up = sparse.triu(sparse.csc_matrix(P), format="csc")
    solver = clarabel.DefaultSolver(P_up, q, sparse.csc_matrix(G), c, [clarabel.NonnegativeConeT(len(c))], settings)
    out = solver.solve()
    return np.asarray(out.x), np.asarray(out.z), str(out.status)


def _chol_solve(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return solve_triangular(chol.T, solve_triangular(chol, rhs, lower=True), lower=False)


def _polish(P: np.ndarray, q: np.ndarray, G: np.ndarray, c: np.ndarray, y: np.ndarray, mu: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact KKT point of the active set of (y, mu), or None when it is not primal and dual feasible."""
    scale = max(1.0, float(np.abs(mu).max(initial=0.0)))
    active = mu > 1e-7 * scale
    G_a = G[active]
    try:  # P positive definite: the Schur complement G_A P^-1 G_A^T mu_A = -G_A P^-1 q - c_A (small, fast)
        chol = np.linalg.cholesky(P)
        p_inv_q = _chol_solve(chol, q)
        p_inv_gt = _chol_solve(chol, G_a.T)
        mu_a = np.linalg.lstsq(G_a @ p_inv_gt, -G_a @ p_inv_q - c[active], rcond=None)[0]
        y_p = -p_inv_q - p_inv_gt @ mu_a
    except np.linalg.LinAlgError:  # semi-definite P: the full KKT system
        n, k = P.shape[0], G_a.shape[0]
        kkt = np.block([[P, G_a.T], [G_a, np.zeros((k, k))]])
        sol = np.linalg.lstsq(kkt, np.concatenate([-q, c[active]]), rcond=None)[0]
        y_p, mu_a = sol[:n], sol[n:]
    tol = 1e-10 * (1.0 + np.abs(c).max(initial=0.0))
    if (mu_a < -tol).any() or (G @ y_p - c > tol).any():
        return None
    stationarity = P @ y_p + q + G_a.T @ mu_a
    residual = np.abs(G_a @ y_p - c[active]).max(initial=0.0)
    if np.abs(stationarity).max(initial=0.0) > 1e-10 * (1.0 + np.abs(q).max(initial=0.0)) or residual > tol:
        return None  # a rank-deficient active set (e.g. an equality written as two rows): keep the solver's
    mu_p = np.zeros_like(mu)
    mu_p[active] = np.maximum(mu_a, 0.0)
    return y_p, mu_p


def solve_qp(P: Tensor, q: Tensor, G: Tensor, c: Tensor, *, tol: float = 1e-9, polish: bool = True) -> QPResult:
    """argmin_y 1/2 y^T P y + q^T y s.t. G y <= c, for symmetric positive semi-definite P (n, n), q (n,),
    G (k, n), c (k,); multipliers mu (k,) >= 0 with P y + q + G^T mu = 0 and mu_i (G y - c)_i = 0.

    Raises:
        ValueError: shapes that do not agree.
        QPInfeasibleError: the constraints admit no point, or the solver stopped without a solution.
    """
    n = q.shape[0]
    if P.shape != (n, n) or G.dim() != 2 or G.shape[1] != n or c.shape != (G.shape[0],):
        raise ValueError(f"solve_qp: shapes disagree: P {tuple(P.shape)}, q {tuple(q.shape)}, G {tuple(G.shape)}, "
                         f"c {tuple(c.shape)}; need P (n, n), q (n,), G (k, n), c (k,)")
    Pn, qn, Gn, cn = _np(P), _np(q), _np(G), _np(c)
    Pn = 0.5 * (Pn + Pn.T)
    y, mu, status = _clarabel(Pn, qn, Gn, cn, tol)
    if status not in _SOLVED:
        what = "the constraints G y <= c are infeasible" if "Infeasible" in status else "no solution"
        raise QPInfeasibleError(f"solve_qp: {what} (Clarabel status {status}; n = {n}, k = {len(cn)})")
    polished = _polish(Pn, qn, Gn, cn, y, mu) if polish else None
    if polished is not None:
        y, mu = polished
    return QPResult(torch.as_tensor(y, dtype=q.dtype, device=q.device),
                    torch.as_tensor(mu, dtype=q.dtype, device=q.device), status, polished is not None)


def project_halfspaces(v: Tensor, G: Tensor, c: Tensor, *, tol: float = 1e-9) -> QPResult:
    """The Euclidean projection of v (n,) onto {p : G p <= c}, with the multipliers of the projection QP
    (p = v - G^T mu); a v that satisfies every row is returned as it is (status "Inside"). For a projected
    gradient step p = Proj(y - s d), mu / s estimates the constraints' Lagrange multipliers of the problem
    whose gradient is d."""
    if bool((G @ v <= c).all()):  # already inside: the projection is v itself, every multiplier zero
        return QPResult(v.clone(), v.new_zeros(c.shape[0]), "Inside", False)
    eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return solve_qp(eye, -v, G, c, tol=tol)
