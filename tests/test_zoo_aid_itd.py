"""AID-BiO (every linear solver), ITD-BiO and first-order ITD-BiO: convergence on the benchopt quadratic, exact
hypergradients (closed form; autograd through a hand-unrolled loop), equivalences, validation, resume."""

from __future__ import annotations

import pytest
import torch

from mbbo.algorithms.aid_itd import AIDBiO, FOITDBiO, ITDBiO
from mbbo.algorithms.registry import make_algorithm
from mbbo.inner_solvers import LowerSGD, unrolled_hypergradient
from mbbo.problem import MultiBlockProblem, RowSampler
from mbbo.tasks.benchopt_quadratic import BenchoptQuadratic
from mbbo.tasks.quadratic import MultiBlockQuadratic

DT = torch.float64


# measured ||grad h||^2 at iteration 40 (batch 64, seeds 0/1/2), from 2.43 at x0
CONVERGENCE = {
    "aid_bio": ({"linsys_solver": "sgd", "linsys_lr": 0.3, "linsys_steps": 5}, 0.25),  # 0.011, 0.011, 0.042
    "aid_bio_cg": ({"linsys_solver": "cg", "linsys_steps": 5}, 0.25),  # 0.006, 0.026, 0.060
    "itd_bio": ({}, 0.25),  # 0.007, 0.020, 0.040
    "fo_itd_bio": ({}, 0.25),  # 0.011, 0.017, 0.059 (the cross terms of this instance are small, L_cross 0.1)
}


@pytest.mark.parametrize("case", sorted(CONVERGENCE))
def test_lowers_grad_norm_on_benchopt_quadratic(bq: BenchoptQuadratic, case: str) -> None:
    kw, threshold = CONVERGENCE[case]
    alg = make_algorithm(case.removesuffix("_cg"), bq.problem(64), seed=0, lr=1.0, lower_lr=0.3,
                         lower_steps=5, **kw)
    for _ in range(40):
        alg.step()
    assert float(bq.grad_norm_sq(alg.x)) <= threshold


# --- AID: exact inner solve + exact linear solve = the closed-form hypergradient -------------------------------

@pytest.mark.parametrize(("solver", "steps", "tol"), [
    ("cg", 4, 1e-8), ("sgd", 60, 1e-8), ("neumann", 60, 1e-8), ("fixed_point", 60, 1e-8)])
def test_aid_with_exact_solves_matches_closed_form(solver: str, steps: int, tol: float) -> None:
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=2)  # Hessian of g with spectrum in [1, 4]
    x0 = torch.randn(3, generator=torch.Generator().manual_seed(1), dtype=DT)
    # step 0.4 = 2 / (1 + 4): every GD / Neumann factor contracts by <= 0.6, 0.6^60 < 1e-13
    alg = AIDBiO(quad.problem(x0=x0), lr=1.0, lower_lr=0.4, lower_steps=60, linsys_solver=solver,
                 linsys_steps=steps, linsys_lr=0.4)
    alg.step()
    estimate = x0 - alg.x  # lr = 1
    torch.testing.assert_close(estimate, quad.hypergradient(x0), rtol=0, atol=tol)
    torch.testing.assert_close(alg.y, quad.lower_solution(x0)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(alg.v, quad.linear_system_solution(x0)[0], rtol=0, atol=tol)
    if solver == "cg":
        assert alg.oracle_counts()["hvp"] <= 5  # at most d_y = 4 CG products + the warm start's residual


def test_aid_warm_start_of_v_and_loop_regimes() -> None:
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=2)
    pb = quad.problem()
    # no-loop (N = Q = 1) with warm starts still converges on a deterministic quadratic (||grad F|| from 2.0 to
    # 6e-5 after 100 and 4e-7 after 150 iterations); without warm-starting v, v is one GD step from 0 and the
    # iterates stall at a biased point (||grad F|| = 0.7755 from iteration 50 on)
    kw = {"lr": 0.5, "lower_lr": 0.4, "lower_steps": 1, "linsys_steps": 1, "linsys_lr": 0.4}
    warm = AIDBiO(pb, **kw)
    for _ in range(130):
        warm.step()
    assert float(quad.hypergradient(warm.x).norm()) < 1e-5
    cold = AIDBiO(pb, warm_start_v=False, **kw)
    for _ in range(50):
        cold.step()
    assert float(quad.hypergradient(cold.x).norm()) > 0.5


