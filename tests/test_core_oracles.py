"""Oracles against closed forms (multi-block quadratic, float64) and finite differences (logistic)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad

from mbbo.oracles import Oracles, XGrad
from mbbo.problem import FullBatch, MultiBlockProblem, RowSampler
from mbbo.projections import solve_spd
from mbbo.tasks.quadratic import MultiBlockQuadratic

TOL = 1e-10


@pytest.fixture(scope="module")
def quad() -> MultiBlockQuadratic:
    return MultiBlockQuadratic.random(6, 5, 4, seed=3)


def _points(quad: MultiBlockQuadratic, blocks: torch.Tensor):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(2, blocks.shape[0], 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, blocks.shape[0], 4, generator=gen, dtype=torch.float64)
    return x, y, v


def test_every_oracle_matches_the_closed_form(quad: MultiBlockQuadratic) -> None:
    pb = quad.problem()
    orc = Oracles(pb)
    blocks = torch.tensor([4, 0, 2])
    x, y, v = _points(quad, blocks)
    lower, upper = pb.lower_sampler.sample(blocks, torch.Generator()), pb.upper_sampler.sample(
        blocks, torch.Generator())
    A, C, a = quad.A[blocks], quad.C[blocks], quad.a[blocks]
    F, K, H, h, f = (t[blocks] for t in (quad.F, quad.K, quad.H, quad.h, quad.f))
    gy_true = torch.einsum("byz,pbz->pby", A, y) + torch.einsum("bxy,px->pby", C, x) + a
    hv_true = torch.einsum("byz,pbz->pby", A, v)
    jv_true = torch.einsum("bxy,pby->pbx", C, v)

    gy, hv, jv = orc.lower_products(x, y, v, lower, blocks)
    assert torch.allclose(gy, gy_true, atol=TOL, rtol=0)
    assert torch.allclose(hv, hv_true, atol=TOL, rtol=0)
    assert jv.index is None and torch.allclose(jv.values, jv_true, atol=TOL, rtol=0)
    assert torch.allclose(orc.lower_grad(x, y, lower, blocks), gy_true, atol=TOL, rtol=0)
    assert torch.allclose(orc.cross(x, y, v, lower, blocks).values, jv_true, atol=TOL, rtol=0)
    gy2, hess = orc.lower_hessian(x, y, lower, blocks)
    assert torch.allclose(gy2, gy_true, atol=TOL, rtol=0)
    assert torch.allclose(hess, A.expand(2, *A.shape), atol=TOL, rtol=0)
    gy3, hess3, jac = orc.lower_second_order(x, y, lower, blocks)
    assert torch.allclose(jac.values, C.expand(2, *C.shape), atol=TOL, rtol=0)
    assert torch.allclose(hess3, hess, atol=TOL, rtol=0) and torch.allclose(gy3, gy_true, atol=TOL, rtol=0)
    gx_f, gy_f = orc.upper_grads(x, y, upper, blocks)
    gyf_true = torch.einsum("byz,pbz->pby", F, y) + torch.einsum("bxy,px->pby", K, x) + f
    gxf_true = torch.einsum("bxy,pby->pbx", K, y) + torch.einsum("bxz,pz->pbx", H, x) + h
    assert torch.allclose(gy_f, gyf_true, atol=TOL, rtol=0)
    assert gx_f is not None and torch.allclose(gx_f.values, gxf_true, atol=TOL, rtol=0)
    # one count per block and point
    assert orc.counts["hvp"] == 6 and orc.counts["cross"] == 12 and orc.counts["grad_y_g"] == 24
    assert orc.counts["hessian_yy"] == 12 and orc.counts["jacobian_xy"] == 6 and orc.counts["grad_x_f"] == 6


def test_exact_hypergradient_from_oracles(quad: MultiBlockQuadratic) -> None:
    pb = quad.problem()
    orc = Oracles(pb)
    blocks = torch.arange(quad.num_blocks)
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    y_star = quad.lower_solution(x).unsqueeze(0)
    lower, upper = pb.lower_sampler.sample(blocks, torch.Generator()), pb.upper_sampler.sample(
        blocks, torch.Generator())
    gy, hess = orc.lower_hessian(x[None], y_star, lower, blocks)
    assert gy.abs().max() < TOL
    gx_f, gy_f = orc.upper_grads(x[None], y_star, upper, blocks)
    v = solve_spd(hess, gy_f)
    assert gx_f is not None
    hyper = gx_f.block_mean(5) - orc.cross(x[None], y_star, v, lower, blocks).block_mean(5)
    assert torch.allclose(hyper[0], quad.hypergradient(x), atol=TOL, rtol=0)
    # the closed form itself against autograd through y*(x)
    assert torch.allclose(grad(quad.objective)(x), quad.hypergradient(x), atol=TOL, rtol=0)


def _logistic_problem(m: int = 3, n: int = 40, d: int = 4):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    Xv = torch.randn(n, d, generator=gen, dtype=torch.float64)
    lv = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    temps = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[:m]

    def lower(x, y, batch, block):
        margin = batch["label"] * (batch["X"] @ y) / batch["temp"]
        return torch.nn.functional.softplus(-margin).mean() + 0.5 * (torch.exp(x) * y * y).sum()

    def upper(x, y, batch, block):
        return torch.nn.functional.softplus(-batch["label"] * (batch["X"] @ y)).mean() + 0.01 * (x * x).sum()

    problem = MultiBlockProblem(upper, lower, torch.zeros(d, dtype=torch.float64),
                                torch.zeros(m, d, dtype=torch.float64),
                                FullBatch({"X": X, "label": labels}), FullBatch({"X": Xv, "label": lv}),
                                block_data={"temp": temps})
    return problem


def _solve_lower(orc: Oracles, x: torch.Tensor, y: torch.Tensor, lower, blocks) -> torch.Tensor:
    for _ in range(30):  # Newton
        gy, hess = orc.lower_hessian(x[None], y[None], lower, blocks)
        y = y - solve_spd(hess[0], gy[0])
    return y


def test_hypergradient_matches_finite_differences_on_logistic_blocks() -> None:
    pb = _logistic_problem()
    orc = Oracles(pb)
    blocks = torch.arange(pb.num_blocks)
    gen = torch.Generator()
    lower, upper = pb.lower_sampler.sample(blocks, gen), pb.upper_sampler.sample(blocks, gen)
    x = torch.tensor([0.3, -0.2, 0.1, -0.5], dtype=torch.float64)

    def objective(x_: torch.Tensor) -> float:
        y = _solve_lower(orc, x_, pb.y0.clone(), lower, blocks)
        fvals = torch.stack([pb.upper_loss(x_, y[i], {k: v[i] for k, v in upper.items()}, blocks[i])
                             for i in range(pb.num_blocks)])
        return float(fvals.mean())

    y = _solve_lower(orc, x, pb.y0.clone(), lower, blocks)[None]
    _, hess = orc.lower_hessian(x[None], y, lower, blocks)
    gx_f, gy_f = orc.upper_grads(x[None], y, upper, blocks)
    v = solve_spd(hess, gy_f)
    assert gx_f is not None
    hyper = (gx_f.block_mean(4) - orc.cross(x[None], y, v, lower, blocks).block_mean(4))[0]
    eps = 1e-5
    fd = torch.tensor([(objective(x + eps * e) - objective(x - eps * e)) / (2 * eps)
                       for e in torch.eye(4, dtype=torch.float64)], dtype=torch.float64)
    assert torch.allclose(hyper, fd, atol=1e-8, rtol=1e-6), (hyper, fd)


def test_sparse_x_oracles_equal_the_dense_form() -> None:
    """x = one weight per data row; sparse oracles (rows only) equal the dense problem's oracles."""
    gen = torch.Generator().manual_seed(0)
    n, d, m = 30, 3, 4
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    lab = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()

    def lower_sparse(x_rows, y, batch, block):
        return (torch.sigmoid(x_rows) * torch.nn.functional.softplus(-lab_x(batch) @ y)).mean() + 0.5 * y @ y

    def lab_x(batch):
        return batch["label"][:, None] * batch["X"]

    def lower_dense(x, y, batch, block):
        return lower_sparse(x[batch["index"]], y, batch, block)

    def upper(x, y, batch, block):
        return torch.nn.functional.softplus(-lab_x(batch) @ y).mean()

    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    y0 = torch.randn(m, d, generator=gen, dtype=torch.float64)
    sampler = RowSampler({"X": X, "label": lab}, batch_size=7)
    sparse = MultiBlockProblem(upper, lower_sparse, x0, y0, sampler, sampler, sparse_x=True,
                               upper_depends_on_x=False)
    dense = MultiBlockProblem(upper, lower_dense, x0, y0, sampler, sampler, upper_depends_on_x=False)
    blocks = torch.tensor([3, 1])
    batch = sampler.sample(blocks, torch.Generator().manual_seed(5))
    xs = torch.stack([x0, x0 + 0.1])
    ys = y0[blocks].expand(2, 2, d).clone()
    vs = torch.randn(2, 2, d, generator=gen, dtype=torch.float64)
    _, _, jv_sparse = Oracles(sparse).lower_products(xs, ys, vs, batch, blocks)
    _, _, jv_dense = Oracles(dense).lower_products(xs, ys, vs, batch, blocks)
    assert jv_sparse.index is not None and jv_sparse.values.shape == (2, 2, 7)
    assert torch.allclose(jv_sparse.block_mean(n), jv_dense.block_mean(n), atol=TOL, rtol=0)
    jac_sparse = Oracles(sparse).lower_second_order(xs, ys, batch, blocks)[2]
    jac_dense = Oracles(dense).lower_second_order(xs, ys, batch, blocks)[2]
    rebuilt = torch.zeros(2, 2, n, d, dtype=torch.float64)
    for b in range(2):
        rebuilt[:, b].index_add_(1, batch["index"][b], jac_sparse.values[:, b])
    assert torch.allclose(rebuilt, jac_dense.values, atol=TOL, rtol=0)


