from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mbbo.data.movielens import UserItemCSR, read_ratings, split_leave_last
from mbbo.ranking.metrics import evaluate_ndcg, evaluate_split, ideal_dcg, ndcg_at_ks


def _reference_ndcg(scores: list[float], ratings: dict[int, float], excluded: set[int], k: int) -> float:
    """Slow, obviously-correct NDCG@k of one user (distinct scores)."""
    candidates = sorted((i for i in range(len(scores)) if i not in excluded), key=lambda i: -scores[i])
    dcg = sum((2 ** ratings.get(item, 0) - 1) / math.log2(rank + 2) for rank, item in enumerate(candidates[:k]))
    ideal = sorted((2**r - 1 for i, r in ratings.items() if i not in excluded), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else float("nan")


def test_hand_computed_case():
    # items 0..4; scores rank them 4, 2, 0, 3, 1; relevant: item 2 (r=2, G=3) and item 1 (r=1, G=1)
    scores = torch.tensor([[0.5, 0.1, 0.8, 0.3, 0.9]])
    rel = torch.tensor([[0.0, 1.0, 3.0, 0.0, 0.0]])
    out = ndcg_at_ks(scores, rel, (1, 2, 5, 10))
    idcg2 = 3 + 1 / math.log2(3)
    assert out[0, 0].item() == pytest.approx(0.0)
    assert out[1, 0].item() == pytest.approx((3 / math.log2(3)) / idcg2)
    assert out[2, 0].item() == pytest.approx((3 / math.log2(3) + 1 / math.log2(6)) / idcg2)
    assert out[3, 0].item() == pytest.approx(out[2, 0].item())  # k > N behaves as k = N
    # excluding item 4 (top scored) promotes item 2 to rank 1
    ex = torch.tensor([[False, False, False, False, True]])
    assert ndcg_at_ks(scores, rel, (1,), ex)[0, 0].item() == pytest.approx(3 / 3)
    # a user without relevant items gives NaN
    assert torch.isnan(ndcg_at_ks(scores, torch.zeros_like(rel), (5,))).all()


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_matches_slow_reference(data):
    u = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 12))
    ks = tuple(data.draw(st.lists(st.integers(1, 15), min_size=1, max_size=4)))
    scores = [data.draw(st.permutations(list(range(n)))) for _ in range(u)]  # distinct scores
    ratings = [
        data.draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from([0.5, 1, 2, 3.5, 5]))) for _ in range(u)
    ]
    excluded = [data.draw(st.sets(st.integers(0, n - 1))) - set(r) for r in ratings]
    s = torch.tensor(scores, dtype=torch.float64)
    rel = torch.zeros(u, n, dtype=torch.float64)
    ex = torch.zeros(u, n, dtype=torch.bool)
    for b in range(u):
        for i, r in ratings[b].items():
            rel[b, i] = 2**r - 1
        for i in excluded[b]:
            ex[b, i] = True
    got = ndcg_at_ks(s, rel, ks, ex)
    for j, k in enumerate(ks):
        for b in range(u):
            want = _reference_ndcg(scores[b], ratings[b], excluded[b], k)
            if math.isnan(want):
                assert math.isnan(got[j, b].item())
            else:
                assert got[j, b].item() == pytest.approx(want, abs=1e-12)


def test_ndcg_at_ks_validates():
    with pytest.raises(ValueError, match="must be equal"):
        ndcg_at_ks(torch.zeros(2, 3), torch.zeros(2, 4), (1,))
    with pytest.raises(ValueError, match="ks"):
        ndcg_at_ks(torch.zeros(2, 3), torch.zeros(2, 3), (0,))


def test_ideal_dcg():
    csr = UserItemCSR.from_coo([0, 0, 0, 2], [0, 1, 2, 1], [1.0, 3.0, 2.0, 0.5], 3, 4)
    full = ideal_dcg(csr)
    want0 = 7 + 3 / math.log2(3) + 1 / math.log2(4)
    torch.testing.assert_close(full, torch.tensor([want0, 0.0, 2**0.5 - 1]))
    torch.testing.assert_close(ideal_dcg(csr, 2, users=torch.tensor([0])), torch.tensor([7 + 3 / math.log2(3)]))
    assert ideal_dcg(csr, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="k="):
        ideal_dcg(csr, 0)


