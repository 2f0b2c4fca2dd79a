"""AmIGO and FSLA: convergence on the benchopt quadratic, AmIGO == AID-BiO with the SGD solver, FSLA's
two-point STORM iteration by hand on sampled rows, restarts, validation, resume."""

from __future__ import annotations

import pytest
import torch

from mbbo.algorithms.amigo import FSLA, AmIGO
from mbbo.algorithms.registry import make_algorithm
from mbbo.tasks.benchopt_quadratic import BenchoptQuadratic, make_benchopt_quadratic
from mbbo.tasks.quadratic import MultiBlockQuadratic

DT = torch.float64


# measured ||grad h||^2 at iteration 40 (batch 64, lr 1, lower_lr 0.3, linsys_lr 0.3; seeds 0/1/2), from 2.43
CONVERGENCE = {
    "amigo": ({"lower_steps": 5, "linsys_steps": 5}, 0.25),  # 0.011, 0.011, 0.042
    "fsla": ({"momentum": 0.5}, 0.25),  # 0.063, 0.082, 0.037 (steps / sqrt(k+1))
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_lowers_grad_norm_on_benchopt_quadratic(bq: BenchoptQuadratic, name: str) -> None:
    kw, threshold = CONVERGENCE[name]
    alg = make_algorithm(name, bq.problem(64), seed=0, lr=1.0, lower_lr=0.3, linsys_lr=0.3, **kw)
    for _ in range(40):
        alg.step()
    assert float(bq.grad_norm_sq(alg.x)) <= threshold


def test_amigo_is_aid_bio_with_the_sgd_solver() -> None:
    pb = MultiBlockQuadratic.random(1, 3, 4, seed=2).problem(noise=0.2, hessian_noise=0.2, batch_size=2)
    kw = {"lower_steps": 3, "linsys_steps": 4, "linsys_lr": 0.2}
    amigo = make_algorithm("amigo", pb, seed=1, **kw)
    aid = make_algorithm("aid_bio", pb, seed=1, linsys_solver="sgd", warm_start_v=True, **kw)
    for _ in range(5):
        amigo.step()
        aid.step()
    assert torch.equal(amigo.x, aid.x) and torch.equal(amigo.v, aid.v) and amigo.oracle_counts() == aid.oracle_counts()


def test_amigo_with_exact_loops_matches_closed_form() -> None:
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=2)
    x0 = torch.randn(3, generator=torch.Generator().manual_seed(1), dtype=DT)
    alg = AmIGO(quad.problem(x0=x0), lr=1.0, lower_lr=0.4, lower_steps=60, linsys_lr=0.4, linsys_steps=60)
    alg.step()
    torch.testing.assert_close(x0 - alg.x, quad.hypergradient(x0), rtol=0, atol=1e-8)