def test_aid_neumann_equals_stocbio() -> None:
    """AID-BiO with the Neumann solver is stocBiO: the same trajectory from the same seed."""
    pb = MultiBlockQuadratic.random(1, 3, 4, seed=2).problem(noise=0.2, hessian_noise=0.2, batch_size=2)
    kw = {"lower_steps": 3, "linsys_steps": 4, "linsys_lr": 0.2}
    aid = make_algorithm("aid_bio", pb, seed=1, linsys_solver="neumann", **kw)
    stoc = make_algorithm("stocbio", pb, seed=1, **kw)
    for _ in range(5):
        aid.step()
        stoc.step()
    assert torch.equal(aid.x, stoc.x) and aid.oracle_counts() == stoc.oracle_counts()


# --- ITD: autograd through a hand-unrolled loop ---------------------------------------------------------------

def _clone(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(gen.get_state())
    return out


def test_itd_hypergradient_equals_autograd_through_hand_unrolled_loop() -> None:
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=4)
    A, C, a, F, K, H, h, f = (t[0] for t in (quad.A, quad.C, quad.a, quad.F, quad.K, quad.H, quad.h, quad.f))
    x0 = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=DT)
    pb = quad.problem(noise=0.3, hessian_noise=0.3, batch_size=2, x0=x0)
    N, alpha, beta = 4, 0.2, 0.6
    alg = ITDBiO(pb, seed=2, lr=beta, lower_lr=alpha, lower_steps=N)
    gens = {k: _clone(g) for k, g in alg.generators.items()}
    block = torch.zeros(1, dtype=torch.long)

    x, y = x0.clone(), pb.y0[0].clone()
    for _ in range(2):  # two iterations: the second starts from the first one's y^N, a constant
        lower = [pb.lower_sampler.sample(block, gens["lower"]) for _ in range(N)]
        upper = pb.upper_sampler.sample(block, gens["upper"])
        xr = x.clone().requires_grad_(True)
        yt = y
        for b in lower:
            scale = 1.0 + b["hessian_noise"][0].mean()
            yt = yt - alpha * (scale * A @ yt + C.T @ xr + a + b["noise_g"][0].mean(0))
        fval = 0.5 * yt @ F @ yt + xr @ K @ yt + 0.5 * xr @ H @ xr + h @ xr + (f + upper["noise_f"][0].mean(0)) @ yt
        (hg,) = torch.autograd.grad(fval, xr)
        x, y = x - beta * hg, yt.detach()
        alg.step()
        torch.testing.assert_close(alg.x, x, rtol=0, atol=1e-10)
        torch.testing.assert_close(alg.y, y, rtol=0, atol=1e-12)
    counts = alg.oracle_counts()
    assert counts["grad_y_g"] == counts["hvp"] == counts["cross"] == 2 * N and counts["grad_x_f"] == 2


def test_unrolled_hypergradient_building_block() -> None:
    """The shared function on its own: against a hand loop, N = 0, and the implicit limit for large N."""
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=6)
    A, C, a, F, K, H, h, f = (t[0] for t in (quad.A, quad.C, quad.a, quad.F, quad.K, quad.H, quad.h, quad.f))

    def g(x, y, t):
        return 0.5 * (1 + 0.1 * t) * y @ A @ y + x @ C @ y + a @ y

    def fu(x, y):
        return 0.5 * y @ F @ y + x @ K @ y + 0.5 * x @ H @ x + h @ x + f @ y

    x, y0 = torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(0)), torch.ones(4, dtype=DT)
    xr = x.clone().requires_grad_(True)
    yt = y0
    for t in range(3):
        yt = yt - 0.1 * ((1 + 0.1 * t) * A @ yt + C.T @ xr + a)
    (ref,) = torch.autograd.grad(fu(xr, yt), xr)
    hg, y_last = unrolled_hypergradient(g, fu, x, y0, 3, 0.1)
    torch.testing.assert_close(hg, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_last, yt.detach(), rtol=0, atol=1e-14)
    assert not y_last.requires_grad
    torch.testing.assert_close(unrolled_hypergradient(g, fu, x, y0, 0, 0.1)[0], torch.func.grad(fu)(x, y0))
    # many exact steps from y*(x): ITD tends to the implicit hypergradient
    hg, _ = unrolled_hypergradient(lambda x_, y_, t: g(x_, y_, 0), fu, x, quad.lower_solution(x)[0], 400, 0.25)
    torch.testing.assert_close(hg, quad.hypergradient(x), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="n_steps"):
        unrolled_hypergradient(g, fu, x, y0, -1, 0.1)
    with pytest.raises(ValueError, match="lr"):
        LowerSGD(3, 0.0)


