from __future__ import annotations

import pytest
import torch

from mbbo.data.movielens import UserItemCSR, read_ratings, split_leave_last
from mbbo.ranking.sampler import ListBatch, ListwiseSampler


def _csr() -> UserItemCSR:
    # user 0: items {1, 3}; user 1: {0, 2, 4, 5}; user 2: nothing; user 3: {5}; 7 items
    rows = [(0, 1, 5), (0, 3, 4), (1, 0, 1), (1, 2, 2), (1, 4, 3), (1, 5, 4), (3, 5, 2)]
    u, i, r = zip(*rows, strict=True)
    return UserItemCSR.from_coo(list(u), list(i), [float(x) for x in r], 4, 7)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_batch_structure_and_pair_ids():
    csr = _csr()
    s = ListwiseSampler(csr, num_pos=2, num_neg=5)
    users = torch.tensor([1, 0, 1, 3])
    b = s.sample(users, _gen())
    assert isinstance(b, ListBatch)
    assert b.items.shape == (4, 7) and b.pos_pair_ids.shape == (4, 2) and (b.num_pos, b.num_neg) == (2, 5)
    torch.testing.assert_close(b.items[:, :2], csr.items[b.pos_pair_ids])
    torch.testing.assert_close(csr.row_of_entry()[b.pos_pair_ids], users[:, None].expand(4, 2))
    torch.testing.assert_close(b.pos_ratings, csr.ratings[b.pos_pair_ids])
    torch.testing.assert_close(b.pos_gains, torch.exp2(b.pos_ratings) - 1)
    assert b.num_pos_items.tolist() == [4, 2, 4, 1]
    assert s.num_pairs == 7
    # positives of users with >= num_pos items are distinct; negatives are never training items
    assert all(len(set(row.tolist())) == 2 for row in b.pos_pair_ids[:3])
    assert not csr.contains(users, b.items[:, 2:]).any()
    assert bool(((b.items >= 0) & (b.items < 7)).all())
    assert b.ratings.shape == (4, 7) and b.ratings[:, 2:].eq(0).all()
    torch.testing.assert_close(b.ratings[:, :2], b.pos_ratings)
    assert b.to("cpu").items.equal(b.items)


def test_negatives_uniform_over_non_training_items():
    s = ListwiseSampler(_csr(), num_pos=1, num_neg=20000)
    neg = s.sample_negatives(torch.tensor([0, 1]), 20000, _gen(1))
    freq0 = torch.bincount(neg[0], minlength=7).double() / 20000
    freq1 = torch.bincount(neg[1], minlength=7).double() / 20000
    expected0 = torch.tensor([1, 0, 1, 0, 1, 1, 1]).double() / 5
    expected1 = torch.tensor([0, 1, 0, 1, 0, 0, 1]).double() / 3
    torch.testing.assert_close(freq0, expected0, atol=0.015, rtol=0)  # ~5 sd for p = 0.2
    torch.testing.assert_close(freq1, expected1, atol=0.02, rtol=0)


def test_positives_uniform_subsets_without_replacement():
    s = ListwiseSampler(_csr(), num_pos=2, num_neg=0)
    pairs, mask = s.sample_positives(torch.full((6000,), 1), _gen(2))
    assert mask.all() and pairs.shape == (6000, 2)
    assert bool((pairs[:, 0] != pairs[:, 1]).all())
    freq = torch.bincount(pairs.flatten(), minlength=7).double() / 6000  # inclusion probability 1/2 each
    torch.testing.assert_close(freq[2:6], torch.full((4,), 0.5, dtype=torch.float64), atol=0.035, rtol=0)
    first = torch.bincount(pairs[:, 0] - 2, minlength=4).double() / 6000  # random order: first slot uniform
    torch.testing.assert_close(first, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0)


def test_users_with_few_positives():
    csr = _csr()
    rep = ListwiseSampler(csr, num_pos=3, num_neg=2, few_positives="replace")
    b = rep.sample(torch.tensor([0, 3, 1]), _gen())
    assert b.pos_mask.all()
    assert set(b.pos_pair_ids[0].tolist()) <= {0, 1} and b.pos_pair_ids[1].tolist() == [6, 6, 6]
    assert len(set(b.pos_pair_ids[2].tolist())) == 3
    draws = rep.sample_positives(torch.zeros(4000, dtype=torch.int64), _gen(3))[0]
    assert abs(draws.eq(0).double().mean().item() - 0.5) < 0.03  # with replacement, uniform
    msk = ListwiseSampler(csr, num_pos=3, num_neg=2, few_positives="mask")
    b = msk.sample(torch.tensor([0, 3, 1]), _gen())
    assert b.pos_mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert sorted(b.pos_pair_ids[0, :2].tolist()) == [0, 1]
    assert b.pos_pair_ids[1].tolist() == [6, 6, 6]  # padding repeats a valid pair
    assert b.ratings[0, 2] == 0 and b.ratings[1, 1:].eq(0).all()


def test_epoch_covers_active_users_once_and_is_deterministic():
    s = ListwiseSampler(_csr(), num_pos=1, num_neg=3)
    batches = list(s.epoch(_gen(5), batch_size=2))
    assert [b.users.numel() for b in batches] == [2, 1] and s.batches_per_epoch(2) == 2
    assert sorted(torch.cat([b.users for b in batches]).tolist()) == [0, 1, 3]  # user 2 has no items
    again = list(s.epoch(_gen(5), batch_size=2))
    assert all(a.items.equal(b.items) and a.users.equal(b.users) for a, b in zip(batches, again, strict=True))
    other = list(s.epoch(_gen(6), batch_size=2))
    assert any(not a.items.equal(b.items) for a, b in zip(batches, other, strict=True))
    with pytest.raises(ValueError, match="batch_size"):
        next(s.epoch(_gen(), batch_size=0))


def test_invalid_arguments():
    csr = _csr()
    with pytest.raises(ValueError, match="num_pos"):
        ListwiseSampler(csr, num_pos=0)
    with pytest.raises(ValueError, match="num_neg"):
        ListwiseSampler(csr, num_neg=-1)
    with pytest.raises(ValueError, match="few_positives"):
        ListwiseSampler(csr, few_positives="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no training items"):
        ListwiseSampler(csr, 1, 1).sample(torch.tensor([2]), _gen())
    full = UserItemCSR.from_coo([0, 0], [0, 1], [1.0, 1.0], 1, 2)
    with pytest.raises(ValueError, match="every item"):
        ListwiseSampler(full, 1, 1)
    assert ListwiseSampler(full, 1, 0).sample(torch.tensor([0]), _gen()).items.shape == (1, 1)


def test_ml100k_lists(shared_data):
    split = split_leave_last(read_ratings(shared_data / "movielens" / "ml-100k" / "u.data"))
    s = ListwiseSampler(split.train)
    assert s.batches_per_epoch(256) == 4
    b = next(s.epoch(_gen(), 256))
    assert b.items.shape == (256, 310)
    assert not split.train.contains(b.users, b.items[:, 10:]).any()
    assert split.train.contains(b.users, b.items[:, :10]).all()
    assert all(len(set(r.tolist())) == 10 for r in b.pos_pair_ids)
