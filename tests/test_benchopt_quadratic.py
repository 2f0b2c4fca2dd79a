from __future__ import annotations

import math
import time

import pytest
import torch
from torch.func import grad, vmap

from mbbo.tasks.benchopt_quadratic import (
    BATCH_KEYS,
    BenchoptQuadratic,
    QuadraticLevel,
    inner_loss,
    make_benchopt_quadratic,
    outer_loss,
    quadratic_loss,
)

DT = torch.float64


@pytest.fixture(scope="module")
def pb() -> BenchoptQuadratic:
    return make_benchopt_quadratic(n_inner=300, n_outer=200, d_in=7, d_out=4, random_state=0)


def _x(pb: BenchoptQuadratic, seed: int = 1) -> torch.Tensor:
    return torch.randn(pb.d_out, generator=torch.Generator().manual_seed(seed), dtype=pb.dtype)


def _dense_means(level: QuadraticLevel):
    a, b, c = level.dense_hessians(torch.arange(level.n_samples))
    return a.mean(0), b.mean(0), c.mean(0), level.lin_y.mean(0), level.lin_x.mean(0)


def test_per_sample_loss_is_the_benchopt_quadratic(pb):
    x, y = _x(pb), torch.randn(pb.d_in, generator=torch.Generator().manual_seed(2), dtype=DT)
    idx = torch.tensor([0, 5, 17])
    a, b, c = pb.inner.dense_hessians(idx)
    batch = pb.inner_batch(idx)
    assert set(batch) == set(BATCH_KEYS)
    expected = torch.stack(
        [
            0.5 * y @ a[k] @ y
            + 0.5 * x @ b[k] @ x
            + x @ c[k] @ y
            + batch["lin_y"][k] @ y
            + batch["lin_x"][k] @ x
            for k in range(3)
        ]
    ).mean()
    torch.testing.assert_close(inner_loss(x, y, batch), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        outer_loss(x, y, pb.outer_batch(idx)), quadratic_loss(x, y, pb.outer_batch(idx))
    )
    # the full-batch means agree with the per-sample data
    full = pb.inner_means.value(x, y)
    torch.testing.assert_close(inner_loss(x, y, pb.inner_batch()), full, rtol=1e-12, atol=1e-12)


def test_y_star_zeroes_full_batch_inner_gradient(pb):
    x = _x(pb)
    y_star = pb.y_star(x)
    g = grad(inner_loss, argnums=1)(x, y_star, pb.inner_batch())
    assert float(g.abs().max()) < 1e-10
    # and is not a zero of a perturbed point (the test can fail)
    g_off = grad(inner_loss, argnums=1)(x, y_star + 1e-3, pb.inner_batch())
    assert float(g_off.abs().max()) > 1e-5


def test_hypergradient_matches_autograd_through_solve(pb):
    a, _, c, lin_y, _ = _dense_means(pb.inner)
    outer_full = pb.outer_batch()

    def h(x: torch.Tensor) -> torch.Tensor:
        y_star = torch.linalg.solve(a, -(lin_y + c.T @ x))
        return outer_loss(x, y_star, outer_full)

    for seed in (1, 2):
        x = _x(pb, seed)
        auto = torch.func.grad(h)(x)
        torch.testing.assert_close(pb.hypergradient(x), auto, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pb.value(x), h(x), rtol=1e-12, atol=1e-12)
        assert float(pb.grad_norm_sq(x)) == pytest.approx(float(auto.pow(2).sum()), rel=1e-10)


def test_hypergradient_matches_finite_differences(pb):
    x = _x(pb, 3)
    eps = 1e-5
    fd = torch.stack(
        [(pb.value(x + eps * e) - pb.value(x - eps * e)) / (2 * eps) for e in torch.eye(pb.d_out, dtype=DT)]
    )
    torch.testing.assert_close(pb.hypergradient(x), fd, rtol=1e-7, atol=1e-7)


