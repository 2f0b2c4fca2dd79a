"""Small constrained problems for the tests of the constrained methods."""

from __future__ import annotations

import torch
from torch import Tensor

from mbbo.constrained import ConstrainedProblem, LinearConstraint
from mbbo.problem import FullBatch

RHO = 0.5


def inactive_problem(dim: int = 3, seed: int = 0) -> tuple[ConstrainedProblem, Tensor]:
    """f = 1/2 ||y - b||^2 + RHO/2 ||x||^2, g = 1/2 ||y - M x||^2, constraints 1^T y <= 100 and y_1 - x_1 <= 100,
    inactive near the solution; returns (problem, x*) with x* = (M^T M + RHO I)^-1 M^T b, the stationary point of
    the unconstrained hyper-objective F(x) = 1/2 ||M x - b||^2 + RHO/2 ||x||^2."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    x0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    G_x = torch.zeros(2, dim, dtype=torch.float64)
    G_x[1, 0] = -1.0
    G_y = torch.zeros(2, dim, dtype=torch.float64)
    G_y[0] = 1.0
    G_y[1, 0] = 1.0
    problem = ConstrainedProblem(
        lambda x, y, bt, k: 0.5 * (y - b).pow(2).sum() + 0.5 * RHO * x.pow(2).sum(),
        lambda x, y, bt, k: 0.5 * (y - M @ x).pow(2).sum(),
        x0, torch.zeros(1, dim, dtype=torch.float64), FullBatch({"one": one}), FullBatch({"one": one}),
        constraint=LinearConstraint(G_x, G_y, torch.full((2,), 100.0, dtype=torch.float64)), name="inactive")
    x_star = torch.linalg.solve(M.T @ M + RHO * torch.eye(dim, dtype=torch.float64), M.T @ b)
    return problem, x_star