class _Table(nn.Module):
    """A scorer with a fixed score table and a dummy parameter (to test mode handling)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.w = nn.Parameter(torch.zeros(()))
        self.modes: list[bool] = []

    def score_all_items(self, users: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.table[users]


def test_evaluate_ndcg_masks_chunks_and_restores_mode():
    # 3 users x 6 items; user 1 has no targets (skipped)
    train = UserItemCSR.from_coo([0, 1, 2], [5, 0, 4], [4.0, 4.0, 4.0], 3, 6)
    dev = UserItemCSR.from_coo([0, 2], [3, 2], [5.0, 1.0], 3, 6)
    test = UserItemCSR.from_coo([0, 0, 2], [1, 2, 0], [3.0, 1.0, 2.0], 3, 6)
    # the scorer puts train items first, then dev, then test items in the right order
    table = torch.tensor(
        [[0.0, 3.0, 2.0, 8.0, 0.1, 9.0], [5, 4, 3, 2, 1, 0], [4.0, 0.2, 8.0, 0.3, 9.0, 0.4]],
        dtype=torch.float64,
    )
    model = _Table(table)
    out = evaluate_ndcg(model, test, (train, dev), (1, 2))
    assert out == {"ndcg@1": 1.0, "ndcg@2": 1.0, "users": 2.0}
    assert model.modes == [False] and model.training  # evaluated in eval mode, then restored
    # without the exclusions, train/dev items take the top ranks: NDCG@1 = 0
    assert evaluate_ndcg(model, test, (), (1,))["ndcg@1"] == 0.0
    # test excluding only train: for user 0, dev item 3 comes first (DCG@2 = 1/log2(3) * 7 ...)
    partial = evaluate_ndcg(model.score_all_items, test, (train,), (2,), chunk_size=1)
    u0 = (7 / math.log2(3)) / (7 + 1 / math.log2(3))
    u2 = (0 + 3 / math.log2(3)) / 3
    assert partial["ndcg@2"] == pytest.approx((u0 + u2) / 2)
    assert evaluate_ndcg(model, test, (train,), (2,), users=torch.tensor([2]))["ndcg@2"] == pytest.approx(u2)
    model.eval()
    evaluate_ndcg(model, test, (train,), (2,))
    assert not model.training
    with pytest.raises(ValueError, match="scorer returned"):
        evaluate_ndcg(lambda u: torch.zeros(len(u), 5), test)


def test_chunk_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 37, 23
    users = torch.randint(0, n_users, (300,), generator=g)
    items = torch.randint(0, n_items, (300,), generator=g)
    key = torch.unique(users * n_items + items)
    u, i = key // n_items, key % n_items
    part = torch.rand(key.numel(), generator=g)
    r = torch.randint(1, 6, (key.numel(),), generator=g).float()
    train = UserItemCSR.from_coo(u[part < 0.6], i[part < 0.6], r[part < 0.6], n_users, n_items)
    test = UserItemCSR.from_coo(u[part >= 0.6], i[part >= 0.6], r[part >= 0.6], n_users, n_items)
    table = torch.rand(n_users, n_items, generator=g)
    a = evaluate_ndcg(lambda x: table[x], test, (train,), chunk_size=5)
    b = evaluate_ndcg(lambda x: table[x], test, (train,), chunk_size=1000)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6)


def test_ml100k_random_and_popularity(shared_data):
    """Anchors of ndcg.md section 5 (protocol A): random ~0.004, popularity ~0.066 at NDCG@10 (test)."""
    split = split_leave_last(read_ratings(shared_data / "movielens" / "ml-100k" / "u.data"))
    g = torch.Generator().manual_seed(0)
    rnd = evaluate_split(lambda u: torch.rand(len(u), split.n_items, generator=g), split, "test")
    assert rnd["users"] == 943 and 0.001 < rnd["ndcg@10"] < 0.01
    pop = torch.bincount(split.train.items, minlength=split.n_items).double()
    pop += torch.bincount(split.dev.items, minlength=split.n_items).double()
    pop += 1e-6 * torch.arange(split.n_items)  # deterministic tie-breaking
    res = evaluate_split(lambda u: pop.expand(len(u), -1), split, "test")
    np.testing.assert_allclose([res[f"ndcg@{k}"] for k in (5, 10, 20, 50)], [0.0476, 0.0657, 0.0837, 0.1132], rtol=0.03)
    dev = evaluate_split(lambda u: pop.expand(len(u), -1), split, "dev")
    assert 0.05 < dev["ndcg@10"] < 0.08
    with pytest.raises(ValueError, match="which"):
        evaluate_split(lambda u: pop.expand(len(u), -1), split, "train")
