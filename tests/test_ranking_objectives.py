from __future__ import annotations

import pytest
import torch

from mbbo.ranking.objectives import (
    BSVRBNDCGObjective,
    KSONGObjective,
    SONGObjective,
    inner_g,
    lambda_grad,
    lambda_hessian,
    list_weights,
    ndcg_f,
    ndcg_f_grad,
    psi,
    psi_grad,
    solve_lambda,
)
from mbbo.ranking.sampler import ListBatch

DT = torch.float64
B, P, M, N = 3, 4, 6, 40
TAU1, TAU2, K = 0.1, 0.01, 3


def _batch(users=(0, 1, 2), pair_ids=None, mask=None, seed=0) -> ListBatch:
    g = torch.Generator().manual_seed(seed)
    b = len(users)
    ids = torch.arange(b * P).reshape(b, P) if pair_ids is None else torch.tensor(pair_ids)
    mask = torch.ones(b, P, dtype=torch.bool) if mask is None else torch.tensor(mask)
    ratings = torch.randint(1, 6, (b, P), generator=g).to(DT)
    return ListBatch(torch.tensor(users), torch.zeros(b, P + M, dtype=torch.int64), ids, ratings, mask,
                     torch.tensor([5, 7, 9, 6, 8][:b]))


def _scores(seed=0, b=B) -> torch.Tensor:
    return torch.randn(b, P + M, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _z(n=B) -> torch.Tensor:
    return torch.linspace(1.5, 3.0, n, dtype=DT)


def _exact_objective(h, batch, z, weights, *, topk=None, margin=1.0, scale=2.0, alpha=2.0, eps=0.0):
    """F = mean_q n_q^+/Z_q mean_i [psi(h_i - lambda*_q(h))] f(g_{q,i}(h)), lambda* solved exactly."""
    g = inner_g(h, P, weights, margin)
    val = ndcg_f(g, batch.pos_gains.to(DT), N)
    if topk is not None:
        lam = solve_lambda(h, weights, topk, N, TAU1, TAU2, eps, iterations=70)
        val = psi(h[:, :P] - lam[:, None], scale, alpha) * val
    mask = batch.pos_mask.to(DT)
    return (batch.num_pos_items.to(DT) * (val * mask).sum(1) / mask.sum(1) / z).mean()


def _finite_differences(fn, x, eps=1e-6):
    out = torch.zeros_like(x)
    for idx in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[idx] = eps
        e = e.view_as(x)
        out.view(-1)[idx] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return out


# ------------------------------------------------------------------------------------------------------------
# pure functions


def test_f_gradient_and_psi_derivative_match_autograd():
    u = torch.tensor([0.01, 0.2, 1.5], dtype=DT, requires_grad=True)
    gains = torch.tensor([1.0, 7.0, 31.0], dtype=DT)
    (auto,) = torch.autograd.grad(ndcg_f(u, gains, N).sum(), u)
    torch.testing.assert_close(ndcg_f_grad(u.detach(), gains, N), auto)
    t = torch.linspace(-3, 3, 13, dtype=DT, requires_grad=True)
    (auto,) = torch.autograd.grad(psi(t, 2.0, 3.0).sum(), t)
    torch.testing.assert_close(psi_grad(t.detach(), 2.0, 3.0), auto)  # includes the factor alpha


def test_lambda_derivatives_match_autograd_of_the_lower_objective():
    h = _scores(1)
    w = list_weights(_batch(), N, "importance").to(DT)
    lam = torch.tensor([0.3, -0.2, 1.0], dtype=DT, requires_grad=True)

    def lower(lam):
        soft = TAU1 * torch.nn.functional.softplus((h - lam[:, None]) / TAU1)
        return ((K + 0.3) / N * lam + TAU2 / 2 * lam**2 + (w * soft).sum(1)).sum()

    (grad,) = torch.autograd.grad(lower(lam), lam, create_graph=True)
    (hess,) = torch.autograd.grad(grad.sum(), lam)
    torch.testing.assert_close(lambda_grad(h, lam.detach(), w, K, N, TAU1, TAU2, 0.3), grad.detach())
    torch.testing.assert_close(lambda_hessian(h, lam.detach(), w, TAU1, TAU2), hess)


def test_list_weights():
    batch = _batch(mask=[[True, True, True, False], [True] * 4, [True, False, True, True]])
    for mode in ("uniform", "importance"):
        w = list_weights(batch, N, mode)
        torch.testing.assert_close(w.sum(1), torch.ones(B, dtype=DT))
        assert bool((w[:, :P][~batch.pos_mask] == 0).all())
    w = list_weights(batch, N, "importance")
    assert w[1, 0].item() == pytest.approx(7 / (N * 4)) and w[1, -1].item() == pytest.approx((N - 7) / (N * M))
    with pytest.raises(ValueError, match="list_weighting"):
        list_weights(batch, N, "bogus")  # type: ignore[arg-type]


def test_lambda_tends_to_the_k_plus_first_largest_score():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(4, 200, generator=gen, dtype=DT)  # the whole catalogue: weights 1/N
    w = torch.full_like(h, 1 / 200)
    top = torch.sort(h, dim=1, descending=True).values
    for k in (1, 5, 20):
        errs = []
        for tau in (1e-2, 1e-3, 1e-5):
            lam = solve_lambda(h, w, k, 200, tau, tau * 1e-2, eps=0.5)
            errs.append((lam - top[:, k]).abs().max().item())
        assert errs[-1] < 1e-4 and errs[-1] <= errs[0]
        # the reference's eps = 0: a point of [h_(K+1), h_(K)], the minimisers of the unsmoothed problem
        lam = solve_lambda(h, w, k, 200, 1e-5, 1e-7, eps=0.0)
        assert bool(((lam >= top[:, k] - 1e-4) & (lam <= top[:, k - 1] + 1e-4)).all())


# ------------------------------------------------------------------------------------------------------------
# gradients of the stateful objectives with exact states


@pytest.mark.parametrize("weighting", ["uniform", "importance"])
def test_song_gradient_is_the_gradient_of_the_ndcg_surrogate(weighting):
    batch = _batch(mask=[[True, True, False, True], [True] * 4, [True] * 4])
    z = _z()
    obj = SONGObjective(B * P, B, N, z, gamma0=1.0, list_weighting=weighting, dtype=DT)  # u = g exactly
    h = _scores(2).requires_grad_()
    (grad,) = torch.autograd.grad(obj(h, batch), h)
    w = list_weights(batch, N, weighting).to(DT)
    hx = h.detach().requires_grad_()
    (want,) = torch.autograd.grad(_exact_objective(hx, batch, z, w), hx)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.4])
