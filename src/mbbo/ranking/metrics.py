"""All-ranking NDCG@K with graded relevance (the evaluation of ``shared/specs/ndcg.md`` section 2).

For a user with relevant set ``T`` (gains ``G_i = 2^{r_i} - 1``) and candidate items = all items except the
excluded ones (training items; also dev items when evaluating test), rank the candidates by score and

    DCG@K  = sum_{p <= K} G_{item at rank p} / log2(1 + p),
    IDCG@K = sum_{j <= min(K, |T|)} G_(j) / log2(1 + j)   (gains sorted in decreasing order),
    NDCG@K = DCG@K / IDCG@K,

averaged over the users with a non-empty ``T`` (Järvelin & Kekäläinen, 2002; ReChorus ``_NDCG_at_k``).
Items with exactly equal scores are ordered as ``torch.topk`` returns them (unspecified).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mbbo.data.movielens import RankingSplit, UserItemCSR, gains

__all__ = ["evaluate_ndcg", "evaluate_split", "ideal_dcg", "ndcg_at_ks"]

Scorer = Callable[[Tensor], Tensor]


def _discounts(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``1 / log2(1 + p)`` for ranks ``p = 1..k``."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=dtype, device=device))


def ideal_dcg(
    targets: UserItemCSR,
    k: int | None = None,
    users: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Ideal DCG of each user's list, ``sum_{j <= min(k, n)} G_(j) / log2(1 + j)``, gains sorted decreasingly.

    ``k=None`` uses the whole list (SONG's ``Z_q``); ``k=K`` gives ``Z_q^K`` (K-SONG). Returns
    ``(len(users),)`` (all users by default); 0 for an empty list.
    """
    if users is None:
        users = torch.arange(targets.n_users, device=targets.device)
    _, ratings, mask = targets.padded(users)
    g = torch.where(mask, gains(ratings.to(dtype)), torch.zeros((), dtype=dtype, device=ratings.device))
    g = torch.sort(g, dim=1, descending=True).values
    if k is not None:
        if k < 1:
            raise ValueError(f"k={k} must be >= 1 or None")
        g = g[:, :k]
    return (g * _discounts(g.shape[1], dtype, g.device)).sum(dim=1)


def ndcg_at_ks(scores: Tensor, relevance: Tensor, ks: Sequence[int], exclude: Tensor | None = None) -> Tensor:
    """Per-user NDCG@K from dense scores: returns ``(len(ks), U)``, NaN for users without relevant items.

    Args:
        scores: ``(U, N)`` scores of all items.
        relevance: ``(U, N)`` gains ``2^r - 1`` (0 for non-relevant items).
        ks: cut-offs.
        exclude: optional ``(U, N)`` boolean mask of items removed from the ranking (their relevance is
            ignored).
    """
    if scores.shape != relevance.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevance.shape)} must be equal (U, N)")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks} must be non-empty positive integers")
    n = scores.shape[1]
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    rel = relevance.to(dtype)
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
        rel = rel.masked_fill(exclude, 0.0)
    kmax = min(max(ks), n)
    top = torch.topk(scores.to(dtype), kmax, dim=1, largest=True, sorted=True).indices
    disc = _discounts(kmax, dtype, scores.device)
    dcg_cum = torch.cumsum(torch.gather(rel, 1, top) * disc, dim=1)
    ideal = torch.topk(rel, kmax, dim=1, largest=True, sorted=True).values
    idcg_cum = torch.cumsum(ideal * disc, dim=1)
    out = []
    for k in ks:
        j = min(k, n) - 1
        idcg = idcg_cum[:, j]
        out.append(torch.where(idcg > 0, dcg_cum[:, j] / idcg, torch.full_like(idcg, float("nan"))))
    return torch.stack(out)


def _score_fn(model: nn.Module | Scorer) -> Scorer:
    fn = getattr(model, "score_all_items", None)
    return fn if callable(fn) else model  # type: ignore[return-value]


