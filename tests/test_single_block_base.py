"""`SingleBlockAlgorithm`: every public helper against the closed forms of the m = 1 quadratic (single and
stacked points), the sparse-x path, random streams, raw losses, state and `unsuitable_for`."""

from __future__ import annotations

import pytest
import torch

from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.problem import MultiBlockProblem, RowSampler
from mbbo.tasks.quadratic import MultiBlockQuadratic

DT = torch.float64
DX, DY = 3, 4


class Probe(SingleBlockAlgorithm):
    """A do-nothing algorithm exposing the helpers."""

    def step(self) -> None:
        self.iteration += 1


@pytest.fixture(scope="module")
def quad() -> MultiBlockQuadratic:
    return MultiBlockQuadratic.random(1, DX, DY, seed=3)


@pytest.fixture()
def alg(quad: MultiBlockQuadratic) -> Probe:
    return Probe(quad.problem(batch_size=2), seed=0)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _coef(quad: MultiBlockQuadratic):
    return tuple(t[0] for t in (quad.A, quad.C, quad.a, quad.F, quad.K, quad.H, quad.h, quad.f))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_construction_state_and_shapes(quad: MultiBlockQuadratic) -> None:
    y0 = _rand(1, DY, seed=1)
    a = Probe(quad.problem(y0=y0), seed=0)
    assert a.y.shape == (DY,) and torch.equal(a.y, y0[0]) and a.x.shape == (DX,)
    assert a.lower_variables().shape == (1, DY) and torch.equal(a.lower_variables()[0], a.y)
    assert a.block.tolist() == [0]
    a.y.add_(1.0)
    assert torch.equal(a.problem.y0, y0)  # y is a copy, not a view of the problem's y0
    state = a.state_dict()
    assert torch.equal(state["state"]["y"], a.y)
    state["state"]["y"].zero_()
    assert not torch.equal(a.y, state["state"]["y"])  # state_dict holds clones
    b = Probe(quad.problem(), seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.y, a.y) and b.y.data_ptr() != a.y.data_ptr()


def test_unsuitable_for_multi_block_problem() -> None:
    multi = MultiBlockQuadratic.random(3, DX, DY, seed=0).problem()
    reason = Probe.unsuitable_for(multi)
    assert reason is not None and "m = 3" in reason and "single-block" in reason
    with pytest.raises(ValueError, match="m = 3"):
        Probe(multi)
    assert Probe.unsuitable_for(MultiBlockQuadratic.random(1, DX, DY, seed=0).problem()) is None


def test_batches_streams_and_sizes(alg: Probe) -> None:
    lower = alg.lower_batch()
    # the quadratic's samplers draw each block's mini-batch mean directly: one row per block
    assert lower["noise_g"].shape == (1, 1, DY) and lower["hessian_noise"].shape == (1, 1)
    assert alg.lower_batch(batch_size=5)["noise_g"].shape == (1, 1, DY)
    assert alg.upper_batch()["noise_f"].shape == (1, 1, DY)
    # each stream draws from its own generator: "extra" leaves "lower" untouched
    states = {k: g.get_state() for k, g in alg.generators.items()}
    alg.lower_batch(stream="extra")
    assert torch.equal(alg.generators["lower"].get_state(), states["lower"])
    assert not torch.equal(alg.generators["extra"].get_state(), states["extra"])
    alg.upper_batch()
    assert not torch.equal(alg.generators["upper"].get_state(), states["upper"])