def _clone(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(gen.get_state())
    return out


def _means(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mini-batch means of the rank-1 factors: yy = mean u u^T, xx = mean w w^T, xy = mean p q^T."""
    u, w, p, q = (batch[k][0] for k in ("u", "w", "p", "q"))
    b = u.shape[0]
    return {"yy": u.T @ u / b, "xx": w.T @ w / b, "xy": p.T @ q / b, "ly": batch["lin_y"][0].mean(0),
            "lx": batch["lin_x"][0].mean(0)}


def _gy(m, x, y):
    return m["yy"] @ y + m["xy"].T @ x + m["ly"]


def _gx(m, x, y):
    return m["xx"] @ x + m["xy"] @ y + m["lx"]


def test_fsla_two_iterations_by_hand_on_sampled_rows() -> None:
    """Per-sample Hessians and cross terms differ, so the second iteration's STORM correction (same samples at
    (x_1, y_2, v_2) and (x_0, y_1, v_1)) is visible."""
    small = make_benchopt_quadratic(n_inner=40, n_outer=40, d_in=4, d_out=3, random_state=1)
    pb = small.problem(3)
    alpha, eta, rho, beta = 0.3, 0.25, 0.4, 0.5
    alg = FSLA(pb, seed=2, lr=beta, lower_lr=alpha, linsys_lr=eta, momentum=rho)
    gens = {k: _clone(g) for k, g in alg.generators.items()}
    block = torch.zeros(1, dtype=torch.long)

    def lower():
        return _means(pb.lower_sampler.sample(block, gens["lower"]))

    def upper():
        return _means(pb.upper_sampler.sample(block, gens["upper"]))

    x, y, v = pb.x0.clone(), pb.y0[0].clone(), torch.zeros(4, dtype=DT)
    x_prev, d = None, None
    for k in range(2):
        s = (k + 1) ** -0.5
        y_new = y - alpha * s * _gy(lower(), x, y)
        b2, xi1 = lower(), upper()
        v_new = v - eta * s * (b2["yy"] @ v - _gy(xi1, x, y_new))
        xi2, b3 = upper(), lower()
        h = _gx(xi2, x, y_new) - b3["xy"] @ v_new
        if k == 0:
            d = h
        else:
            h_old = _gx(xi2, x_prev, y) - b3["xy"] @ v
            d = h + (1 - rho * s) * (d - h_old)
        x_prev, x, y, v = x, x - beta * s * d, y_new, v_new
        alg.step()
        torch.testing.assert_close(alg.y, y, rtol=0, atol=1e-13)
        torch.testing.assert_close(alg.v, v, rtol=0, atol=1e-13)
        torch.testing.assert_close(alg.x, x, rtol=0, atol=1e-13)
    assert float((d - h).norm()) > 1e-3  # the correction did matter


def test_fsla_restart_reinitialises_the_momentum() -> None:
    pb = MultiBlockQuadratic.random(1, 3, 4, seed=2).problem(noise=0.3, batch_size=2)
    a = FSLA(pb, seed=0)
    a.step()
    assert not a.fresh
    a.restart()
    assert a.fresh
    re = make_algorithm("re_fsla", pb, stage_length=2)
    for _ in range(5):
        re.step()
    # one stage boundary (after 2 steps; the next stage is 4 long): lr halved, momentum not a decayed parameter
    assert re.inner.config.momentum == 0.1 and re.inner.config.lr == pytest.approx(0.05)


@pytest.mark.parametrize(("name", "kw", "param"), [
    ("amigo", {"linsys_steps": 0}, "linsys_steps"), ("amigo", {"linsys_lr": -1.0}, "linsys_lr"),
    ("amigo", {"lower_steps": 1.0}, "lower_steps"), ("amigo", {"linsys_solver": "cg"}, "linsys_solver"),
    ("fsla", {"momentum": 1.5}, "momentum"), ("fsla", {"momentum": 0.0}, "momentum"),
    ("fsla", {"momentum_exponent": -0.5}, "momentum_exponent"), ("fsla", {"linsys_lr": 0}, "linsys_lr"),
    ("fsla", {"linsys_lr_exponent": None}, "linsys_lr_exponent"), ("fsla", {"lower_steps": 2}, "lower_steps"),
])
def test_bad_hyper_parameters_raise(name: str, kw: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        make_algorithm(name, MultiBlockQuadratic.random(1, 3, 4, seed=0).problem(), **kw)


@pytest.mark.parametrize("name", ["amigo", "fsla"])
def test_resume_is_bit_identical(bq: BenchoptQuadratic, name: str, resumed_twin) -> None:
    pb = bq.problem(8)
    kw = {"lower_steps": 2, "linsys_steps": 2} if name == "amigo" else {}
    a, b = resumed_twin(lambda seed: make_algorithm(name, pb, seed=seed, **kw), 3, 4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.v, b.v)
    assert a.oracle_counts() == b.oracle_counts()
    if name == "fsla":
        assert torch.equal(a.d, b.d) and torch.equal(a.x_prev, b.x_prev)