@torch.no_grad()
def evaluate_ndcg(
    model: nn.Module | Scorer,
    targets: UserItemCSR,
    exclude: Sequence[UserItemCSR] = (),
    ks: Sequence[int] = (5, 10, 20, 50),
    *,
    chunk_size: int = 256,
    users: Tensor | None = None,
    device: torch.device | str | None = None,
    with_std: bool = False,
) -> dict[str, float]:
    """Mean all-ranking NDCG@K over the users with a non-empty target list.

    Args:
        model: a module with ``score_all_items(users) -> (len(users), n_items)`` (put in eval mode for the
            call, then restored), or such a callable.
        targets: the relevant items and ratings (dev or test).
        exclude: item lists removed from each user's candidates (train; train and dev for test).
        ks: cut-offs.
        chunk_size: users scored per model call (memory is ``O(chunk_size * n_items)``).
        users: restrict to these users (default all).
        device: where user ids are sent; defaults to the model's parameters' device (else the CSR's).
        with_std: also return ``"ndcg@K_std"``, the sample standard deviation over the evaluated users.

    Returns ``{"ndcg@K": value, ..., "users": number of evaluated users}``.
    """
    score = _score_fn(model)
    module = model if isinstance(model, nn.Module) else getattr(score, "__self__", None)
    was_training = isinstance(module, nn.Module) and module.training
    if isinstance(module, nn.Module):
        module.eval()
    if device is None:
        p = next(module.parameters(), None) if isinstance(module, nn.Module) else None
        device = p.device if p is not None else targets.device
    if users is None:
        users = torch.arange(targets.n_users, device=targets.device)
    users = users.to(targets.device, torch.int64)
    users = users[targets.counts()[users] > 0]
    totals = torch.zeros(len(ks), dtype=torch.float64)
    squares = torch.zeros(len(ks), dtype=torch.float64)
    try:
        for start in range(0, users.numel(), chunk_size):
            chunk = users[start : start + chunk_size]
            s = score(chunk.to(device))
            c, n = s.shape
            if n != targets.n_items:
                raise ValueError(f"scorer returned {n} items, expected {targets.n_items}")
            rel = torch.zeros(c, n, dtype=s.dtype if s.is_floating_point() else torch.float32, device=s.device)
            pos, entry = targets.entries(chunk)
            rel[pos.to(s.device), targets.items[entry].to(s.device)] = gains(targets.ratings[entry]).to(
                s.device, rel.dtype
            )
            mask = torch.zeros(c, n, dtype=torch.bool, device=s.device)
            for ex in exclude:
                pos, entry = ex.entries(chunk.to(ex.device))
                mask[pos.to(s.device), ex.items[entry].to(s.device)] = True
            per_user = ndcg_at_ks(s, rel, ks, mask).to(torch.float64).cpu()
            totals += per_user.sum(dim=1)
            squares += (per_user * per_user).sum(dim=1)
    finally:
        if was_training and isinstance(module, nn.Module):
            module.train()
    n_eval = users.numel()
    out = {f"ndcg@{k}": (totals[j].item() / n_eval if n_eval else float("nan")) for j, k in enumerate(ks)}
    out["users"] = float(n_eval)
    if with_std:
        for j, k in enumerate(ks):
            mean = totals[j].item() / n_eval if n_eval else float("nan")
            var = (squares[j].item() - n_eval * mean * mean) / (n_eval - 1) if n_eval > 1 else float("nan")
            out[f"ndcg@{k}_std"] = math.sqrt(max(var, 0.0)) if n_eval > 1 else float("nan")
    return out


def evaluate_split(
    model: nn.Module | Scorer,
    split: RankingSplit,
    which: str = "dev",
    ks: Sequence[int] = (5, 10, 20, 50),
    *,
    chunk_size: int = 256,
    users: Tensor | None = None,
    with_std: bool = False,
) -> dict[str, float]:
    """NDCG@K on ``which = "dev"`` (train items excluded) or ``"test"`` (train and dev items excluded), over
    ``users`` (default all; see :func:`evaluate_ndcg`)."""
    kw: dict[str, Any] = {"chunk_size": chunk_size, "users": users, "with_std": with_std}
    if which == "dev":
        return evaluate_ndcg(model, split.dev, (split.train,), ks, **kw)
    if which == "test":
        return evaluate_ndcg(model, split.test, (split.train, split.dev), ks, **kw)
    raise ValueError(f"which={which!r} must be 'dev' or 'test'")
