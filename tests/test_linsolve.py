from __future__ import annotations

import pytest
import torch

from mbbo.linsolve import (
    ConjugateGradient,
    FixedPoint,
    HVPFactory,
    LinearSolveResult,
    Neumann,
    SGDQuadratic,
    eigen_floor,
    explicit_solve,
)

DT = torch.float64


def spd(d: int, gen: torch.Generator, mu: float = 0.5, batch: tuple[int, ...] = ()) -> torch.Tensor:
    m = torch.randn(*batch, d, d, generator=gen, dtype=DT)
    return m @ m.mT / d + mu * torch.eye(d, dtype=DT)


def batched_hvp(H: torch.Tensor):
    """Row-wise HVP for per-row matrices H (..., d, d) or one shared matrix (d, d)."""
    return lambda v: (H @ v.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def system():
    gen = torch.Generator().manual_seed(0)
    H = spd(6, gen, batch=(4,))  # one SPD matrix per row (block)
    b = torch.randn(4, 6, generator=gen, dtype=DT)
    ref = torch.linalg.solve(H, b.unsqueeze(-1)).squeeze(-1)
    lmax = float(torch.linalg.eigvalsh(H).max())
    return H, b, ref, lmax


# ---------------------------------------------------------------------------------------------------------- #
# convergence of every solver to torch.linalg.solve


def test_neumann_converges(system):
    H, b, ref, lmax = system
    v, n = Neumann(n_terms=600, eta=1.0 / lmax).solve(batched_hvp(H), b)
    assert n == 600
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-9)


def test_sgd_quadratic_converges(system):
    H, b, ref, lmax = system
    v, n = SGDQuadratic(n_steps=600, lr=1.0 / lmax).solve(batched_hvp(H), b)
    assert n == 600
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-9)


def test_cg_converges_in_d_steps(system):
    H, b, ref, _ = system
    v, n = ConjugateGradient(max_iter=50, rtol=1e-12).solve(batched_hvp(H), b)
    assert n <= 6 + 2  # exact in d steps up to rounding
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-10)


def test_fixed_point_converges_and_stops_on_tol(system):
    H, b, ref, lmax = system
    v, n = FixedPoint(max_iter=5000, lr=1.0 / lmax, tol=1e-13).solve(batched_hvp(H), b)
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-9)
    assert n < 5000  # stopped by the tolerance


def test_explicit_solve_all_modes(system):
    H, b, ref, _ = system
    torch.testing.assert_close(explicit_solve(H, b), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(explicit_solve(H, b, cholesky=True), ref, rtol=0, atol=1e-12)
    # a floor below the spectrum changes nothing
    torch.testing.assert_close(explicit_solve(H, b, floor=1e-3), ref, rtol=0, atol=1e-11)
    # one shared matrix against a batch of right-hand sides
    torch.testing.assert_close(explicit_solve(H[0], b), torch.linalg.solve(H[0], b.T).T, rtol=0, atol=1e-12)


def test_warm_start_from_solution_is_fixed(system):
    H, b, ref, lmax = system
    for solver in (SGDQuadratic(n_steps=5, lr=1.0 / lmax), FixedPoint(max_iter=5, lr=1.0 / lmax)):
        v, _ = solver.solve(batched_hvp(H), b, v0=ref)
        torch.testing.assert_close(v, ref, rtol=0, atol=1e-12)


def test_float32_follows_input(system):
    H, b, ref, lmax = system
    H32, b32 = H.float(), b.float()
    for solver in (Neumann(300, 1.0 / lmax), SGDQuadratic(300, 1.0 / lmax), ConjugateGradient(20)):
        v, _ = solver.solve(batched_hvp(H32), b32)
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), ref, rtol=0, atol=1e-4)
    assert explicit_solve(H32, b32, floor=0.1).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------- #
# Neumann: the paper formula, fresh HVPs, random truncation