def test_first_order_itd_is_grad_x_f_at_the_last_iterate() -> None:
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=4)
    A, C, a, K, H, h = (t[0] for t in (quad.A, quad.C, quad.a, quad.K, quad.H, quad.h))
    alg = FOITDBiO(quad.problem(), lr=0.5, lower_lr=0.2, lower_steps=3)
    x, y = alg.x.clone(), alg.y.clone()
    for _ in range(3):
        y = y - 0.2 * (A @ y + C.T @ x + a)
    alg.step()
    torch.testing.assert_close(alg.x, x - 0.5 * (K @ y + H @ x + h), rtol=0, atol=1e-14)
    assert alg.oracle_counts()["hvp"] == 0 and alg.oracle_counts()["cross"] == 0


def test_first_order_itd_refuses_an_upper_loss_without_x() -> None:
    gen = torch.Generator().manual_seed(0)
    data = {"a": torch.randn(8, 2, generator=gen, dtype=DT)}
    pb = MultiBlockProblem(lambda x, y, b, k: (b["a"] @ y).pow(2).mean(),
                           lambda x, y, b, k: 0.5 * y @ y + (x * (b["a"] @ y)).mean(),
                           torch.zeros(1, dtype=DT), torch.zeros(1, 2, dtype=DT), RowSampler(data, 4),
                           RowSampler(data, 4), upper_depends_on_x=False)
    assert "identically zero" in (FOITDBiO.unsuitable_for(pb) or "")
    with pytest.raises(ValueError, match="identically zero"):
        FOITDBiO(pb)
    assert ITDBiO.unsuitable_for(pb) is None
    with pytest.raises(ValueError, match="m = 2"):
        make_algorithm("itd_bio", MultiBlockQuadratic.random(2, 3, 4, seed=0).problem())


@pytest.mark.parametrize(("name", "kw", "param"), [
    ("aid_bio", {"linsys_solver": "lu"}, "linsys_solver"), ("aid_bio", {"linsys_steps": 0}, "linsys_steps"),
    ("aid_bio", {"linsys_lr": -0.1}, "linsys_lr"), ("aid_bio", {"warm_start_v": 1}, "warm_start_v"),
    ("aid_bio", {"lower_steps": -2}, "lower_steps"), ("itd_bio", {"lower_lr": 0}, "lower_lr"),
    ("itd_bio", {"lower_steps": 0}, "lower_steps"), ("itd_bio", {"linsys_steps": 3}, "linsys_steps"),
    ("fo_itd_bio", {"lr": "0.1"}, "lr"), ("fo_itd_bio", {"warm_start": None}, "warm_start"),
])
def test_bad_hyper_parameters_raise(name: str, kw: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        make_algorithm(name, MultiBlockQuadratic.random(1, 3, 4, seed=0).problem(), **kw)


@pytest.mark.parametrize(("name", "kw"), [
    ("aid_bio", {"linsys_solver": "sgd"}), ("aid_bio", {"linsys_solver": "cg"}), ("itd_bio", {}),
    ("fo_itd_bio", {})])
def test_resume_is_bit_identical(bq: BenchoptQuadratic, name: str, kw: dict, resumed_twin) -> None:
    pb = bq.problem(8)
    kw = {"lower_steps": 2, **kw} | ({"linsys_steps": 2} if name == "aid_bio" else {})
    a, b = resumed_twin(lambda seed: make_algorithm(name, pb, seed=seed, **kw), 3, 3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.oracle_counts() == b.oracle_counts()
    if name == "aid_bio":
        assert torch.equal(a.v, b.v)
