"""Training lists for listwise ranking losses: per user, sampled positives followed by uniform negatives.

The protocol of SONG/K-SONG (Qiu et al., ICML 2022) and BSVRB (Hu et al., ICML 2023) on MovieLens
(``shared/specs/ndcg.md`` section 2, ReChorus ``reorg_train_data=1``): one instance per user per epoch,
batches of 256 users; each instance is ``num_pos = 10`` of the user's training items drawn *without
replacement*, then ``num_neg = 300`` negatives drawn uniformly *with replacement* from the items that are not
in the user's *training* set (as ReChorus: negatives may be the user's dev/test items, so training never
reads them).

Everything is vectorised over the batch and driven by an explicit ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mbbo.data.movielens import UserItemCSR, gains

__all__ = ["ListBatch", "ListwiseSampler"]

FewPositives = Literal["replace", "mask"]


@dataclass(frozen=True)
class ListBatch:
    """A mini-batch of ranking lists; list ``b`` is ``items[b] = [P positives, M negatives]`` of ``users[b]``.

    ``pos_pair_ids[b, k]`` is the training pair id (entry of the training CSR) of positive ``k``: per-pair
    estimator tables are indexed by it. ``pos_mask`` is False on padding slots (only with
    ``few_positives="mask"``; they repeat a valid positive of the user). ``num_pos_items[b]`` = ``n_q^+``,
    the user's number of training items.
    """

    users: Tensor  # (B,) int64
    items: Tensor  # (B, P + M) int64
    pos_pair_ids: Tensor  # (B, P) int64
    pos_ratings: Tensor  # (B, P) float
    pos_mask: Tensor  # (B, P) bool
    num_pos_items: Tensor  # (B,) int64

    @property
    def num_pos(self) -> int:
        return self.pos_pair_ids.shape[1]

    @property
    def num_neg(self) -> int:
        return self.items.shape[1] - self.num_pos

    @property
    def pos_gains(self) -> Tensor:
        """``2^r - 1`` of the positives, ``(B, P)``."""
        return gains(self.pos_ratings)

    @property
    def ratings(self) -> Tensor:
        """Ratings of the list, ``(B, P + M)``: positives' ratings, then 0 for negatives (and padding)."""
        pos = torch.where(self.pos_mask, self.pos_ratings, torch.zeros_like(self.pos_ratings))
        return torch.cat([pos, pos.new_zeros(pos.shape[0], self.num_neg)], dim=1)

    def to(self, device: torch.device | str | None) -> ListBatch:
        return ListBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