def test_neumann_is_the_paper_formula_with_fresh_batches():
    """eta * sum_{q=0}^{Q} prod_{j<=q} (I - eta H_j) b, H_j distinct: not the stocBiO-code variant."""
    gen = torch.Generator().manual_seed(1)
    d, Q, eta = 5, 3, 0.3
    Hs = [spd(d, gen) for _ in range(Q)]
    b = torch.randn(d, generator=gen, dtype=DT)
    eye = torch.eye(d, dtype=DT)
    p = [b]
    for j in range(Q):
        p.append((eye - eta * Hs[j]) @ p[-1])
    expected = eta * sum(p)
    v, n = Neumann(n_terms=Q, eta=eta).solve([batched_hvp(h) for h in Hs], b)
    assert n == Q
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-13)
    # the reference-code quirk (no eta on the sum, no q = 0 term) gives something else
    quirk = eta * p[-1] + sum(p[1:])
    assert not torch.allclose(v, quirk)

    calls: list[int] = []

    def make(j: int):
        calls.append(j)
        return batched_hvp(Hs[j])

    v2, _ = Neumann(n_terms=Q, eta=eta).solve(HVPFactory(make), b)
    assert calls == [0, 1, 2]
    torch.testing.assert_close(v2, expected, rtol=0, atol=1e-13)


def test_neumann_zero_terms_is_eta_b():
    b = torch.ones(3, dtype=DT)
    v, n = Neumann(n_terms=0, eta=0.5).solve(lambda x: x, b)
    assert n == 0
    torch.testing.assert_close(v, 0.5 * b)


def test_random_truncation_enumeration_gives_truncated_series(monkeypatch):
    """E_q[Q eta prod_{j<=q}(I - eta H) b], q ~ U{0..Q-1}, equals eta sum_{q<Q} (I - eta H)^q b exactly."""
    gen = torch.Generator().manual_seed(2)
    H = spd(4, gen)
    b = torch.randn(4, generator=gen, dtype=DT)
    solver = Neumann(n_terms=5, eta=0.4, random_truncation=True)
    outs = []
    for q in range(5):
        monkeypatch.setattr(Neumann, "draw_truncation", lambda self, shape, g, q=q: torch.tensor(q))
        v, n = solver.solve(batched_hvp(H), b)
        assert n == q
        outs.append(v)
    torch.testing.assert_close(torch.stack(outs).mean(0), solver.truncated_series(batched_hvp(H), b))


def test_random_truncation_average_over_draws():
    gen = torch.Generator().manual_seed(3)
    H = spd(4, gen)
    b = torch.randn(4, generator=gen, dtype=DT)
    Q, eta, n_draws = 6, 0.3, 6000
    solver = Neumann(n_terms=Q, eta=eta, random_truncation=True)
    draw_gen = torch.Generator().manual_seed(123)
    samples = torch.stack([solver.solve(batched_hvp(H), b, generator=draw_gen).v for _ in range(n_draws)])
    target = solver.truncated_series(batched_hvp(H), b)
    stderr = samples.std(0) / n_draws**0.5
    assert torch.all((samples.mean(0) - target).abs() <= 5 * stderr + 1e-12)
    # and it is close to the deterministic series with Q - 1 HVPs (same Q terms)
    torch.testing.assert_close(target, Neumann(n_terms=Q - 1, eta=eta).solve(batched_hvp(H), b).v)
    # reproducible from the generator state
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [solver.solve(batched_hvp(H), b, generator=g1) for _ in range(5)]
    c = [solver.solve(batched_hvp(H), b, generator=g2) for _ in range(5)]
    assert [r.n_hvp for r in a] == [r.n_hvp for r in c]
    assert all(torch.equal(r.v, s.v) for r, s in zip(a, c, strict=True))


def test_random_truncation_draws_only_what_it_uses_and_scale_option():
    H = torch.eye(3, dtype=DT) * 2.0
    b = torch.ones(3, dtype=DT)
    made: list[int] = []

    def make(j: int):
        made.append(j)
        return batched_hvp(H)

    gen = torch.Generator().manual_seed(0)
    res = Neumann(n_terms=8, eta=0.1, random_truncation=True).solve(HVPFactory(make), b, generator=gen)
    assert made == list(range(res.n_hvp))
    expected = 8 * 0.1 * (0.8**res.n_hvp) * b
    torch.testing.assert_close(res.v, expected)
    gen = torch.Generator().manual_seed(0)
    unscaled = Neumann(n_terms=8, eta=0.1, random_truncation=True, scale_by_q=False)
    res2 = unscaled.solve(batched_hvp(H), b, generator=gen)
    torch.testing.assert_close(res2.v, expected / 8)


