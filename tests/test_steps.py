from __future__ import annotations

import math

import pytest
import torch

from mbbo.steps import (
    SGD,
    Adam,
    AdamW,
    Clipped,
    Constant,
    InversePower,
    NesterovAveraged,
    Normalized,
    StageDecay,
    apply_updates,
    as_schedule,
    global_norm,
    project_ball,
    project_box,
    project_nonnegative,
    project_nonpositive,
    project_simplex,
)

DT = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


# ---------------------------------------------------------------------------------------------------------- #
# schedules


def test_schedules():
    assert Constant(0.3)(0) == 0.3 and Constant(0.3)(10**6) == 0.3
    s = InversePower(c=2.0, a=0.5, k0=1.0)
    assert s(0) == 2.0 and s(3) == pytest.approx(1.0)
    assert InversePower(c=1.0, a=-0.5, k0=1.0)(3) == pytest.approx(2.0)  # growing penalty c_k
    sd = StageDecay(c=1.0, total_steps=10, fractions=(0.5, 0.8), factor=0.1)
    assert sd.boundaries == (5, 8)
    assert [sd(k) for k in (0, 4, 5, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert as_schedule(0.5)(7) == 0.5
    assert as_schedule(s) is s


# ---------------------------------------------------------------------------------------------------------- #
# SGD, normalised, clipped


def test_sgd_with_schedule_and_structure():
    rule = SGD(lr=InversePower(c=1.0, a=1.0, k0=1.0))
    g = [t(1.0, 2.0), t(4.0)]
    state = rule.init(g)
    u, state = rule.update(g, state)
    assert isinstance(u, list)
    torch.testing.assert_close(u[0], t(-1.0, -2.0))
    u, state = rule.update(g, state)  # k = 1 -> lr = 1/2
    torch.testing.assert_close(u[1], t(-2.0))
    assert state.count == 2
    single, _ = SGD(lr=0.1).update(t(1.0), SGD().init(t(0.0)))
    assert isinstance(single, torch.Tensor)
    torch.testing.assert_close(apply_updates(t(1.0), single), t(0.9))


def test_normalized_global_and_per_tensor():
    g = [t(3.0, 0.0), t(4.0)]  # global norm 5; per-tensor norms 3 and 4
    u, _ = Normalized(lr=0.5, scope="global").update(g, Normalized().init(g))
    torch.testing.assert_close(u[0], t(-0.3, 0.0))
    torch.testing.assert_close(u[1], t(-0.4))
    u, _ = Normalized(lr=0.5, scope="per_tensor").update(g, Normalized().init(g))
    torch.testing.assert_close(u[0], t(-0.5, 0.0))
    torch.testing.assert_close(u[1], t(-0.5))
    z, _ = Normalized(lr=1.0).update([torch.zeros(2, dtype=DT)], Normalized().init([t(0.0)]))
    assert torch.equal(z[0], torch.zeros(2, dtype=DT))  # no NaN on a zero direction
    # eps caps the amplification of tiny directions
    u, _ = Normalized(lr=1.0, eps=1.0).update(t(0.1), Normalized().init(t(0.0)))
    torch.testing.assert_close(u, t(-0.1))


def test_clipped_rule():
    rule = Clipped(lr=0.1, gamma=1.0)
    small = t(3.0, 4.0)  # norm 5: lr * 5 = 0.5 <= gamma -> plain step
    u, _ = rule.update(small, rule.init(small))
    torch.testing.assert_close(u, t(-0.3, -0.4))
    big = t(30.0, 40.0)  # norm 50: step length capped at gamma = 1
    u, _ = rule.update(big, rule.init(big))
    torch.testing.assert_close(u, t(-0.6, -0.8))
    assert global_norm(u) == pytest.approx(1.0)
    u, _ = Clipped(lr=1.0, gamma=1.0, scope="per_tensor").update([big, small], rule.init([big, small]))
    torch.testing.assert_close(u[0], t(-0.6, -0.8))
    torch.testing.assert_close(u[1], t(-0.6, -0.8))
    z, _ = rule.update(torch.zeros(2, dtype=DT), rule.init(t(0.0)))
    assert torch.equal(z, torch.zeros(2, dtype=DT))


# ---------------------------------------------------------------------------------------------------------- #
# Adam / AdamW against torch.optim


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: Adam(lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
        (
            lambda: Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        ),
        (lambda: AdamW(lr=0.03, weight_decay=0.2), lambda p: torch.optim.AdamW(p, lr=0.03, weight_decay=0.2)),
        (lambda: AdamW(), lambda p: torch.optim.AdamW(p)),
    ],
)
def test_adam_matches_torch_optim(ours, theirs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=gen, dtype=DT), torch.randn(4, generator=gen, dtype=DT)]
    torch_params = [p.clone().requires_grad_(True) for p in params]
    opt = theirs(torch_params)
    rule = ours()
    state = rule.init(params)
    for _ in range(7):
        grads = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
        for tp, g in zip(torch_params, grads, strict=True):
            tp.grad = g.clone()
        opt.step()
        updates, state = rule.update(grads, state, params)
        params = apply_updates(params, updates)
    for p, tp in zip(params, torch_params, strict=True):
        torch.testing.assert_close(p, tp.detach(), rtol=0, atol=1e-13)
    assert state.count == 7


