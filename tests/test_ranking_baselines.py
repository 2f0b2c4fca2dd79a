from __future__ import annotations

import itertools
import math

import pytest
import torch

from mbbo.ranking.baselines import (
    BASELINE_LOSSES,
    BASELINE_PARAMS,
    ApproxNDCGParams,
    LambdaRankParams,
    ListMLEParams,
    ListNetParams,
    NeuralNDCGParams,
    RankNetParams,
    approxndcg_loss,
    lambdarank_loss,
    lambdarank_weights,
    list_targets,
    listmle_loss,
    listnet_loss,
    make_baseline_loss,
    neural_sort,
    neuralndcg_loss,
    ranknet_loss,
    sinkhorn_scaling,
)
from mbbo.ranking.metrics import ndcg_at_ks
from mbbo.ranking.sampler import ListBatch

F64 = torch.float64
NAMES = ["ranknet", "listnet", "listmle", "lambdarank", "approxndcg", "neuralndcg"]
# Variants covering every option; NeuralNDCG with tol=0 runs a fixed number of Sinkhorn steps (so finite
# differences never change the iteration count).
VARIANTS = [
    ("ranknet", {}),
    ("ranknet", {"pairs": "graded", "sigma": 0.7}),
    ("listnet", {}),
    ("listnet", {"label": "gain", "eps": 1e-10}),
    ("listmle", {}),
    ("listmle", {"eps": 1e-10}),
    ("lambdarank", {}),
    ("lambdarank", {"k": 3, "sigma": 2.0}),
    ("approxndcg", {}),
    ("approxndcg", {"alpha": 3.0}),
    ("neuralndcg", {"sinkhorn_tol": 0.0}),
    ("neuralndcg", {"tau": 0.3, "k": 2, "sinkhorn_tol": 0.0}),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy(seed: int = 0, u: int = 3, p: int = 3, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(u, p + m)`` (well separated, distinct) and gains of ``p`` positives (ratings 0.5..5) then ``m``
    negatives."""
    g = _gen(seed)
    perm = torch.stack([torch.randperm(p + m, generator=g) for _ in range(u)]).to(F64)
    scores = 0.4 * perm + 0.05 * torch.rand(u, p + m, generator=g, dtype=F64)
    ratings = torch.randint(1, 11, (u, p), generator=g).to(F64) / 2
    rel = torch.cat([torch.exp2(ratings) - 1, torch.zeros(u, m, dtype=F64)], dim=1)
    return scores, rel


def _mask(u: int, n: int) -> torch.Tensor:
    """Invalid entries: a padded positive slot in the middle of row 0, the last two entries of row 1."""
    mask = torch.ones(u, n, dtype=torch.bool)
    mask[0, 1] = False
    mask[1, -2:] = False
    return mask


# ------------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(("name", "kw"), VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(name, kw, masked):
    scores, rel = _toy(1)
    mask = _mask(*scores.shape) if masked else None
    fn = BASELINE_LOSSES[name]
    x = scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: fn(s, rel, mask, **kw), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_listmle_random_ties():
    scores, _ = _toy(2)
    rel = torch.tensor(
        [[3.0, 3.0, 1.0, 0, 0, 0, 0], [7.0, 1.0, 1.0, 0, 0, 0, 0], [1.0, 1.0, 1.0, 0, 0, 0, 0]], dtype=F64
    )
    x = scores.clone().requires_grad_(True)

    def f(s):  # a fresh generator per call, so every evaluation uses the same tie order
        return listmle_loss(s, rel, ties="random", generator=_gen(5))

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Values against slow, obviously-correct references


def _ndcg(scores: list[float], gains: list[float], k: int | None = None) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    k = len(scores) if k is None else k
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order[:k]))
    ideal = sorted(gains, reverse=True)[:k]
    return dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _slow(name: str, s: list[float], g: list[float]) -> float:
    """Per-user loss by loops over the definitions (all entries valid, distinct gains among positives)."""
    n = len(s)
    if name == "ranknet":
        pos = [i for i in range(n) if g[i] > 0]
        return sum(-_logsig(s[i] - s[j]) for i in pos for j in range(n) if g[j] == 0) / len(pos)
    if name == "listnet":
        zr = sum(math.exp(math.log2(1 + x)) for x in g)
        zs = sum(math.exp(x) for x in s)
        return -sum(math.exp(math.log2(1 + g[i])) / zr * math.log(math.exp(s[i]) / zs) for i in range(n))
    if name == "listmle":
        order = sorted(range(n), key=lambda i: -g[i])  # stable: ties in list order
        return -sum(math.log(math.exp(s[order[k]]) / sum(math.exp(s[j]) for j in order[k:])) for k in range(n))
    if name == "lambdarank":
        return sum(
            -_ndcg_swap_delta(s, g, i, j) * _logsig(s[i] - s[j]) / math.log(2)
            for i in range(n)
            for j in range(n)
            if g[i] > g[j]
        )
    if name == "approxndcg":
        z = sum(x / math.log2(r + 2) for r, x in enumerate(sorted(g, reverse=True)))
        ranks = [1 + sum(1 / (1 + math.exp(-(s[j] - s[i]))) for j in range(n) if j != i) for i in range(n)]
        return -sum(g[i] / math.log2(1 + ranks[i]) for i in range(n)) / z
    raise KeyError(name)


def _ndcg_swap_delta(s: list[float], g: list[float], i: int, j: int, k: int | None = None) -> float:
    swapped = list(s)
    swapped[i], swapped[j] = s[j], s[i]
    return abs(_ndcg(swapped, g, k) - _ndcg(s, g, k))


@pytest.mark.parametrize("name", ["ranknet", "listnet", "listmle", "lambdarank", "approxndcg"])
def test_matches_loop_reference(name):
    scores, rel = _toy(3, u=4, p=3, m=3)
    got = BASELINE_LOSSES[name](scores, rel, reduction="none")
    want = [_slow(name, scores[b].tolist(), rel[b].tolist()) for b in range(scores.shape[0])]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(BASELINE_LOSSES[name](scores, rel), torch.tensor(want, dtype=F64).mean())


def test_ranknet_graded_pairs():
    s = torch.tensor([[0.3, -0.2, 1.0, 0.5]], dtype=F64)
    g = torch.tensor([[3.0, 1.0, 0.0, 0.0]], dtype=F64)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # G_i > G_j
    want = sum(-_logsig(0.5 * (s[0, i] - s[0, j]).item()) for i, j in pairs) / 2
    assert ranknet_loss(s, g, pairs="graded", sigma=0.5).item() == pytest.approx(want, rel=1e-12)
    want_binary = sum(-_logsig((s[0, i] - s[0, j]).item()) for i in (0, 1) for j in (2, 3)) / 2
    assert ranknet_loss(s, g).item() == pytest.approx(want_binary, rel=1e-12)


def test_listnet_gain_label():
    s = torch.tensor([[0.3, -0.2, 1.0, 0.5]], dtype=F64)
    g = torch.tensor([[3.0, 1.0, 0.0, 0.0]], dtype=F64)
    want = -(0.75 * torch.log_softmax(s, 1)[0, 0] + 0.25 * torch.log_softmax(s, 1)[0, 1])
    assert listnet_loss(s, g, label="gain").item() == pytest.approx(want.item(), rel=1e-12)


def test_listmle_ties():
    s = torch.tensor([[0.1, 0.9, -0.4, 0.2, 0.7]], dtype=F64)
    g = torch.tensor([[3.0, 3.0, 0.0, 0.0, 0.0]], dtype=F64)

    def nll(order):
        return -sum(math.log(math.exp(s[0, order[k]]) / sum(math.exp(s[0, j]) for j in order[k:])) for k in range(5))

    # stable: ties keep the list order
    assert listmle_loss(s, g).item() == pytest.approx(nll([0, 1, 2, 3, 4]), rel=1e-12)
    # random: some order of each tie group, and more than one across draws
    possible = {round(nll(list(a) + list(b)), 10) for a in itertools.permutations([0, 1])
                for b in itertools.permutations([2, 3, 4])}  # fmt: skip
    seen = {round(listmle_loss(s, g, ties="random", generator=_gen(i)).item(), 10) for i in range(40)}
    assert seen <= possible and len(seen) > 3
    # the same generator state gives the same value
    assert listmle_loss(s, g, ties="random", generator=_gen(3)) == listmle_loss(s, g, ties="random", generator=_gen(3))


# ------------------------------------------------------------------------------------------------------------
# LambdaRank weights


@pytest.mark.parametrize("k", [None, 1, 3])
def test_lambdarank_weights_brute_force_swap(k):
    scores, rel = _toy(4, u=3, p=3, m=4)
    w = lambdarank_weights(scores, rel, k=k)
    assert not w.requires_grad
    n = scores.shape[1]
    for b in range(scores.shape[0]):
        s, g = scores[b].tolist(), rel[b].tolist()
        ranks = {i: r + 1 for r, i in enumerate(sorted(range(n), key=lambda i: -s[i]))}
        for i in range(n):
            for j in range(n):
                in_top = k is None or (ranks[i] <= k and ranks[j] <= k)
                want = _ndcg_swap_delta(s, g, i, j, k) if i != j and in_top else 0.0
                assert w[b, i, j].item() == pytest.approx(want, abs=1e-12)


def test_lambdarank_weights_are_constants():
    """The gradient is that of sum w_ij * (-log2 sigmoid(s_i - s_j)) with w frozen at the current ranking."""
    scores, rel = _toy(5)
    x = scores.clone().requires_grad_(True)
    lambdarank_loss(x, rel, reduction="none").sum().backward()
    w = lambdarank_weights(scores, rel)
    y = scores.clone().requires_grad_(True)
    pairs = rel[:, :, None] > rel[:, None, :]
    surrogate = -(w * torch.nn.functional.logsigmoid(y[:, :, None] - y[:, None, :]))[pairs].sum() / math.log(2)
    surrogate.backward()
    torch.testing.assert_close(x.grad, y.grad)


# ------------------------------------------------------------------------------------------------------------
# Ideal ordering, invariances


@pytest.mark.parametrize("name", NAMES)
def test_ideal_ordering_beats_reversed(name):
    _, rel = _toy(6, u=4, p=3, m=5)
    # scores increasing with relevance (distinct: ties broken by position) vs their reverse
    n = rel.shape[1]
    ideal = torch.log1p(rel) + 0.01 * torch.arange(n, 0, -1, dtype=F64)
    fn = BASELINE_LOSSES[name]
    good = fn(ideal, rel, reduction="none")
    bad = fn(-ideal, rel, reduction="none")
    assert bool((good < bad).all()), (good, bad)
    # the NDCG relaxations at a low temperature give -NDCG = -1 on the ideal ordering
    if name == "approxndcg":
        assert fn(100 * ideal, rel, alpha=100.0).item() == pytest.approx(-1.0, abs=1e-6)
    if name == "neuralndcg":
        assert fn(ideal, rel, tau=1e-3).item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(("name", "kw"), VARIANTS)
def test_shift_invariance(name, kw):
    """Every loss depends on score differences only (ListNet/ListMLE: softmax; NeuralSort: a shift adds the
    same constant to a whole row of logits)."""
    scores, rel = _toy(7)
    shift = torch.tensor([[3.0], [-11.5], [0.25]], dtype=F64)
    fn = BASELINE_LOSSES[name]
    torch.testing.assert_close(fn(scores + shift, rel, **kw), fn(scores, rel, **kw), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "kw"), VARIANTS)
def test_permutation_invariance(name, kw):
    """Permuting a list (scores and relevance together) leaves the loss unchanged (distinct gains, so
    ListMLE's tie rule does not matter)."""
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.1, 1.1]], dtype=F64)
    rel = torch.tensor([[31.0, 7.0, 3.0, 1.0, 0.5, 0.0]], dtype=F64)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    fn = BASELINE_LOSSES[name]
    torch.testing.assert_close(fn(scores[:, perm], rel[:, perm], **kw), fn(scores, rel, **kw))