class ListwiseSampler:
    """Samples :class:`ListBatch` lists from a training :class:`~mbbo.data.movielens.UserItemCSR`.

    Args:
        train: the training interactions (pair id = CSR entry index).
        num_pos: positives per list (10 in the papers).
        num_neg: negatives per list (300 in the papers).
        few_positives: what to do for users with fewer than ``num_pos`` training items: ``"replace"`` draws
            their positives with replacement (every list has ``num_pos`` valid positives and
            ``n_q^+ * mean_k`` stays an unbiased estimate of the sum over ``S_q^+``), ``"mask"`` takes all of
            them once and masks the padding. (ML-100K/20M under the 5/5 split always have >= 10.)

    Users without training items are left out of :meth:`epoch` and rejected by :meth:`sample`.
    """

    def __init__(
        self,
        train: UserItemCSR,
        num_pos: int = 10,
        num_neg: int = 300,
        few_positives: FewPositives = "replace",
    ) -> None:
        if num_pos < 1:
            raise ValueError(f"num_pos={num_pos} must be >= 1")
        if num_neg < 0:
            raise ValueError(f"num_neg={num_neg} must be >= 0")
        if few_positives not in ("replace", "mask"):
            raise ValueError(f"few_positives={few_positives!r} must be 'replace' or 'mask'")
        self.train = train
        self.num_pos = num_pos
        self.num_neg = num_neg
        self.few_positives: FewPositives = few_positives
        n = train.n_items
        self._counts = train.counts()
        if num_neg > 0 and bool((self._counts >= n).any()):
            raise ValueError("a user has interacted with every item: no negatives to sample")
        # a_j = e_j - j (number of non-training items below the j-th training item) shifted by user * n_items:
        # globally non-decreasing, so one searchsorted maps uniform ranks to non-training items (see below).
        row = train.row_of_entry()
        local = torch.arange(train.nnz, device=train.device) - train.offsets[row]
        self._adjusted_keys = row * n + (train.items - local)
        self.active_users = torch.nonzero(self._counts > 0).flatten()

    @property
    def num_pairs(self) -> int:
        """Number of (user, training item) pairs: the length of per-pair tables."""
        return self.train.nnz

    def batches_per_epoch(self, batch_size: int = 256) -> int:
        """``ceil(#users with training items / batch_size)``."""
        return -(-self.active_users.numel() // batch_size)

    def sample_positives(self, users: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``num_pos`` training pairs per user: ``(pair_ids (B, P), mask (B, P))``.

        Without replacement via random keys: each of the user's ``n_q^+`` entries gets a uniform key and the
        ``num_pos`` smallest win (a uniformly random subset in random order).
        """
        dev = self.train.device
        users = users.to(dev, torch.int64)
        counts = self._counts[users]
        if bool((counts == 0).any()):
            raise ValueError("sample_positives: a user has no training items")
        p = self.num_pos
        width = max(int(counts.max()), p)
        keys = torch.rand(users.numel(), width, generator=generator, device=dev)
        keys.masked_fill_(torch.arange(width, device=dev) >= counts[:, None], 2.0)
        local = torch.topk(keys, p, dim=1, largest=False, sorted=True).indices  # (B, P)
        short = counts < p
        mask = torch.ones(users.numel(), p, dtype=torch.bool, device=dev)
        if bool(short.any()):
            if self.few_positives == "replace":
                draw = torch.rand(users.numel(), p, generator=generator, device=dev, dtype=torch.float64)
                with_repl = (draw * counts[:, None]).long().clamp_max(counts[:, None] - 1)
                local = torch.where(short[:, None], with_repl, local)
            else:
                mask = local < counts[:, None]
                local = torch.where(mask, local, local[:, :1])
        return self.train.offsets[users][:, None] + local, mask

    def sample_negatives(self, users: Tensor, num: int, generator: torch.Generator) -> Tensor:
        """``num`` items per user, uniform with replacement over the items not in the user's training set.

        Exact inverse-rank sampling (no rejection loop): draw a rank ``r`` uniform in
        ``{0, ..., N - n_u - 1}``; with the user's sorted training items ``e_0 < e_1 < ...`` the ``r``-th
        non-training item is ``r + #{j : e_j - j <= r}``, counted by a binary search.
        """
        dev = self.train.device
        users = users.to(dev, torch.int64)
        n = self.train.n_items
        allowed = (n - self._counts[users]).to(torch.float64)
        draw = torch.rand(users.numel(), num, generator=generator, device=dev, dtype=torch.float64)
        rank = (draw * allowed[:, None]).long().clamp_max((allowed[:, None] - 1).long())
        query = users[:, None] * n + rank
        below = torch.searchsorted(self._adjusted_keys, query.reshape(-1), right=True).reshape(query.shape)
        return rank + below - self.train.offsets[users][:, None]

    def sample(self, users: Tensor, generator: torch.Generator) -> ListBatch:
        """One list per user: ``num_pos`` positives then ``num_neg`` negatives."""
        users = users.to(self.train.device, torch.int64)
        pair_ids, mask = self.sample_positives(users, generator)
        neg = self.sample_negatives(users, self.num_neg, generator)
        items = torch.cat([self.train.items[pair_ids], neg], dim=1)
        return ListBatch(users, items, pair_ids, self.train.ratings[pair_ids], mask, self._counts[users])

    def epoch(self, generator: torch.Generator, batch_size: int = 256) -> Iterator[ListBatch]:
        """One instance per user (with training items) in a random order, ``batch_size`` users per batch
        (the last batch may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        users = self.active_users
        perm = users[torch.randperm(users.numel(), generator=generator, device=users.device)]
        for start in range(0, perm.numel(), batch_size):
            yield self.sample(perm[start : start + batch_size], generator)
