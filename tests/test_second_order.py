"""Explicit second-order blocks (`mbbo.second_order`) against a Python loop of VJPs, and through the oracles."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from mbbo.oracles import Oracles
from mbbo.problem import MultiBlockProblem, RowSampler
from mbbo.second_order import HESSIAN_MODES, grad_and_hessian

TOL = 1e-12


def _loss(x: torch.Tensor, y: torch.Tensor, batch: dict[str, torch.Tensor], block: torch.Tensor) -> torch.Tensor:
    """Weighted logistic loss with a per-block temperature and an x-dependent ridge (not separable)."""
    margins = batch["label"] * (batch["X"] @ y) / batch["temp"]
    return (torch.sigmoid(x) * torch.nn.functional.softplus(-margins)).mean() + 0.5 * torch.exp(x[0]) * (y @ y)


def _data(b: int = 7, d: int = 5) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    batch = {"X": torch.randn(b, d, generator=gen, dtype=torch.float64),
             "label": torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0).double(),
             "temp": torch.tensor(1.5, dtype=torch.float64)}
    return batch, torch.randn(b, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen,
                                                                                   dtype=torch.float64)


def _loop_reference(x: torch.Tensor, y: torch.Tensor, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_y g, then one `torch.autograd.grad` VJP per y-coordinate in a Python loop: rows of H and of
    (grad_xy g)^T's transpose."""
    x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    gy = torch.autograd.grad(_loss(x, y, batch, torch.tensor(0)), y, create_graph=True)[0]
    rows_h, rows_j = [], []
    for k in range(y.shape[0]):
        jx, hy = torch.autograd.grad(gy[k], (x, y), retain_graph=True)
        rows_h.append(hy)
        rows_j.append(jx)
    return gy.detach(), torch.stack(rows_h), torch.stack(rows_j).T


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_grad_and_hessian_equals_a_loop_of_vjps(mode: str) -> None:
    batch, x, y = _data()
    gy_ref, h_ref, j_ref = _loop_reference(x, y, batch)
    grad_y = grad(_loss, argnums=1)
    gy, h = grad_and_hessian(grad_y, mode=mode)(x, y, batch, torch.tensor(0))
    gy2, h2, j = grad_and_hessian(grad_y, cross=True, mode=mode)(x, y, batch, torch.tensor(0))
    assert j.shape == (x.shape[0], y.shape[0])
    for got, ref in ((gy, gy_ref), (h, h_ref), (gy2, gy_ref), (h2, h_ref), (j, j_ref)):
        assert torch.allclose(got, ref, atol=TOL, rtol=0)
    assert torch.allclose(h, h.T, atol=TOL, rtol=0)


def test_grad_and_hessian_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of 'reverse', 'forward', got 'central'"):
        grad_and_hessian(grad(_loss, argnums=1), mode="central")


def _problem(m: int = 4, n: int = 30, d: int = 5) -> MultiBlockProblem:
    gen = torch.Generator().manual_seed(0)
    rows = {"X": torch.randn(n, d, generator=gen, dtype=torch.float64),
            "label": torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()}
    sampler = RowSampler(rows, batch_size=6)
    temps = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    return MultiBlockProblem(_loss, _loss, torch.randn(n, generator=gen, dtype=torch.float64),
                             torch.randn(m, d, generator=gen, dtype=torch.float64), sampler, sampler,
                             sparse_x=True, block_data={"temp": temps})


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_vmapped_oracles_equal_the_loop_block_by_block(mode: str) -> None:
    """The oracles vmap the block over points and blocks; each (point, block) equals the loop, and the counts
    grow by one per block and point."""
    pb = _problem()
    orc = Oracles(pb, hessian_mode=mode)
    blocks = torch.tensor([2, 0, 3])
    batch = pb.lower_sampler.sample(blocks, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(2, pb.x0.shape[0], generator=gen, dtype=torch.float64)
    ys = torch.randn(2, 3, pb.dim_y, generator=gen, dtype=torch.float64)
    gy, h, jac = orc.lower_second_order(xs, ys, batch, blocks)
    gy1, h1 = orc.lower_hessian(xs, ys, batch, blocks)
    assert orc.counts["hessian_yy"] == 2 * 2 * 3 and orc.counts["jacobian_xy"] == 2 * 3
    assert orc.counts["grad_y_g"] == 2 * 2 * 3 and orc.counts["hvp"] == 0
    full = {**batch, **pb.with_block_data({}, blocks)}
    for p in range(2):
        for i in range(3):
            one = {k: v[i] for k, v in full.items()}
            g_ref, h_ref, j_ref = _loop_reference(xs[p, batch["index"][i]], ys[p, i], one)
            for got, ref in ((gy[p, i], g_ref), (h[p, i], h_ref), (jac.values[p, i], j_ref),
                             (gy1[p, i], g_ref), (h1[p, i], h_ref)):
                assert torch.allclose(got, ref, atol=TOL, rtol=0)