def test_ksong_theo_gradient_matches_finite_differences_of_the_bilevel_objective(eps):
    batch = _batch()
    z = _z()
    obj = KSONGObjective(B * P, B, N, z, topk=K, gamma0=1.0, gamma1=1.0, eta0=0.0, tau1=TAU1, tau2=TAU2,
                         psi_scale=2.0, psi_alpha=3.0, topk_eps=eps, dtype=DT)
    h0 = _scores(4)
    h = h0.clone().requires_grad_()
    # first visit: lambda = exact minimiser, s = exact Hessian there (gamma1 = 1), u = g (gamma0 = 1)
    (grad,) = torch.autograd.grad(obj(h, batch), h)
    w = list_weights(batch, N).to(DT)
    want = _finite_differences(lambda x: _exact_objective(x, batch, z, w, topk=K, alpha=3.0, eps=eps), h0)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
    assert obj.tables["lam"].abs().sum() > 0


def test_ksong_prac_keeps_only_the_psi_weighted_term():
    batch = _batch()
    z = _z()
    obj = KSONGObjective(B * P, B, N, z, topk=K, gamma0=1.0, gamma1=1.0, eta0=0.0, tau1=TAU1, tau2=TAU2,
                         version="prac", dtype=DT)
    h = _scores(5).requires_grad_()
    (grad,) = torch.autograd.grad(obj(h, batch), h)
    w = list_weights(batch, N).to(DT)
    hx = h.detach().requires_grad_()
    lam = solve_lambda(hx, w, K, N, TAU1, TAU2)
    g = inner_g(hx, P, w)
    weight = psi(hx[:, :P] - lam[:, None]).detach() * ndcg_f(g, batch.pos_gains.to(DT), N)
    (want,) = torch.autograd.grad((batch.num_pos_items.to(DT) * weight.mean(1) / z).mean(), hx)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("topk", [K, -1])
