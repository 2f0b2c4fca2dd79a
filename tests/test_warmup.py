from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mbbo.data.movielens import Ratings, read_ratings, split_leave_last
from mbbo.ranking.metrics import evaluate_split
from mbbo.ranking.neumf import NeuMF
from mbbo.ranking.sampler import ListBatch
from mbbo.ranking.warmup import ListwiseCELoss, warmup


def _batch(pair_ids, mask=None, num_neg=4) -> ListBatch:
    ids = torch.tensor(pair_ids)
    b, p = ids.shape
    mask = torch.ones(b, p, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return ListBatch(
        users=torch.arange(b),
        items=torch.zeros(b, p + num_neg, dtype=torch.int64),
        pos_pair_ids=ids,
        pos_ratings=torch.ones(b, p),
        pos_mask=mask,
        num_pos_items=torch.full((b,), p),
    )


@pytest.mark.parametrize("shift", ["batch_max", "none"])
def test_gradient_is_listwise_softmax_ce_when_u_is_exact(shift):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    batch = _batch([[0, 1], [2, 3], [4, 5]])
    loss = ListwiseCELoss(6, gamma=1.0, shift=shift, eps=0.0)(scores, batch)  # gamma = 1: u is the batch mean
    (grad,) = torch.autograd.grad(loss, scores)
    ce = torch.logsumexp(scores[:, 2:, None].transpose(1, 2) - scores[:, :2, None], dim=2).sum()
    (want,) = torch.autograd.grad(ce * 4 / 3, scores)  # (#neg / B) * grad sum log sum_j exp(h_j - h_i)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_moving_average_tables_follow_the_formulas():
    g = torch.Generator().manual_seed(1)
    s1, s2 = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(2))
    batch = _batch([[0, 1], [2, 1]], mask=[[True, True], [True, False]])  # the masked slot is ignored
    ref = ListwiseCELoss(3, gamma=0.1, dtype=torch.float64)
    ref(s1, batch)
    ref(s2, batch)
    log = ListwiseCELoss(3, gamma=0.1, shift="none", dtype=torch.float64)
    log(s1, batch)
    out = log(s2, batch)

    def margins(s):
        return (s[:, 2:, None].transpose(1, 2) - s[:, :2, None])[torch.tensor([[True, True], [True, False]])]

    m1, m2 = margins(s1), margins(s2)
    e1, e2 = torch.exp(m1 - m1.max()).mean(1), torch.exp(m2 - m2.max()).mean(1)
    torch.testing.assert_close(ref.table, 0.9 * 0.1 * e1 + 0.1 * e2)  # the reference mixes shifts
    u = 0.9 * 0.1 * torch.exp(m1).mean(1) + 0.1 * torch.exp(m2).mean(1)
    torch.testing.assert_close(log.table, torch.log(u))  # exact unshifted average, in log-space
    want = (m2 * torch.exp(m2) / u[:, None]).sum() / 2
    torch.testing.assert_close(out, want)
    state = log.state_dict()
    fresh = ListwiseCELoss(3, gamma=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.table, log.table) and fresh.shift == "none" and fresh.gamma == 0.1


def test_loss_validation():
    with pytest.raises(ValueError, match="gamma"):
        ListwiseCELoss(3, gamma=0.0)
    with pytest.raises(ValueError, match="shift"):
        ListwiseCELoss(3, shift="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_pairs"):
        ListwiseCELoss(0)


def _clustered_split(seed: int = 0):
    """60 users in 5 taste clusters of 10 items each: 8 ratings in their cluster, 2 elsewhere."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(60):
        c = u % 5
        own = rng.choice(10, 8, replace=False) + 10 * c
        other = rng.choice(np.setdiff1d(np.arange(50), np.arange(10 * c, 10 * c + 10)), 2, replace=False)
        for it in np.concatenate([own, other]):
            rows.append((u, int(it), int(rng.integers(1, 6)), int(rng.integers(0, 10**6))))
    u, i, r, t = (np.array(x) for x in zip(*rows, strict=True))
    return split_leave_last(Ratings.from_arrays(u, i, r, t), n_test=2, n_dev=2)


def test_warmup_learns_on_synthetic_clusters():
    split = _clustered_split()
    model = NeuMF(split.n_users, split.n_items, emb_size=16, layers=(16,), generator=torch.Generator().manual_seed(0))
    before = evaluate_split(model, split, "dev")
    epochs = []
    res = warmup(
        model,
        split,
        30,
        lr=0.01,
        batch_size=16,
        num_pos=3,
        num_neg=20,
        reset_head=False,
        eval_every=30,
        callback=lambda e, m, s: epochs.append(e),
    )
    after = evaluate_split(model, split, "dev")
    assert res.model is model and len(res.losses) == len(res.ce) == 30 and epochs == list(range(1, 31))
    assert res.ce[-1] < res.ce[0] - 0.5  # the listwise cross-entropy goes down
    assert np.mean(res.ce[-5:]) < np.mean(res.ce[:5])
    assert after["ndcg@5"] > before["ndcg@5"] + 0.2 and after["ndcg@5"] > 0.3
    assert len(res.dev_metrics) == 1 and res.dev_metrics[0]["ndcg@5"] == pytest.approx(after["ndcg@5"])
    assert res.loss_state is not None and res.loss_state.table.shape == (split.train.nnz,)
    assert math.isfinite(res.losses[-1])


def test_warmup_resets_head_and_is_deterministic():
    split = _clustered_split(1)

    def run(reset: bool, seed: int = 0):
        model = NeuMF(split.n_users, split.n_items, emb_size=8, layers=(8,), generator=torch.Generator().manual_seed(0))
        res = warmup(model, split, 2, batch_size=16, num_pos=3, num_neg=10, reset_head=reset, seed=seed, shift="none")
        return model, res

    kept, r1 = run(False)
    reset, r2 = run(True)
    assert r1.losses == r2.losses  # same seed, same run
    for (n, a), b in zip(kept.named_parameters(), reset.parameters(), strict=True):
        assert torch.equal(a, b) == (n != "prediction.weight"), n
    _, r3 = run(False, seed=1)
    assert r3.losses != r1.losses
    with pytest.raises(ValueError, match="epochs"):
        warmup(kept, split, -1)
    with pytest.raises(ValueError, match="num_neg"):
        warmup(kept, split, 1, num_neg=0)
    with pytest.raises(TypeError, match="reset_head"):
        warmup(torch.nn.Bilinear(1, 1, 1), split, 0)


def test_warmup_improves_ml100k(shared_data):
    """A short warm-up (2 epochs of a small NeuMF) already beats random scores on ML-100K."""
    split = split_leave_last(read_ratings(shared_data / "movielens" / "ml-100k" / "u.data"))
    model = NeuMF(split.n_users, split.n_items, emb_size=16, layers=(16,), generator=torch.Generator().manual_seed(0))
    res = warmup(model, split, 2, lr=0.01, reset_head=False)
    assert res.ce[1] < res.ce[0]
    assert evaluate_split(model, split, "dev")["ndcg@10"] > 0.02  # random is ~0.005