def test_v_star_solves_the_linear_system_and_sign_convention(pb):
    x = _x(pb, 4)
    y = pb.y_star(x)
    v = pb.v_star(x)
    gy_f = grad(outer_loss, argnums=1)(x, y, pb.outer_batch())
    torch.testing.assert_close(v @ pb.inner_means.hess_yy, gy_f, rtol=1e-10, atol=1e-10)
    gx_f = grad(outer_loss, argnums=0)(x, y, pb.outer_batch())
    # cross term (grad_xy g) v by double backward of <grad_y g, v>
    jv = grad(lambda xx: grad(inner_loss, argnums=1)(xx, y, pb.inner_batch()) @ v)(x)
    torch.testing.assert_close(pb.hypergradient(x), gx_f - jv, rtol=1e-10, atol=1e-10)


def test_closed_forms_are_row_wise(pb):
    xs = torch.randn(3, 2, pb.d_out, generator=torch.Generator().manual_seed(5), dtype=DT)
    ys = pb.y_star(xs)
    hg = pb.hypergradient(xs)
    vals = pb.value(xs)
    assert ys.shape == (3, 2, pb.d_in) and hg.shape == xs.shape and vals.shape == (3, 2)
    torch.testing.assert_close(ys[1, 0], pb.y_star(xs[1, 0]))
    torch.testing.assert_close(hg[2, 1], pb.hypergradient(xs[2, 1]))
    torch.testing.assert_close(vals[0, 1], pb.value(xs[0, 1]))


def test_metrics_and_initial_point(pb):
    x0, y0 = pb.x0(), pb.y0()
    assert torch.equal(x0, torch.full((4,), -2.0, dtype=DT)) and torch.equal(y0, torch.zeros(7, dtype=DT))
    m = pb.metrics(x0, y0)
    assert set(m) == {"value", "func", "inner_distance"}
    assert m["value"] == pytest.approx(float(pb.hypergradient(x0).pow(2).sum()))
    assert m["inner_distance"] == pytest.approx(float(pb.y_star(x0).pow(2).sum()))
    assert set(pb.metrics(x0)) == {"value", "func"}


def test_value_function_is_strongly_convex_and_hessian_is_exact(pb):
    hess = pb.value_hessian()
    assert float(torch.linalg.eigvalsh(hess).min()) >= 1e-12
    auto = torch.func.hessian(pb.value)(_x(pb))
    torch.testing.assert_close(hess, auto, rtol=1e-10, atol=1e-10)


def test_generation_statistics_follow_the_spec():
    """E[A]: spectrum logspace in [mu, L]; E[B]: one zero eigenvalue; E[C]: singular values logspace."""
    pb = make_benchopt_quadratic(
        n_inner=20000, n_outer=10, d_in=5, d_out=3, mu=0.1, L_inner_inner=1.0, L_cross_inner=0.5
    )
    eig_a = torch.linalg.eigvalsh(pb.inner_means.hess_yy)
    expected = torch.logspace(-1, 0, 5, dtype=DT)
    torch.testing.assert_close(eig_a, expected, rtol=0.1, atol=0)
    eig_b = torch.linalg.eigvalsh(pb.inner_means.hess_xx)
    assert abs(float(eig_b[0])) < 1e-12  # exactly singular: every w_i avoids one direction
    torch.testing.assert_close(eig_b[1:], torch.tensor([0.1, 1.0], dtype=DT), rtol=0.1, atol=0)
    sv_c = torch.linalg.svdvals(pb.inner_means.cross).flip(0)
    torch.testing.assert_close(
        sv_c, torch.logspace(math.log10(0.1), math.log10(0.5), 3, dtype=DT), rtol=0.1, atol=0
    )
    # linear terms are standard normal
    assert abs(float(pb.inner.lin_y.std()) - 1.0) < 0.05