def test_bsvrb_gradients_at_both_points_with_exact_states(topk):
    batch = _batch()
    z = _z()
    w = list_weights(batch, N).to(DT)
    k = None if topk == -1 else topk
    kw = dict(topk=topk, eta1=1.0, gamma_v=1.0, beta_v=0.0, gamma_z=1.0, beta_z=0.0, gamma_s=1.0, beta_s=0.0,
              eta0=0.0, tau1=TAU1, tau2=TAU2, dtype=DT)
    h_prev0, h0 = _scores(6), _scores(7)
    want = _finite_differences(lambda x: _exact_objective(x, batch, z, w, topk=k), h0)
    want_prev = _finite_differences(lambda x: _exact_objective(x, batch, z, w, topk=k), h_prev0)
    for exact_now in (True, False):
        obj = BSVRBNDCGObjective(B * P, B, N, z, **kw)  # (alpha, gamma) = (1, 0): u <- g exactly
        obj(h_prev0.clone(), batch)  # first visit at the previous point: lambda*, s, u exact there
        if exact_now and topk != -1:  # lambda is shared by both points: make it exact at the current one
            obj.tables["lam"][batch.users] = solve_lambda(h0, w, topk, N, TAU1, TAU2)
        h, h_prev = h0.clone().requires_grad_(), h_prev0.clone().requires_grad_()
        loss, loss_prev = obj(h, batch, h_prev)
        assert loss_prev is not None
        (grad,) = torch.autograd.grad(loss, h)
        (grad_prev,) = torch.autograd.grad(loss_prev, h_prev)
        if exact_now or topk == -1:
            torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
        if not exact_now:  # states from before the step (u, lambda, s all exact at h_prev)
            torch.testing.assert_close(grad_prev, want_prev, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------------------
# estimator updates and tables


def test_tables_are_sized_by_pairs_and_users_and_touched_only_at_sampled_rows():
    n_pairs, n_users, n_items = 1000, 50, 400
    z = torch.ones(n_users, dtype=DT)
    batch = _batch(users=(3, 17, 40), pair_ids=[[5, 6, 7, 8], [100, 101, 102, 103], [900, 901, 902, 903]])
    for obj in (
        SONGObjective(n_pairs, n_users, n_items, z, dtype=DT),
        KSONGObjective(n_pairs, n_users, n_items, z, dtype=DT),
        BSVRBNDCGObjective(n_pairs, n_users, n_items, z, dtype=DT),
    ):
        for name, size in obj.table_sizes().items():
            assert size in (n_pairs, n_users), (name, size)
            assert size != n_users * n_items
        before = {k: v.clone() for k, v in obj.tables.items()}
        obj(_scores(8), batch)
        for name, table in obj.tables.items():
            changed = torch.nonzero(table != before[name]).flatten()
            allowed = batch.pos_pair_ids.flatten() if table.numel() == n_pairs else batch.users
            assert set(changed.tolist()) <= set(allowed.tolist()), name
    full = BSVRBNDCGObjective(n_pairs, n_users, n_items, z, topk=-1, dtype=DT)
    assert set(full.table_sizes()) == {"u", "v", "pair_seen", "lam", "z", "s", "user_seen"}
    assert full.table_sizes()["lam"] == 0


def test_song_moving_average_and_zero_init():
    batch = _batch()
    w = list_weights(batch, N).to(DT)
    s1, s2 = _scores(9), _scores(10)
    g1, g2 = inner_g(s1, P, w), inner_g(s2, P, w)
    first = SONGObjective(B * P, B, N, _z(), gamma0=0.3, dtype=DT)
    first(s1, batch)
    first(s2, batch)
    torch.testing.assert_close(first.tables["u"], (0.7 * g1 + 0.3 * g2).flatten())
    zero = SONGObjective(B * P, B, N, _z(), gamma0=0.3, init="zero", dtype=DT)
    zero(s1, batch)
    zero(s2, batch)
    torch.testing.assert_close(zero.tables["u"], (0.7 * 0.3 * g1 + 0.3 * g2).flatten())


def test_ksong_lambda_really_moves_and_follows_its_tracker():
    batch = _batch()
    obj = KSONGObjective(B * P, B, N, _z(), topk=K, gamma1=0.5, eta0=0.1, tau1=TAU1, tau2=TAU2, init="zero",
                         dtype=DT)
    w = list_weights(batch, N).to(DT)
    s1, s2 = _scores(11), _scores(12)
    obj(s1, batch)
    v1 = 0.5 * lambda_grad(s1, torch.zeros(B, dtype=DT), w, K, N, TAU1, TAU2)
    lam1 = -0.1 * v1
    torch.testing.assert_close(obj.tables["lam"], lam1)
    obj(s2, batch)
    v2 = 0.5 * v1 + 0.5 * lambda_grad(s2, lam1, w, K, N, TAU1, TAU2)
    torch.testing.assert_close(obj.tables["v"], v2)
    torch.testing.assert_close(obj.tables["lam"], lam1 - 0.1 * v2)
    h1 = 0.5 * lambda_hessian(s1, torch.zeros(B, dtype=DT), w, TAU1, TAU2)
    h2 = lambda_hessian(s2, lam1, w, TAU1, TAU2)
    torch.testing.assert_close(obj.tables["s"], 0.5 * h1.clamp_min(TAU2) + 0.5 * h2)


def test_psi_grad_reference_form_omits_alpha():
    """The reference code's psi' is the exact one divided by alpha (a defect kept for comparison)."""
    t = torch.tensor([0.0, 0.5], dtype=DT)
    s = torch.sigmoid(3.0 * t)
    torch.testing.assert_close(psi_grad(t, 2.0, 3.0), 2.0 * 3.0 * s * (1 - s))
    torch.testing.assert_close(psi_grad(t, 2.0, 3.0, "reference"), 2.0 * s * (1 - s))
    assert psi_grad(t, 2.0, 3.0, "reference")[0].item() == pytest.approx(0.5)  # 2 * 1/2 * 1/2
    with pytest.raises(ValueError, match=r"psi_derivative must be one of .*, got 'x'"):
        psi_grad(t, form="x")  # type: ignore[arg-type]


def test_ksong_plain_lambda_step_uses_the_current_gradient():
    batch = _batch()
    obj = KSONGObjective(B * P, B, N, _z(), topk=K, gamma1=0.5, eta0=0.1, tau1=TAU1, tau2=TAU2, init="zero",
                         lambda_step="plain", dtype=DT)
    w = list_weights(batch, N).to(DT)
    s1, s2 = _scores(11), _scores(12)
    obj(s1, batch)
    lam1 = -0.1 * lambda_grad(s1, torch.zeros(B, dtype=DT), w, K, N, TAU1, TAU2)  # no moving average
    torch.testing.assert_close(obj.tables["lam"], lam1)
    obj(s2, batch)
    torch.testing.assert_close(obj.tables["lam"], lam1 - 0.1 * lambda_grad(s2, lam1, w, K, N, TAU1, TAU2))
    assert torch.equal(obj.tables["v"], torch.zeros(B, dtype=DT))  # unused
    h1 = 0.5 * lambda_hessian(s1, torch.zeros(B, dtype=DT), w, TAU1, TAU2)  # s keeps its moving average
    h2 = lambda_hessian(s2, lam1, w, TAU1, TAU2)
    torch.testing.assert_close(obj.tables["s"], 0.5 * h1.clamp_min(TAU2) + 0.5 * h2)


def test_ksong_reference_psi_derivative_scales_only_the_second_term():
    """theo gradient = psi-weighted SONG term + psi' term; the reference form divides the second by alpha."""
    batch = _batch()
    kw = dict(topk=K, gamma0=1.0, gamma1=1.0, eta0=0.0, tau1=TAU1, tau2=TAU2, psi_alpha=3.0, dtype=DT)
    grads = {}
    for name, extra in (("exact", {}), ("reference", {"psi_derivative": "reference"}),
                        ("prac", {"version": "prac"})):
        h = _scores(5).requires_grad_()
        (grads[name],) = torch.autograd.grad(KSONGObjective(B * P, B, N, _z(), **kw, **extra)(h, batch), h)
    second = grads["exact"] - grads["prac"]
    torch.testing.assert_close(grads["reference"], grads["prac"] + second / 3.0)
    assert second.abs().max() > 1e-3


def test_bsvrb_msvr_updates_follow_the_definition():
    batch = _batch()
    w = list_weights(batch, N).to(DT)
    a, c, eta1 = 0.9, 0.3, 0.2
    obj = BSVRBNDCGObjective(B * P, B, N, _z(), topk=K, eta1=eta1, gamma_v=a, beta_v=c, gamma_z=a, beta_z=c,
                             gamma_s=a, beta_s=c, eta0=0.05, tau1=TAU1, tau2=TAU2, init="zero", dtype=DT)
    s0, s1, s1_prev = _scores(13), _scores(14), _scores(15)
    obj(s0, batch)
    u0, v0 = obj.tables["u"].clone(), obj.tables["v"].clone()
    lam0, z0, ss0 = obj.tables["lam"].clone(), obj.tables["z"].clone(), obj.tables["s"].clone()
    obj(s1, batch, s1_prev)
    g_new, g_old = inner_g(s1, P, w).flatten(), inner_g(s1_prev, P, w).flatten()
    v1 = (1 - a) * v0 + (a + c) * (u0 - g_new) - c * (u0 - g_old)
    torch.testing.assert_close(obj.tables["v"], v1)
    torch.testing.assert_close(obj.tables["u"], (u0 - eta1 * v1).clamp_min(1 / N))
    dz_new = lambda_grad(s1, lam0, w, K, N, TAU1, TAU2)
    dz_old = lambda_grad(s1_prev, lam0, w, K, N, TAU1, TAU2)
    z1 = (1 - a) * z0 + (a + c) * dz_new - c * dz_old
    torch.testing.assert_close(obj.tables["z"], z1)
    torch.testing.assert_close(obj.tables["lam"], lam0 - 0.05 * z1)
    hs = (1 - a) * ss0 + (a + c) * lambda_hessian(s1, lam0, w, TAU1, TAU2) - c * lambda_hessian(s1_prev, lam0, w,
                                                                                                  TAU1, TAU2)
    torch.testing.assert_close(obj.tables["s"], hs.clamp_min(TAU2))


def test_duplicate_pairs_are_averaged_deterministically():
    batch = _batch(users=(0, 1), pair_ids=[[0, 1, 1, 2], [3, 4, 5, 6]])
    obj = SONGObjective(7, 2, N, _z(2), gamma0=0.5, dtype=DT)
    s = _scores(16, b=2)
    obj(s, batch)
    g = inner_g(s, P, list_weights(batch, N).to(DT))
    assert obj.tables["u"][1].item() == pytest.approx(((g[0, 1] + g[0, 2]) / 2).item())


def test_state_dict_roundtrip_and_validation():
    obj = KSONGObjective(B * P, B, N, _z(), dtype=DT)
    obj(_scores(17), _batch())
    other = KSONGObjective(B * P, B, N, _z(), dtype=DT)
    other.load_state_dict(obj.state_dict())
    for k in obj.tables:
        assert torch.equal(obj.tables[k], other.tables[k])
    with pytest.raises(ValueError, match="tables"):
        SONGObjective(B * P, B, N, _z(), dtype=DT).load_state_dict(obj.state_dict())
    bad = [
        (SONGObjective, {"gamma0": 0.0}, "gamma0=0.0"),
        (SONGObjective, {"margin": -1.0}, "margin"),
        (SONGObjective, {"init": "ones"}, "init"),
        (KSONGObjective, {"topk": 0}, "topk=0"),
        (KSONGObjective, {"topk": N}, "topk"),
        (KSONGObjective, {"tau1": 0.0}, "tau1"),
        (KSONGObjective, {"version": "x"}, "version"),
        (KSONGObjective, {"topk_eps": 1.0}, "topk_eps"),
        (KSONGObjective, {"lambda_step": "sgd"}, "lambda_step='sgd'"),
        (KSONGObjective, {"psi_derivative": "libauc"}, "psi_derivative='libauc'"),
        (BSVRBNDCGObjective, {"gamma_v": 1.5}, "gamma_v=1.5"),
        (BSVRBNDCGObjective, {"beta_s": -0.1}, "beta_s"),
        (BSVRBNDCGObjective, {"eta1": 0.0}, "eta1"),
    ]
    for cls, kw, pattern in bad:
        name, _, value = pattern.partition("=")  # "name=value": the message names both (mbbo.validation's style)
        with pytest.raises(ValueError, match=name + (f" must be .*, got {value}" if value else "")):
            cls(B * P, B, N, _z(), **kw)
    with pytest.raises(ValueError, match="ideal_dcg"):
        SONGObjective(B * P, B, N, torch.ones(B + 1))