def test_gradients_match_closed_forms_single_and_stacked(quad: MultiBlockQuadratic, alg: Probe) -> None:
    A, C, a, F, K, H, h, f = _coef(quad)
    batch = alg.lower_batch()
    ubatch = alg.upper_batch()
    xs, ys = _rand(3, DX, seed=2), _rand(3, DY, seed=3)
    for p in range(3):
        x, y = xs[p], ys[p]
        _close(alg.grad_y_g(x, y, batch), A @ y + C.T @ x + a)
        gx, gy = alg.lower_grads(x, y, batch)
        _close(gx, C @ y)
        _close(gy, A @ y + C.T @ x + a)
        gx_f, gy_f = alg.upper_grads(x, y, ubatch)
        _close(gx_f, K @ y + H @ x + h)
        _close(gy_f, F @ y + K.T @ x + f)
    # stacked points (P, d): row p equals the single-point call
    _close(alg.grad_y_g(xs, ys, batch), ys @ A.T + xs @ C + a)
    gx, gy = alg.lower_grads(xs, ys, batch)
    _close(gx, ys @ C.T)
    _close(gy, ys @ A.T + xs @ C + a)
    gx_f, gy_f = alg.upper_grads(xs, ys, ubatch)
    _close(gx_f, ys @ K.T + xs @ H.T + h)
    _close(gy_f, ys @ F.T + xs @ K + f)


def test_second_order_products_single_and_stacked(quad: MultiBlockQuadratic, alg: Probe) -> None:
    A, C, a, *_ = _coef(quad)
    batch = alg.lower_batch()
    xs, ys, vs = _rand(2, DX, seed=4), _rand(2, DY, seed=5), _rand(2, DY, seed=6)
    gy, hv, jv = alg.lower_products(xs[0], ys[0], vs[0], batch)
    _close(gy, A @ ys[0] + C.T @ xs[0] + a)
    _close(hv, A @ vs[0])
    _close(jv, C @ vs[0])
    gy, hv, jv = alg.lower_products(xs, ys, vs, batch)
    _close(gy, ys @ A.T + xs @ C + a)
    _close(hv, vs @ A.T)
    _close(jv, vs @ C.T)
    _close(alg.hvp(xs[1], ys[1], vs[1], batch), A @ vs[1])
    _close(alg.hvp(xs, ys, vs, batch), vs @ A.T)
    _close(alg.cross(xs[1], ys[1], vs[1], batch), C @ vs[1])
    _close(alg.cross(xs, ys, vs, batch), vs @ C.T)


def test_hvp_operator_and_fresh_source() -> None:
    quad = MultiBlockQuadratic.random(1, DX, DY, seed=3)
    A = quad.A[0]
    alg = Probe(quad.problem(hessian_noise=0.5, batch_size=1), seed=1)
    x, y, vs = _rand(DX, seed=7), _rand(DY, seed=8), _rand(5, DY, seed=9)
    batch = alg.lower_batch()
    scale = 1.0 + float(batch["hessian_noise"].mean())
    op = alg.hvp_operator(x, y, batch)
    _close(op(vs[0]), scale * A @ vs[0])
    _close(op(vs), scale * vs @ A.T)  # (k, d_y): row-wise
    before = alg.oracle_counts()["hvp"]
    source = alg.hvp_source(x, y)
    op0, op1 = source(0), source(1)  # fresh batches from the "extra" stream: different noisy Hessians
    r0, r1 = op0(vs[0]), op1(vs[0])
    assert not torch.allclose(r0, r1)
    ratio = r0 / (A @ vs[0])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # each is a scalar multiple of A v
    assert alg.oracle_counts()["hvp"] == before + 2
    extra = alg.generators["extra"].get_state()
    alg.hvp_source(x, y, batch_size=3, stream="lower")(0)(vs[0])  # another stream when asked
    assert torch.equal(alg.generators["extra"].get_state(), extra)


def test_raw_values_match_closed_forms(quad: MultiBlockQuadratic) -> None:
    A, C, a, F, K, H, h, f = _coef(quad)
    alg = Probe(quad.problem(noise=0.3, hessian_noise=0.2, batch_size=3), seed=2)
    x, y = _rand(DX, seed=10), _rand(DY, seed=11)
    lb, ub = alg.lower_batch(), alg.upper_batch()
    s = 1.0 + lb["hessian_noise"][0].mean()
    g = 0.5 * s * y @ A @ y + x @ C @ y + (a + lb["noise_g"][0].mean(0)) @ y
    fv = 0.5 * y @ F @ y + x @ K @ y + 0.5 * x @ H @ x + h @ x + (f + ub["noise_f"][0].mean(0)) @ y
    _close(alg.lower_value(x, y, lb), g)
    _close(alg.upper_value(x, y, ub), fv)
    # differentiable: torch.func on the raw losses equals the counted oracles
    _close(torch.func.grad(alg.lower_value, argnums=1)(x, y, lb), alg.grad_y_g(x, y, lb))
    _close(torch.func.grad(alg.upper_value, argnums=0)(x, y, ub), alg.upper_grads(x, y, ub)[0])


