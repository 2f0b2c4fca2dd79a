"""BSA and TTSA: convergence on the benchopt quadratic, iterations by hand (random truncation drawn from the
"extra" stream, decaying schedules), validation, resume."""

from __future__ import annotations

import pytest
import torch

from mbbo.algorithms.classic import BSA, TTSA
from mbbo.algorithms.pieces import random_neumann
from mbbo.algorithms.registry import make_algorithm
from mbbo.linsolve import Neumann
from mbbo.tasks.benchopt_quadratic import BenchoptQuadratic
from mbbo.tasks.quadratic import MultiBlockQuadratic

DT = torch.float64


# measured ||grad h||^2 at iteration 40 (batch 64, lr 1, lower_lr 0.3, Neumann Q = 5, eta = 0.3, the default
# decaying schedules; seeds 0/1/2), from 2.43 at x0
CONVERGENCE = {
    "bsa": ({"lower_steps": 5}, 0.25),  # 0.041, 0.065, 0.049
    "ttsa": ({}, 0.25),  # 0.068, 0.095, 0.072
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_lowers_grad_norm_on_benchopt_quadratic(bq: BenchoptQuadratic, name: str) -> None:
    kw, threshold = CONVERGENCE[name]
    alg = make_algorithm(name, bq.problem(64), seed=0, lr=1.0, lower_lr=0.3, linsys_lr=0.3,
                         linsys_steps=5, **kw)
    for _ in range(40):
        alg.step()
    assert float(bq.grad_norm_sq(alg.x)) <= threshold


def _clone(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(gen.get_state())
    return out


def _coef(quad: MultiBlockQuadratic):
    return tuple(t[0] for t in (quad.A, quad.C, quad.a, quad.F, quad.K, quad.H, quad.h, quad.f))


def test_bsa_two_iterations_by_hand() -> None:
    """Exact oracles: v = Q eta (I - eta A)^q grad_y f with q drawn from the "extra" stream; steps / sqrt(k+1)."""
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=1)
    A, C, a, F, K, H, h, f = _coef(quad)
    N, Q, alpha, eta, beta = 2, 6, 0.2, 0.15, 0.5
    alg = BSA(quad.problem(), seed=3, lr=beta, lower_lr=alpha, lower_steps=N, linsys_steps=Q, linsys_lr=eta)
    extra = _clone(alg.generators["extra"])
    x, y = alg.x.clone(), alg.y.clone()
    total_q = 0
    for k in range(2):
        for _ in range(N):
            y = y - alpha / (k + 1) ** 0.5 * (A @ y + C.T @ x + a)
        q = int(Neumann(Q, eta, random_truncation=True).draw_truncation((), extra))
        total_q += q
        for _ in range(q):  # the q HVP batches come from the same stream (exact here, but they are drawn)
            alg.problem.lower_sampler.sample(torch.zeros(1, dtype=torch.long), extra)
        v = Q * eta * torch.linalg.matrix_power(torch.eye(4, dtype=DT) - eta * A, q) @ (F @ y + K.T @ x + f)
        x = x - beta / (k + 1) ** 0.5 * (K @ y + H @ x + h - C @ v)
        alg.step()
        torch.testing.assert_close(alg.y, y, rtol=0, atol=1e-14)
        torch.testing.assert_close(alg.x, x, rtol=0, atol=1e-13)
    assert alg.oracle_counts()["hvp"] == total_q


def test_random_truncation_is_unbiased_for_the_truncated_series() -> None:
    """BSA's linear-system estimate takes exactly the values Q eta (I - eta A)^q b, q = 0..Q-1, whose uniform
    average is the truncated series eta sum_{q<Q} (I - eta A)^q b."""
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=1)
    A = quad.A[0]
    Q, eta = 4, 0.2
    alg = BSA(quad.problem(), seed=0, linsys_steps=Q, linsys_lr=eta)
    b = torch.ones(4, dtype=DT)
    values = torch.stack([Q * eta * torch.linalg.matrix_power(torch.eye(4, dtype=DT) - eta * A, q) @ b
                          for q in range(Q)])
    torch.testing.assert_close(values.mean(0), Neumann(Q, eta).truncated_series(lambda v: A @ v, b))
    hits = torch.zeros(Q)
    for _ in range(60):  # P(some q never drawn) = 4 (3/4)^60 < 1e-7
        v = random_neumann(alg, alg.x, alg.y, b, Q, eta)
        match = (v - values).norm(dim=1) < 1e-13
        assert int(match.sum()) == 1
        hits += match
    assert bool((hits > 0).all())