def test_float32_and_float64_are_the_same_problem():
    kw = {"n_inner": 64, "n_outer": 32, "d_in": 5, "d_out": 3, "random_state": 11}
    p64 = make_benchopt_quadratic(**kw, dtype=torch.float64)
    p32 = make_benchopt_quadratic(**kw, dtype=torch.float32)
    assert p32.dtype == torch.float32 and p32.inner_means.hess_yy.dtype == torch.float32
    assert torch.equal(p32.inner.u, p64.inner.u.float())
    x = p64.x0()
    hg32 = p32.hypergradient(x.float())
    assert hg32.dtype == torch.float32
    torch.testing.assert_close(hg32.double(), p64.hypergradient(x), rtol=1e-4, atol=1e-4)
    loss32 = inner_loss(x.float(), p32.y0(), p32.inner_batch(torch.arange(8)))
    assert loss32.dtype == torch.float32
    # .to() converts every tensor
    assert p64.to(torch.float32).outer.lin_x.dtype == torch.float32


def test_reproducible_and_seed_dependent():
    kw = {"n_inner": 20, "n_outer": 10, "d_in": 3, "d_out": 2}
    a = make_benchopt_quadratic(**kw, random_state=5)
    b = make_benchopt_quadratic(**kw, random_state=5)
    c = make_benchopt_quadratic(**kw, random_state=6)
    assert torch.equal(a.inner.q, b.inner.q) and torch.equal(a.outer.p, b.outer.p)
    assert not torch.equal(a.inner.q, c.inner.q)


def test_retries_and_failure():
    pb = make_benchopt_quadratic(100, 100, 6, 4, L_cross_outer=0.5, random_state=3)
    assert pb.n_tries > 1  # the first draws had an indefinite value Hessian; retries draw new matrices
    assert float(torch.linalg.eigvalsh(pb.value_hessian()).min()) >= 1e-12
    with pytest.raises(RuntimeError, match="max_tries=2"):
        make_benchopt_quadratic(50, 50, 6, 4, L_cross_outer=50.0, max_tries=2)


def test_vmap_over_blocks_of_gathered_batches(pb):
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, pb.n_inner, (5, 8), generator=gen)  # 5 blocks, 8 samples each
    batch = pb.inner_batch(idx)
    assert batch["u"].shape == (5, 8, pb.d_in)
    xs = torch.randn(5, pb.d_out, generator=gen, dtype=DT)
    ys = torch.randn(5, pb.d_in, generator=gen, dtype=DT)
    gy = vmap(grad(inner_loss, argnums=1))(xs, ys, batch)
    for k in range(5):
        one = {key: t[k] for key, t in batch.items()}
        torch.testing.assert_close(gy[k], grad(inner_loss, argnums=1)(xs[k], ys[k], one))


def test_paper_instance_sizes_generate_fast():
    start = time.perf_counter()
    pb = make_benchopt_quadratic(n_inner=32768, n_outer=1024, d_in=100, d_out=10, dtype=torch.float32)
    elapsed = time.perf_counter() - start
    try:
        assert elapsed < 20.0
        assert pb.inner.u.shape == (32768, 100) and pb.inner.p.shape == (32768, 10)
        assert pb.outer.q.shape == (1024, 100) and pb.outer.lin_x.shape == (1024, 10)
        assert pb.inner_means.cross.shape == (10, 100)
        m = pb.metrics(pb.x0(), pb.y0())
        assert all(math.isfinite(v) for v in m.values())
    finally:
        del pb


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_inner": 0}, r"^n_inner must be an integer in \[1, inf\), got 0$"),
        ({"d_out": 2.0}, r"^d_out must be an integer"),
        ({"mu": -0.1}, r"^mu must be a finite number in \(0.0, inf\), got -0.1$"),
        ({"L_cross_inner": float("inf")}, r"^L_cross_inner must be"),
        ({"max_tries": 0}, r"^max_tries must be"),
        ({"dtype": torch.int64}, r"^dtype must be torch.float32 or torch.float64"),
        ({"random_state": 1.5}, r"^random_state must be an integer"),
    ],
)
def test_validation(kwargs, match):
    base = {"n_inner": 10, "n_outer": 10, "d_in": 3, "d_out": 2}
    with pytest.raises(ValueError, match=match):
        make_benchopt_quadratic(**{**base, **kwargs})