def test_random_truncation_independent_rows():
    gen = torch.Generator().manual_seed(4)
    H = spd(3, gen, batch=(7,))
    b = torch.randn(7, 3, generator=gen, dtype=DT)
    solver = Neumann(n_terms=5, eta=0.3, random_truncation=True, independent_rows=True)
    v, n = solver.solve(batched_hvp(H), b, generator=torch.Generator().manual_seed(9))
    qs = solver.draw_truncation((7,), torch.Generator().manual_seed(9))
    assert n == int(qs.max())
    assert len(set(qs.tolist())) > 1  # the rows really got different truncation levels
    eye = torch.eye(3, dtype=DT)
    for r in range(7):
        p = b[r]
        for _ in range(int(qs[r])):
            p = (eye - 0.3 * H[r]) @ p
        torch.testing.assert_close(v[r], 5 * 0.3 * p)


def test_hvp_sequence_too_short_raises():
    with pytest.raises(ValueError, match="sequence of HVPs has 1 entries"):
        Neumann(n_terms=2, eta=0.1).solve([lambda v: v], torch.ones(2))


# ---------------------------------------------------------------------------------------------------------- #
# SGD on the quadratic: ball, ridge, clip, fresh batches


def test_sgd_ridge_ball_and_clip(system):
    H, b, _, lmax = system
    ridge = 0.7
    v, _ = SGDQuadratic(n_steps=800, lr=1.0 / (lmax + ridge), ridge=ridge).solve(batched_hvp(H), b)
    eye = torch.eye(6, dtype=DT)
    torch.testing.assert_close(
        v, torch.linalg.solve(H + ridge * eye, b.unsqueeze(-1)).squeeze(-1), atol=1e-9, rtol=0
    )

    radius = 0.05
    v, _ = SGDQuadratic(n_steps=50, lr=1.0 / lmax, radius=radius).solve(batched_hvp(H), b)
    assert torch.all(torch.linalg.vector_norm(v, dim=-1) <= radius * (1 + 1e-12))
    # a ball that contains the solution changes nothing
    big = SGDQuadratic(n_steps=50, lr=1.0 / lmax, radius=1e6).solve(batched_hvp(H), b).v
    torch.testing.assert_close(big, SGDQuadratic(n_steps=50, lr=1.0 / lmax).solve(batched_hvp(H), b).v)

    clip = 1e-3
    v1, _ = SGDQuadratic(n_steps=1, lr=1.0 / lmax, clip=clip).solve(batched_hvp(H), b)
    torch.testing.assert_close(torch.linalg.vector_norm(v1, dim=-1), torch.full((4,), clip, dtype=DT))


def test_sgd_one_step_is_soba_update_and_uses_fresh_hvps():
    H1, H2 = torch.eye(2, dtype=DT) * 2, torch.eye(2, dtype=DT) * 3
    b = torch.tensor([1.0, -1.0], dtype=DT)
    v0 = torch.tensor([0.5, 0.25], dtype=DT)
    v, n = SGDQuadratic(n_steps=2, lr=0.1).solve([batched_hvp(H1), batched_hvp(H2)], b, v0=v0)
    v_1 = v0 - 0.1 * (H1 @ v0 - b)
    v_2 = v_1 - 0.1 * (H2 @ v_1 - b)
    assert n == 2
    torch.testing.assert_close(v, v_2)
    with pytest.raises(ValueError, match="v0 must have the shape of b"):
        SGDQuadratic().solve(batched_hvp(H1), b, v0=torch.zeros(3, dtype=DT))


# ---------------------------------------------------------------------------------------------------------- #
# conjugate gradient on solved and degenerate systems


def test_cg_on_solved_systems():
    H = spd(5, torch.Generator().manual_seed(5))
    hvp = batched_hvp(H)
    v, n = ConjugateGradient(10).solve(hvp, torch.zeros(5, dtype=DT))
    assert n == 0 and torch.equal(v, torch.zeros(5, dtype=DT))

    b = torch.randn(5, generator=torch.Generator().manual_seed(6), dtype=DT)
    sol = torch.linalg.solve(H, b)
    v, n = ConjugateGradient(10, rtol=1e-8).solve(hvp, b, v0=sol)
    assert n == 1  # only the initial residual
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, sol)

    # mixed rows: one already solved (b = 0), one not
    bb = torch.stack([torch.zeros(5, dtype=DT), b])
    v, _ = ConjugateGradient(20, rtol=1e-12).solve(hvp, bb)
    assert torch.isfinite(v).all()
    assert torch.equal(v[0], torch.zeros(5, dtype=DT))
    torch.testing.assert_close(v[1], sol, atol=1e-10, rtol=0)

    # running many more iterations than needed stays finite (rtol = 0: exact-zero residual test only)
    v, _ = ConjugateGradient(200, rtol=0.0).solve(hvp, b)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, sol, atol=1e-9, rtol=0)