def test_ttsa_two_iterations_by_hand() -> None:
    """One lower step (the cross product on its batch), Q = 1 (v = eta grad_y f), steps / (k+1)^0.4, ^0.6."""
    quad = MultiBlockQuadratic.random(1, 3, 4, seed=2)
    A, C, a, F, K, H, h, f = _coef(quad)
    alpha, eta, beta = 0.3, 0.2, 0.4
    alg = TTSA(quad.problem(), lr=beta, lower_lr=alpha, linsys_steps=1, linsys_lr=eta)
    x, y = alg.x.clone(), alg.y.clone()
    for k in range(2):
        y = y - alpha / (k + 1) ** 0.4 * (A @ y + C.T @ x + a)
        v = eta * (F @ y + K.T @ x + f)
        x = x - beta / (k + 1) ** 0.6 * (K @ y + H @ x + h - C @ v)
        alg.step()
        torch.testing.assert_close(alg.y, y, rtol=0, atol=1e-14)
        torch.testing.assert_close(alg.x, x, rtol=0, atol=1e-14)
    c = alg.oracle_counts()
    assert c["grad_y_g"] == 2 and c["hvp"] == 0 and c["cross"] == 2 and c["grad_x_f"] == 2


def test_defaults_are_benchopt_schedules() -> None:
    pb = MultiBlockQuadratic.random(1, 3, 4, seed=0).problem()
    bsa, ttsa = BSA(pb).config, TTSA(pb).config
    assert (bsa.lr_exponent, bsa.lower_lr_exponent, bsa.lower_steps, bsa.linsys_steps) == (0.5, 0.5, 10, 10)
    assert (ttsa.lr_exponent, ttsa.lower_lr_exponent, ttsa.linsys_steps) == (0.6, 0.4, 10)
    assert bsa.lr == bsa.lower_lr == bsa.linsys_lr == ttsa.lr == ttsa.lower_lr == ttsa.linsys_lr == 0.1


@pytest.mark.parametrize(("name", "kw", "param"), [
    ("bsa", {"linsys_steps": 0}, "linsys_steps"), ("bsa", {"linsys_lr": 0.0}, "linsys_lr"),
    ("bsa", {"lower_steps": 0}, "lower_steps"), ("bsa", {"lr_exponent": -1}, "lr_exponent"),
    ("ttsa", {"lower_lr_exponent": "0.4"}, "lower_lr_exponent"), ("ttsa", {"lower_steps": 3}, "lower_steps"),
    ("ttsa", {"linsys_steps": True}, "linsys_steps"), ("ttsa", {"lr": float("inf")}, "lr"),
])
def test_bad_hyper_parameters_raise(name: str, kw: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        make_algorithm(name, MultiBlockQuadratic.random(1, 3, 4, seed=0).problem(), **kw)


@pytest.mark.parametrize("name", ["bsa", "ttsa"])
def test_resume_is_bit_identical(bq: BenchoptQuadratic, name: str, resumed_twin) -> None:
    pb = bq.problem(8)
    kw = {"linsys_steps": 4} | ({"lower_steps": 2} if name == "bsa" else {})
    a, b = resumed_twin(lambda seed: make_algorithm(name, pb, seed=seed, **kw), 3, 4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.oracle_counts() == b.oracle_counts()