# ------------------------------------------------------------------------------------------------------------
# Masking, inactive users, reductions


@pytest.mark.parametrize(("name", "kw"), VARIANTS)
def test_masking_equals_compacted_lists(name, kw):
    scores, rel = _toy(8, u=3, p=3, m=4)
    mask = _mask(*scores.shape)
    garbage = scores.clone()
    garbage[~mask] = torch.tensor([float("nan"), float("inf"), -1e6], dtype=F64)
    garbage_rel = rel.clone()
    garbage_rel[~mask] = 63.0  # relevance of invalid entries is ignored
    x = garbage.clone().requires_grad_(True)
    fn = BASELINE_LOSSES[name]
    per_user = fn(x, garbage_rel, mask, reduction="none", **kw)
    for b in range(scores.shape[0]):
        keep = mask[b]
        alone = fn(scores[b : b + 1, keep], rel[b : b + 1, keep], **kw)
        torch.testing.assert_close(per_user[b], alone[()], rtol=1e-10, atol=1e-12)
    per_user.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert bool((x.grad[~mask] == 0).all())


@pytest.mark.parametrize(("name", "kw"), VARIANTS)
def test_inactive_users_are_ignored(name, kw):
    scores, rel = _toy(9)
    fn = BASELINE_LOSSES[name]
    base = fn(scores, rel, **kw)
    # a user without relevant items, a user whose only relevant item is masked out, an empty list
    extra_s = torch.randn(3, scores.shape[1], generator=_gen(1), dtype=F64)
    extra_r = torch.zeros(3, scores.shape[1], dtype=F64)
    extra_r[1, 0] = 15.0
    extra_r[2] = 1.0
    mask = torch.ones(6, scores.shape[1], dtype=torch.bool)
    mask[4, 0] = False
    mask[5] = False
    both = fn(torch.cat([scores, extra_s]), torch.cat([rel, extra_r]), mask, **kw)
    torch.testing.assert_close(both, base)
    # no active user at all: 0, with a finite (zero) gradient
    x = extra_s.clone().requires_grad_(True)
    out = fn(x, extra_r, mask[3:], **kw)
    out.backward()
    assert out.item() == 0.0 and bool((x.grad == 0).all())
    assert fn(x, extra_r, mask[3:], reduction="none", **kw).tolist() == [0.0, 0.0, 0.0]