def test_adam_first_step_by_hand_and_needs_params_for_weight_decay():
    rule = Adam(lr=0.1)
    u, state = rule.update(t(2.0, -3.0), rule.init(t(0.0, 0.0)))
    assert state.count == 1
    torch.testing.assert_close(state.exp_avg[0], 0.1 * t(2.0, -3.0))  # (1 - beta1) g
    torch.testing.assert_close(state.exp_avg_sq[0], 0.001 * t(4.0, 9.0))  # (1 - beta2) g^2
    # first step: m_hat = g, s_hat = g^2 -> u = -lr * g / (|g| + eps)
    torch.testing.assert_close(u, -0.1 * t(2.0, -3.0) / (t(2.0, 3.0) + 1e-8))
    with pytest.raises(ValueError, match="needs params"):
        Adam(weight_decay=0.1).update(t(1.0), Adam().init(t(1.0)))


# ---------------------------------------------------------------------------------------------------------- #
# Nesterov with averaging (AccBO lower level)


def test_nesterov_averaged_by_hand():
    rule = NesterovAveraged(lr=0.1, momentum=0.5, averaging=0.25)
    y0 = t(1.0)
    s = rule.init(y0)
    torch.testing.assert_close(rule.extrapolate(y0, s), y0)  # y_{-1} = y_0
    y1, s = rule.update(t(2.0), s, y0)  # y1 = 1 - 0.1 * 2 = 0.8
    torch.testing.assert_close(y1, t(0.8))
    torch.testing.assert_close(s.average, t(0.75 * 1.0 + 0.25 * 0.8))
    y_tilde = rule.extrapolate(y1, s)  # 0.8 + 0.5 * (0.8 - 1) = 0.7
    torch.testing.assert_close(y_tilde, t(0.7))
    y2, s = rule.update(t(1.0), s, y1)  # 0.7 - 0.1 = 0.6
    torch.testing.assert_close(y2, t(0.6))
    torch.testing.assert_close(s.average, t(0.75 * 0.95 + 0.25 * 0.6))
    assert s.count == 2