def test_cg_breakdown_on_indefinite_matrix_is_finite():
    H = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    v, _ = ConjugateGradient(10).solve(batched_hvp(H), torch.tensor([1.0, 1.0], dtype=DT))
    assert torch.isfinite(v).all()


def test_cg_and_fixed_point_need_one_fixed_hvp():
    with pytest.raises(TypeError, match="one fixed HVP"):
        ConjugateGradient().solve([lambda v: v], torch.ones(2))
    with pytest.raises(TypeError, match="one fixed HVP"):
        FixedPoint().solve(HVPFactory(lambda j: lambda v: v), torch.ones(2))


# ---------------------------------------------------------------------------------------------------------- #
# explicit matrices and the eigenvalue floor


def test_eigen_floor_projection():
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(3, 4, 4, generator=gen, dtype=DT)  # non-symmetric, indefinite
    floored = eigen_floor(a, 0.2)
    torch.testing.assert_close(floored, floored.mT)
    assert torch.all(torch.linalg.eigvalsh(floored) >= 0.2 - 1e-12)
    # matrices already above the floor are only symmetrised
    H = spd(4, gen, mu=1.0)
    torch.testing.assert_close(eigen_floor(H, 0.5), H)
    # explicit_solve with a floor solves the floored system
    b = torch.randn(3, 4, generator=gen, dtype=DT)
    torch.testing.assert_close(
        explicit_solve(a, b, floor=0.2), torch.linalg.solve(floored, b.unsqueeze(-1)).squeeze(-1)
    )


def test_explicit_solve_errors():
    with pytest.raises(ValueError, match="not positive definite"):
        explicit_solve(torch.diag(torch.tensor([1.0, -1.0])), torch.ones(2), cholesky=True)
    with pytest.raises(ValueError, match=r"H must have shape"):
        explicit_solve(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"b must have shape"):
        explicit_solve(torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"floor must be a finite number in \(0.0, inf\), got -1.0"):
        explicit_solve(torch.eye(2), torch.ones(2), floor=-1.0)


# ---------------------------------------------------------------------------------------------------------- #
# hyper-parameter validation


@pytest.mark.parametrize(
    ("factory", "name", "value"),
    [
        (lambda: Neumann(n_terms=-1), "n_terms", "-1"),
        (lambda: Neumann(n_terms=2.5), "n_terms", "2.5"),
        (lambda: Neumann(n_terms=0, random_truncation=True), "n_terms", "0"),
        (lambda: Neumann(eta=0.0), "eta", "0.0"),
        (lambda: Neumann(eta=float("nan")), "eta", "nan"),
        (lambda: SGDQuadratic(n_steps=True), "n_steps", "True"),
        (lambda: SGDQuadratic(lr=-1.0), "lr", "-1.0"),
        (lambda: SGDQuadratic(radius=0.0), "radius", "0.0"),
        (lambda: SGDQuadratic(ridge=-0.1), "ridge", "-0.1"),
        (lambda: SGDQuadratic(clip=-2.0), "clip", "-2.0"),
        (lambda: ConjugateGradient(max_iter=-3), "max_iter", "-3"),
        (lambda: ConjugateGradient(rtol=-1e-3), "rtol", "-0.001"),
        (lambda: FixedPoint(lr=0), "lr", "0"),
        (lambda: FixedPoint(tol=-1.0), "tol", "-1.0"),
    ],
)
def test_validation_errors_name_parameter_value_and_range(factory, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .* in [\[(].*, got {value}$"):
        factory()


def test_result_is_a_named_tuple():
    res = Neumann(1, 0.5).solve(lambda v: v, torch.ones(2))
    assert isinstance(res, LinearSolveResult)
    v, n = res
    assert n == 1 and torch.equal(v, res.v)