def test_reduction_and_input_validation():
    scores, rel = _toy(10)
    per_user = ranknet_loss(scores, rel, reduction="none")
    assert per_user.shape == (3,)
    torch.testing.assert_close(ranknet_loss(scores, rel), per_user.mean())
    with pytest.raises(ValueError, match="reduction"):
        ranknet_loss(scores, rel, reduction="sum")
    with pytest.raises(ValueError, match="shape"):
        ranknet_loss(scores, rel[:, :-1])
    with pytest.raises(ValueError, match=r"\(U, L\)"):
        ranknet_loss(scores[0], rel[0])
    with pytest.raises(ValueError, match="gains"):
        listnet_loss(scores, -rel)
    with pytest.raises(ValueError, match="mask"):
        listnet_loss(scores, rel, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        ranknet_loss(scores, rel, alpha=1.0)  # not a RankNet hyper-parameter
    with pytest.raises(TypeError):
        ranknet_loss(scores, rel, None, ListNetParams())


# ------------------------------------------------------------------------------------------------------------
# Temperature limits


def test_approxndcg_approaches_ndcg_as_alpha_grows():
    scores, rel = _toy(11, u=4, p=4, m=6)  # distinct scores, gaps >= 0.35
    true = ndcg_at_ks(scores, rel, [scores.shape[1]])[0].mean().item()
    errors = [abs(-approxndcg_loss(scores, rel, alpha=a).item() - true) for a in (0.3, 1.0, 10.0, 100.0)]
    assert all(e1 > e2 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("k", [None, 1, 3])
def test_neuralndcg_approaches_ndcg_at_k_as_tau_vanishes(k):
    scores, rel = _toy(12, u=4, p=4, m=6)
    n = scores.shape[1]
    true = ndcg_at_ks(scores, rel, [k or n])[0].mean().item()
    errors = [abs(-neuralndcg_loss(scores, rel, tau=t, k=k).item() - true) for t in (3.0, 0.3, 0.03, 0.003)]
    assert errors[-1] < 1e-10, errors
    assert errors[0] > errors[-1] and errors[1] > errors[-1]


def test_neural_sort_and_sinkhorn():
    scores, _ = _toy(13, u=2, p=3, m=3)
    mask = _mask(2, 6)
    # tau -> 0: the permutation matrix sorting the valid scores decreasingly (rows past n and invalid
    # columns are 0)
    p = neural_sort(scores, 1e-4, mask)
    for b in range(2):
        idx = torch.nonzero(mask[b]).flatten()
        order = idx[torch.argsort(scores[b, idx], descending=True)]
        want = torch.zeros(6, 6, dtype=F64)
        want[torch.arange(len(order)), order] = 1.0
        torch.testing.assert_close(p[b], want, atol=1e-12, rtol=0)
    # rows are distributions; Sinkhorn makes the valid block doubly stochastic
    q = neural_sort(scores, 2.0, mask)
    rows = torch.arange(1, 7)[None, :] <= mask.sum(1, keepdim=True)
    torch.testing.assert_close(q.sum(2), rows.to(F64))
    d = sinkhorn_scaling(q, rows, mask, max_iter=500, tol=1e-12)
    torch.testing.assert_close(d.sum(2), rows.to(F64))
    torch.testing.assert_close(d.sum(1), mask.to(F64))
    # the early stop: one iteration already within a loose tolerance returns the same as max_iter=1
    torch.testing.assert_close(
        sinkhorn_scaling(q, rows, mask, max_iter=50, tol=1.0), sinkhorn_scaling(q, rows, mask, 1)
    )


def test_neural_sort_matches_its_formula():
    scores, _ = _toy(16, u=2, p=3, m=4)
    mask = _mask(2, 7)
    tau = 0.7
    got = neural_sort(scores, tau, mask)
    for b in range(2):
        idx = torch.nonzero(mask[b]).flatten().tolist()
        n = len(idx)
        s = scores[b].tolist()
        for r in range(1, 8):
            if r > n:
                assert bool((got[b, r - 1] == 0).all())
                continue
            logits = {i: ((n + 1 - 2 * r) * s[i] - sum(abs(s[i] - s[k]) for k in idx)) / tau for i in idx}
            z = sum(math.exp(v) for v in logits.values())
            want = [math.exp(logits[i]) / z if i in logits else 0.0 for i in range(7)]
            torch.testing.assert_close(got[b, r - 1], torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("k", "tol", "iters"), [(None, 1e-6, 10), (2, 0.0, 10), (None, 1e-3, 50), (3, 0.0, 0)])
def test_neuralndcg_custom_backward_matches_autograd(k, tol, iters):
    """The hand-written Sinkhorn backward of neuralndcg_loss equals autograd through neural_sort and
    sinkhorn_scaling (with early stopping, truncation and masks)."""
    scores, rel = _toy(17, u=3, p=3, m=5)
    mask = _mask(*scores.shape)
    x = scores.clone().requires_grad_(True)
    loss = neuralndcg_loss(x, rel, mask, tau=0.5, k=k, sinkhorn_iters=iters, sinkhorn_tol=tol)
    loss.backward()

    y = scores.clone().requires_grad_(True)
    phat = neural_sort(y, 0.5, mask)
    rows = torch.arange(1, 9)[None, :] <= mask.sum(1, keepdim=True)
    phat = sinkhorn_scaling(phat, rows, mask, max_iter=iters, tol=tol)
    relm = rel * mask
    disc = 1 / torch.log2(torch.arange(2, 10, dtype=F64))
    ideal = torch.sort(relm, 1, descending=True).values
    if k is not None:
        disc[k:] = 0.0
    ndcg = ((phat @ relm[:, :, None]).squeeze(2) * disc).sum(1) / (ideal * disc).sum(1)
    ref = -ndcg.mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# Hyper-parameters and registry


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (RankNetParams, "sigma", 0.0),
        (RankNetParams, "sigma", float("inf")),
        (RankNetParams, "pairs", "all"),
        (ListNetParams, "label", "score"),
        (ListNetParams, "eps", -1e-10),
        (ListMLEParams, "ties", "first"),
        (ListMLEParams, "eps", float("nan")),
        (LambdaRankParams, "sigma", -1.0),
        (LambdaRankParams, "k", 0),
        (LambdaRankParams, "k", 2.5),
        (LambdaRankParams, "k", True),
        (ApproxNDCGParams, "alpha", 0.0),
        (ApproxNDCGParams, "alpha", "1"),
        (NeuralNDCGParams, "tau", 0.0),
        (NeuralNDCGParams, "k", -3),
        (NeuralNDCGParams, "sinkhorn_iters", -1),
        (NeuralNDCGParams, "sinkhorn_iters", 2.0),
        (NeuralNDCGParams, "sinkhorn_tol", -1e-6),
        (NeuralNDCGParams, "eps", 0.0),
    ],
)
def test_params_validation(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be") as info:
        cls(**{field: value})
    assert repr(value) in str(info.value)


def test_defaults():
    assert RankNetParams() == RankNetParams(sigma=1.0, pairs="binary")
    assert ListNetParams() == ListNetParams(label="rating", eps=0.0)
    assert ListMLEParams() == ListMLEParams(ties="stable", eps=0.0)
    assert LambdaRankParams() == LambdaRankParams(sigma=1.0, k=None)
    assert ApproxNDCGParams() == ApproxNDCGParams(alpha=1.0)
    assert NeuralNDCGParams() == NeuralNDCGParams(tau=1.0, k=None, sinkhorn_iters=10, sinkhorn_tol=1e-6, eps=1e-10)


def test_registry_and_factory():
    assert list(BASELINE_LOSSES) == NAMES and list(BASELINE_PARAMS) == NAMES
    scores, rel = _toy(14)
    mask = _mask(*scores.shape)
    for name, kw in VARIANTS:
        loss = make_baseline_loss(name, **kw)
        torch.testing.assert_close(loss(scores, rel, mask), BASELINE_LOSSES[name](scores, rel, mask, **kw))
        params = BASELINE_PARAMS[name](**kw)
        torch.testing.assert_close(BASELINE_LOSSES[name](scores, rel, mask, params), loss(scores, rel, mask))
    ties = torch.tensor([[3.0, 3.0, 0, 0, 0, 0, 0]] * 3, dtype=F64)
    random_mle = make_baseline_loss("listmle", ties="random", generator=_gen(2))
    assert random_mle(scores, ties).item() == listmle_loss(scores, ties, ties="random", generator=_gen(2)).item()
    with pytest.raises(ValueError, match=r"name must be one of .*, got 'softmax'"):
        make_baseline_loss("softmax")
    with pytest.raises(ValueError, match="generator"):
        make_baseline_loss("ranknet", generator=_gen())
    with pytest.raises(ValueError, match=r"ApproxNDCGParams\.alpha"):
        make_baseline_loss("approxndcg", alpha=-1.0)


def test_list_targets_from_list_batch():
    batch = ListBatch(
        users=torch.tensor([0, 1]),
        items=torch.tensor([[3, 4, 7, 8, 9], [5, 5, 1, 2, 6]]),
        pos_pair_ids=torch.tensor([[0, 1], [2, 2]]),
        pos_ratings=torch.tensor([[4.0, 1.0], [2.0, 2.0]]),
        pos_mask=torch.tensor([[True, True], [True, False]]),
        num_pos_items=torch.tensor([2, 1]),
    )
    rel, mask = list_targets(batch, dtype=F64)
    assert rel.dtype == F64 and rel.shape == mask.shape == (2, 5)
    assert rel.tolist() == [[15.0, 1.0, 0, 0, 0], [3.0, 0.0, 0, 0, 0]]
    assert mask.tolist() == [[True] * 5, [True, False, True, True, True]]
    # the padded duplicate positive of user 1 is removed from its list
    s = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.9, 0.9, -0.3, 0.2, 0.0]], dtype=F64)
    per_user = listmle_loss(s, rel, mask, reduction="none")
    torch.testing.assert_close(per_user[1], listmle_loss(s[1:, [0, 2, 3, 4]], rel[1:, [0, 2, 3, 4]])[()])


def test_float32_batch_of_paper_shape_is_finite():
    """A (16, 310) float32 batch (10 positives + 300 negatives) gives finite losses and gradients."""
    g = _gen(15)
    scores = (3 * torch.randn(16, 310, generator=g)).requires_grad_(True)
    ratings = torch.randint(1, 11, (16, 10), generator=g).float() / 2
    rel = torch.cat([torch.exp2(ratings) - 1, torch.zeros(16, 300)], dim=1)
    for name in NAMES:
        loss = BASELINE_LOSSES[name](scores, rel)
        (grad,) = torch.autograd.grad(loss, scores)
        assert loss.dtype == torch.float32 and math.isfinite(loss.item()), name
        assert bool(torch.isfinite(grad).all()), name