def test_nesterov_converges_on_quadratic():
    A = torch.diag(t(1.0, 10.0))
    target = t(1.0, -2.0)
    rule = NesterovAveraged(lr=0.09, momentum=0.5, averaging=0.5)
    y = torch.zeros(2, dtype=DT)
    s = rule.init(y)
    for _ in range(300):
        yt = rule.extrapolate(y, s)
        y, s = rule.update(A @ (yt - target), s, y)
    torch.testing.assert_close(y, target, atol=1e-8, rtol=0)
    torch.testing.assert_close(s.average, target, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------- #
# projections


def test_project_ball_row_wise():
    v = torch.stack([t(3.0, 4.0), t(0.3, 0.4), t(0.0, 0.0)])
    out = project_ball(v, 1.0)
    torch.testing.assert_close(out, torch.stack([t(0.6, 0.8), t(0.3, 0.4), t(0.0, 0.0)]))
    assert project_ball(v.float(), 1.0).dtype == torch.float32


def test_box_and_sign_projections():
    v = t(-2.0, 0.5, 3.0)
    torch.testing.assert_close(project_box(v, -1.0, 1.0), t(-1.0, 0.5, 1.0))
    torch.testing.assert_close(project_box(v, lower=0.0), t(0.0, 0.5, 3.0))
    torch.testing.assert_close(project_box(v, t(-3.0, 0.0, 0.0), t(0.0, 0.0, 2.0)), t(-2.0, 0.0, 2.0))
    torch.testing.assert_close(project_nonpositive(v), t(-2.0, 0.0, 0.0))
    torch.testing.assert_close(project_nonnegative(v), t(0.0, 0.5, 3.0))
    with pytest.raises(ValueError, match="lower must be <= upper"):
        project_box(v, 1.0, 0.0)


def _simplex_by_bisection(v: torch.Tensor, total: float) -> torch.Tensor:
    lo, hi = v.min() - total, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if torch.clamp(v - mid, min=0).sum() > total:
            lo = mid
        else:
            hi = mid
    return torch.clamp(v - (lo + hi) / 2, min=0)


def test_project_simplex():
    torch.testing.assert_close(project_simplex(t(0.5, 0.5)), t(0.5, 0.5))
    torch.testing.assert_close(project_simplex(t(2.0, 0.0)), t(1.0, 0.0))
    torch.testing.assert_close(project_simplex(t(1.0, 1.0, 1.0), total=3.0), t(1.0, 1.0, 1.0))
    gen = torch.Generator().manual_seed(0)
    v = 3 * torch.randn(5, 7, generator=gen, dtype=DT)
    w = project_simplex(v, total=2.0)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.0, dtype=DT))
    for r in range(5):
        torch.testing.assert_close(w[r], _simplex_by_bisection(v[r], 2.0), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------- #
# validation


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SGD(lr=-0.1), r"^lr must be a finite number in \[0.0, inf\), got -0.1$"),
        (lambda: Normalized(scope="layer"), r"^scope must be one of 'global', 'per_tensor', got 'layer'$"),
        (lambda: Normalized(eps=-1.0), r"^eps must be"),
        (lambda: Clipped(gamma=0.0), r"^gamma must be a finite number in \(0.0, inf\), got 0.0$"),
        (lambda: Adam(betas=(0.9, 1.0)), r"^betas\[1\] must be a finite number in \[0.0, 1.0\), got 1.0$"),
        (lambda: Adam(betas=(0.9,)), r"^betas must be a pair"),
        (lambda: Adam(weight_decay=-1.0), r"^weight_decay must be"),
        (lambda: AdamW(eps=float("inf")), r"^eps must be a finite number"),
        (lambda: NesterovAveraged(averaging=0.0), r"^averaging must be a finite number in \(0.0, 1.0\]"),
        (lambda: NesterovAveraged(momentum=1.5), r"^momentum must be"),
        (lambda: InversePower(c=1.0, k0=0.0), r"^k0 must be a finite number in \(0.0, inf\), got 0.0$"),
        (lambda: StageDecay(c=1.0, total_steps=0), r"^total_steps must be an integer in \[1, inf\), got 0$"),
        (
            lambda: StageDecay(c=1.0, total_steps=5, fractions=(0.8, 0.5)),
            r"^fractions must be non-decreasing",
        ),
        (lambda: StageDecay(c=1.0, total_steps=5, fractions=(1.5,)), r"^fractions must be a finite number"),
        (lambda: Constant(-1.0), r"^value must be"),
        (lambda: project_ball(t(1.0), -1.0), r"^radius must be"),
        (lambda: project_simplex(t(1.0), total=0.0), r"^total must be"),
    ],
)
def test_validation(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_mismatched_structures_raise():
    with pytest.raises(ValueError, match="params has 2 tensors but updates has 1"):
        apply_updates([t(1.0), t(2.0)], [t(1.0)])
    rule = Adam()
    with pytest.raises(ValueError, match="state was built for 1"):
        rule.update([t(1.0), t(2.0)], rule.init([t(0.0)]))
    assert global_norm([t(3.0), t(4.0)]).item() == pytest.approx(5.0)
    assert math.isclose(global_norm(t(3.0, 4.0)).item(), 5.0)


def test_scheduled_is_benchopts_inverse_power_and_constant_at_zero_exponent():
    from mbbo.steps import scheduled

    assert scheduled(0.1, 0.0, 7) == 0.1
    assert scheduled(0.1, 0.5, 3) == pytest.approx(0.1 / 2.0)  # c / (t + 1)^a
    assert scheduled(2.0, 1.0, 0) == 2.0