def test_oracle_counts_by_kind(alg: Probe) -> None:
    x, y = alg.x, alg.y
    batch = alg.lower_batch()
    alg.grad_y_g(x, y, batch)
    alg.lower_products(torch.stack([x, x]), torch.stack([y, y]), torch.stack([y, y]), batch)
    alg.upper_grads(x, y, alg.upper_batch())
    c = alg.oracle_counts()
    assert c["grad_y_g"] == 3 and c["hvp"] == 2 and c["cross"] == 2 and c["grad_x_f"] == 1 and c["grad_y_f"] == 1


# --- sparse x: one weight per training row, an upper loss that ignores x --------------------------------------

N_ROWS, D = 6, 3


def _sparse_problem() -> tuple[MultiBlockProblem, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    data = {"a": torch.randn(N_ROWS, D, generator=gen, dtype=DT), "t": torch.randn(N_ROWS, generator=gen, dtype=DT)}
    val = {"a": torch.randn(4, D, generator=gen, dtype=DT), "t": torch.randn(4, generator=gen, dtype=DT)}

    def lower(x, y, batch, block):  # x holds the sampled rows' weights
        return (torch.sigmoid(x) * 0.5 * (batch["a"] @ y - batch["t"]) ** 2).mean() + 0.05 * y @ y

    def upper(x, y, batch, block):
        return 0.5 * ((batch["a"] @ y - batch["t"]) ** 2).mean()

    pb = MultiBlockProblem(upper, lower, torch.zeros(N_ROWS, dtype=DT), torch.zeros(1, D, dtype=DT),
                           RowSampler(data, 5), RowSampler(val, 4), sparse_x=True, upper_depends_on_x=False)
    return pb, data


def test_sparse_x_gradients_are_dense_and_exact() -> None:
    pb, data = _sparse_problem()
    alg = Probe(pb, seed=4)
    x, y, v = _rand(N_ROWS, seed=12), _rand(D, seed=13), _rand(D, seed=14)
    batch = alg.lower_batch()
    idx = batch["index"][0]

    def g_dense(xd: torch.Tensor, yd: torch.Tensor) -> torch.Tensor:  # by hand, on the full weight vector
        r = data["a"][idx] @ yd - data["t"][idx]
        return (torch.sigmoid(xd[idx]) * 0.5 * r**2).mean() + 0.05 * yd @ yd

    gx_ref, gy_ref = torch.func.grad(g_dense, argnums=(0, 1))(x, y)
    gx, gy = alg.lower_grads(x, y, batch)
    assert gx.shape == (N_ROWS,)
    _close(gx, gx_ref)
    _close(gy, gy_ref)
    jv_ref = torch.func.grad(lambda xd: torch.func.grad(g_dense, argnums=1)(xd, y) @ v)(x)
    _close(alg.cross(x, y, v, batch), jv_ref)
    _close(alg.lower_products(x, y, v, batch)[2], jv_ref)
    _close(alg.lower_value(x, y, batch), g_dense(x, y))
    # stacked points keep the (P, d_x) layout
    assert alg.lower_grads(torch.stack([x, x]), torch.stack([y, y]), batch)[0].shape == (2, N_ROWS)
    # f ignores x: grad_x f is zeros of x's shape, grad_x f is not counted
    gx_f, gy_f = alg.upper_grads(x, y, alg.upper_batch())
    assert torch.equal(gx_f, torch.zeros(N_ROWS, dtype=DT)) and gy_f.shape == (D,)
    assert alg.oracle_counts()["grad_x_f"] == 0
    assert alg.upper_value(x, y, alg.upper_batch()).dim() == 0