def test_block_mean_weights_and_sparse_scatter() -> None:
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)  # (P=1, B=2, b=2)
    index = torch.tensor([[0, 2], [2, 3]])
    out = XGrad(values, index).block_mean(4)
    assert torch.equal(out, torch.tensor([[0.5, 0.0, 2.5, 2.0]], dtype=torch.float64))
    dense = XGrad(torch.ones(1, 2, 3, dtype=torch.float64))
    assert torch.equal(dense.block_mean(3, torch.tensor([1.0, 2.0], dtype=torch.float64)),
                       torch.full((1, 3), 3.0, dtype=torch.float64))


def test_module_lower_variables_plug_in_unchanged() -> None:
    """A y given as an nn.Module (replicated per block) gives the same oracles as the flat tensor."""
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    t = torch.randn(10, 1, dtype=torch.float64)

    def lower_module(x, model, batch, block):
        return ((model(batch["X"]) - batch["t"]) ** 2).mean() + x.sum() * 0.0 + 0.1 * sum(
            (p * p).sum() for p in model.params.values())

    def lower_tensor(x, y, batch, block):
        pred = batch["X"] @ y[:3, None] + y[3]
        return ((pred - batch["t"]) ** 2).mean() + 0.1 * (y * y).sum()

    upper = lambda x, y, batch, block: x.sum() * 0.0 + 0.0 * batch["X"].sum()  # noqa: E731
    sampler = FullBatch({"X": X, "t": t})
    pm = MultiBlockProblem(upper, lower_module, torch.zeros(2, dtype=torch.float64), net, sampler, sampler,
                           num_blocks=3)
    flat = torch.cat([net.weight.detach().reshape(-1), net.bias.detach()])
    pt = MultiBlockProblem(upper, lower_tensor, torch.zeros(2, dtype=torch.float64), flat.expand(3, 4).clone(),
                           sampler, sampler)
    assert pm.num_blocks == 3 and pm.dim_y == 4 and torch.equal(pm.y0, pt.y0)
    blocks = torch.tensor([0, 2])
    batch = sampler.sample(blocks, torch.Generator())
    g_m = Oracles(pm).lower_grad(torch.zeros(1, 2, dtype=torch.float64), pm.y0[blocks][None], batch, blocks)
    g_t = Oracles(pt).lower_grad(torch.zeros(1, 2, dtype=torch.float64), pt.y0[blocks][None], batch, blocks)
    assert torch.allclose(g_m, g_t, atol=TOL, rtol=0)
    # a list of modules gives distinct blocks
    mods = [nn.Linear(3, 1).double() for _ in range(2)]
    pl = MultiBlockProblem(upper, lower_module, torch.zeros(2, dtype=torch.float64), mods, sampler, sampler)
    assert pl.num_blocks == 2 and not torch.equal(pl.y0[0], pl.y0[1])


def test_compiled_oracles_equal_eager(quad: MultiBlockQuadratic) -> None:
    """`compile=True` (torch.compile of the vmapped oracles) gives the same values as eager mode."""
    pb = quad.problem()
    blocks = torch.tensor([1, 3])
    x, y, v = _points(quad, blocks)
    lower = pb.lower_sampler.sample(blocks, torch.Generator())
    eager = Oracles(pb).lower_products(x, y, v, lower, blocks)
    compiled_oracles = Oracles(pb, compile=True)
    compiled = compiled_oracles.lower_products(x, y, v, lower, blocks)
    assert compiled_oracles.compiled
    for a, b in zip(eager[:2], compiled[:2], strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=0)
    assert torch.allclose(eager[2].values, compiled[2].values, atol=TOL, rtol=0)
