"""Baseline learning-to-rank losses of the top-K NDCG experiments (``shared/specs/ndcg.md`` section 3).

Six losses, each a pure, differentiable function of a batch of scored lists:

* ``scores`` ``(U, L)``: U users, L items per list (a :class:`~mbbo.ranking.sampler.ListBatch` orders them
  positives first, then negatives; the losses do not rely on that order except for ListMLE's tie rule);
* ``relevance`` ``(U, L)``: graded gains ``G = 2^r - 1`` (0 for negatives), never differentiated;
* ``mask`` ``(U, L)`` (optional): True on valid entries. Invalid entries are removed from the list: their
  scores (even NaN/inf) and relevance are ignored and they receive zero gradient.

Each returns the mean over *active* users (a user is active when its list holds at least one valid entry
with ``G > 0``; the other rows are ignored, and the loss is 0 if no row is active), or the per-user losses
``(U,)`` with ``reduction="none"`` (0 on inactive rows). Everything is vectorised over users and pairs
(no Python loop over either). Every pair ``G_i > G_j`` has a relevant ``i``, so RankNet, LambdaRank and
ApproxNDCG only form the ``P`` rows of the relevant items: ``O(U P L)`` (P = 10, L = 310 in the papers);
ListNet and ListMLE are ``O(U L log L)``; NeuralNDCG needs the ``(U, L, L)`` relaxed permutation (about 4 s
forward + backward for ``256 x 310`` in float32 on one CPU thread, the others < 0.1 s).

The definitions are those of the reference implementation used for the BSVRB/SONG baselines
(``quanqihu/BSVRB_ICML2023`` = ``zhqiu/NDCG-Optimization`` ``RS_exp/src/models/losses.py``, adapted from
allRank), per user, with NDCG normalised by the ideal DCG of the *list's own* relevance ``maxDCG``:

=============  ==========================================================================================
``ranknet``    ``(1/n+) sum_{i: G_i>0} sum_{j: G_j=0} -log sigmoid(sigma (s_i - s_j))`` (``bpr_loss``);
               ``pairs="graded"`` sums over all pairs ``G_i > G_j`` instead (Burges et al., ICML 2005).
``listnet``    ``-sum_i softmax(r)_i log softmax(s)_i`` with the ratings ``r = log2(1 + G)``
               (Cao et al., ICML 2007, top-one probability); ``label="gain"`` uses ``G / sum G``.
``listmle``    ``sum_k [log sum_{m >= k} exp(s_(m)) - s_(k)]`` over the list sorted by decreasing relevance
               (Xia et al., ICML 2008, Plackett-Luce).
``lambdarank`` ``-sum_{G_i > G_j} w_ij log2 sigmoid(sigma (s_i - s_j))``, ``w_ij = |1/D_i - 1/D_j| |G_i -
               G_j| / maxDCG`` = ``|Delta NDCG_ij|`` of swapping i and j in the current ranking,
               ``D = log2(1 + rank)`` (Burges et al., NeurIPS 2006; allRank ``lambdaRank_scheme``).
``approxndcg`` ``-(1/maxDCG) sum_i G_i / log2(1 + rhat_i)``, ``rhat_i = 1 + sum_{j != i} sigmoid(alpha
               (s_j - s_i))`` (Qin, Liu & Li, Inf. Retr. 2010).
``neuralndcg`` ``-(1/maxDCG@K) sum_{k <= K} (Phat G)_k / log2(1 + k)`` with ``Phat`` the NeuralSort relaxed
               permutation (Grover et al., ICLR 2019) at temperature ``tau``, Sinkhorn-scaled to a doubly
               stochastic matrix (Pobrotyn & Bialobrzeski, arXiv 2102.07831).
=============  ==========================================================================================

Hyper-parameters (one frozen, validated dataclass per loss) default to the values of ``ndcg.md`` section 3
and of the reference code; see each dataclass. Known deviations from the reference code, all deliberate:

* LambdaRank: the reference returns the *sum* over the batch; here it is the mean over users (the reference
  value divided by the batch size).
* ListNet / ListMLE: exact log-softmax / log-sum-exp by default; the reference's ``log(. + 1e-10)`` guard is
  available as ``eps=1e-10`` (it only matters when a probability or a suffix sum falls below 1e-10).
* Masking is exact (the reference has no masks).
* NeuralNDCG: Sinkhorn runs in factored form with a hand-written backward (see :class:`_SinkhornGain`);
  same values and gradients as autograd through the reference algorithm (to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mbbo.data.movielens import gains
from mbbo.ranking.sampler import ListBatch
from mbbo.validation import check_choice, check_int, check_nonnegative, check_optional, check_positive

__all__ = [
    "BASELINE_LOSSES",
    "BASELINE_PARAMS",
    "ApproxNDCGParams",
    "LambdaRankParams",
    "ListMLEParams",
    "ListNetParams",
    "NeuralNDCGParams",
    "RankNetParams",
    "approxndcg_loss",
    "lambdarank_loss",
    "lambdarank_weights",
    "list_targets",
    "listmle_loss",
    "listnet_loss",
    "make_baseline_loss",
    "neural_sort",
    "neuralndcg_loss",
    "ranknet_loss",
    "sinkhorn_scaling",
]

Reduction = Literal["mean", "none"]
_LN2 = math.log(2.0)

# ------------------------------------------------------------------------------------------------------------
# Hyper-parameters


# checks of mbbo.validation, the parameter named with its owner (e.g. "ListNetParams.temperature")
def _check_positive(owner: str, name: str, value: object) -> None:
    check_positive(f"{owner}.{name}", value)


def _check_nonnegative(owner: str, name: str, value: object) -> None:
    check_nonnegative(f"{owner}.{name}", value)


def _check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    check_choice(f"{owner}.{name}", value, choices)


def _check_cutoff(owner: str, name: str, value: object) -> None:
    """None (the whole list) or an integer >= 1."""
    check_optional(check_int, f"{owner}.{name}", value, 1)


@dataclass(frozen=True)
class RankNetParams:
    """RankNet / BPR.

    Attributes:
        sigma: slope of the pairwise logistic, ``-log sigmoid(sigma (s_i - s_j))``; > 0. Default 1 (reference
            ``bpr_loss`` has none, i.e. 1; Burges et al. 2005).
        pairs: ``"binary"`` (default, the reference ``bpr_loss``): every relevant item (``G > 0``) against
            every non-relevant one; ``"graded"``: every pair with ``G_i > G_j`` (classic RankNet on graded
            labels). Either way the per-user sum over pairs is divided by the number of relevant items
            (the reference averages over the ``B * num_pos`` positives).
    """

    sigma: float = 1.0
    pairs: Literal["binary", "graded"] = "binary"

    def __post_init__(self) -> None:
        _check_positive("RankNetParams", "sigma", self.sigma)
        _check_choice("RankNetParams", "pairs", self.pairs, ("binary", "graded"))


@dataclass(frozen=True)
class ListNetParams:
    """ListNet (top-one probability cross-entropy).

    Attributes:
        label: target distribution: ``"rating"`` (default, reference ``listnet_loss`` and Cao et al. 2007):
            ``softmax(r)`` of the ratings ``r = log2(1 + G)`` over the whole list, so each negative
            (``r = 0``) gets weight ``e^0``; ``"gain"``: ``G / sum(G)`` (negatives get 0).
        eps: 0 (default) for the exact ``log_softmax``; > 0 gives the reference's ``log(softmax(s) + eps)``
            (reference 1e-10).
    """

    label: Literal["rating", "gain"] = "rating"
    eps: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("ListNetParams", "label", self.label, ("rating", "gain"))
        _check_nonnegative("ListNetParams", "eps", self.eps)


@dataclass(frozen=True)
class ListMLEParams:
    """ListMLE (Plackett-Luce negative log-likelihood of the relevance-sorted permutation).

    Attributes:
        ties: how items of equal relevance are ordered in the target permutation: ``"stable"`` (default)
            keeps their order in the list (the reference sorts the padded rating vector, so ties stay "in
            sort order"); ``"random"`` orders them uniformly at random, drawn from the ``generator`` passed
            to :func:`listmle_loss` (allRank shuffles the list first). With :class:`ListBatch` lists the two
            agree in distribution: positives come in random order and negatives are i.i.d. uniform draws.
        eps: 0 (default) for the exact ``logcumsumexp``; > 0 gives the reference's
            ``log(sum_{m>=k} exp(s_m - max) + eps) - (s_k - max)`` (reference 1e-10).
    """

    ties: Literal["stable", "random"] = "stable"
    eps: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("ListMLEParams", "ties", self.ties, ("stable", "random"))
        _check_nonnegative("ListMLEParams", "eps", self.eps)


@dataclass(frozen=True)
class LambdaRankParams:
    """LambdaRank (allRank ``lambda_loss`` with ``lambdaRank_scheme``).

    Attributes:
        sigma: slope of the pairwise logistic; > 0. Default 1 (reference ``sigma=1.0``).
        k: truncation: ``None`` (default, reference: no truncation) or K >= 1, keeping only pairs whose
            items are both ranked in the current top K and normalising by ``maxDCG@K`` (allRank).
    """

    sigma: float = 1.0
    k: int | None = None

    def __post_init__(self) -> None:
        _check_positive("LambdaRankParams", "sigma", self.sigma)
        _check_cutoff("LambdaRankParams", "k", self.k)


@dataclass(frozen=True)
class ApproxNDCGParams:
    """ApproxNDCG (Qin et al. 2010).

    Attributes:
        alpha: sigmoid slope of the smooth rank (inverse temperature); > 0. Default 1 (``ndcg.md`` section
            3, reference ``approx_ndcg_loss``; also allRank's default). The approximation becomes exact as
            ``alpha -> inf`` for distinct scores.
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("ApproxNDCGParams", "alpha", self.alpha)


@dataclass(frozen=True)
class NeuralNDCGParams:
    """NeuralNDCG (Pobrotyn & Bialobrzeski 2021).

    Attributes:
        tau: NeuralSort temperature; > 0. Default 1.0 (``ndcg.md`` sections 2-3: the runs use 1.0, a 0.2
            variant was tried; allRank default 1.0).
        k: NDCG cut-off: ``None`` (default, whole list, as the reference ``neural_sort_loss``, which ignores
            its ``k``) or K >= 1 (allRank's truncation: the first K relaxed ranks, normalised by maxDCG@K).
        sinkhorn_iters: maximum Sinkhorn iterations (column then row normalisation); >= 0, 0 disables the
            scaling. Default 10 (``ndcg.md`` / reference ``sinkhorn_scaling``; allRank uses 50).
        sinkhorn_tol: stop early once every valid row and column sums to 1 within this tolerance (checked on
            the whole batch, as the reference); >= 0, 0 always runs ``sinkhorn_iters``. Default 1e-6
            (reference and allRank).
        eps: lower clamp of the sums in the Sinkhorn divisions; > 0. Default 1e-10 (reference and allRank).
    """

    tau: float = 1.0
    k: int | None = None
    sinkhorn_iters: int = 10
    sinkhorn_tol: float = 1e-6
    eps: float = 1e-10

    def __post_init__(self) -> None:
        _check_positive("NeuralNDCGParams", "tau", self.tau)
        _check_cutoff("NeuralNDCGParams", "k", self.k)
        check_int("NeuralNDCGParams.sinkhorn_iters", self.sinkhorn_iters, 0)
        _check_nonnegative("NeuralNDCGParams", "sinkhorn_tol", self.sinkhorn_tol)
        _check_positive("NeuralNDCGParams", "eps", self.eps)


def _resolve(cls: type, params: Any, overrides: dict[str, Any]) -> Any:
    if params is None:
        return cls(**overrides)
    if not isinstance(params, cls):
        raise TypeError(f"params must be a {cls.__name__}, got {type(params).__name__}")
    return replace(params, **overrides) if overrides else params


# ------------------------------------------------------------------------------------------------------------
# Shared helpers


@dataclass(frozen=True)
class _Lists:
    s: Tensor  # scores, 0 on invalid entries (differentiable on valid ones)
    rel: Tensor  # gains, 0 on invalid entries, no grad
    valid: Tensor  # bool
    active: Tensor  # (U,) bool: some valid entry with G > 0


def _prepare(scores: Tensor, relevance: Tensor, mask: Tensor | None) -> _Lists:
    if scores.ndim != 2:
        raise ValueError(f"scores must be (U, L), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if relevance.shape != scores.shape:
        raise ValueError(f"relevance {tuple(relevance.shape)} must have the shape of scores {tuple(scores.shape)}")
    if mask is None:
        valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        if mask.shape != scores.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of scores {tuple(scores.shape)}")
        valid = mask.to(device=scores.device, dtype=torch.bool)
    rel = relevance.detach().to(device=scores.device, dtype=scores.dtype).masked_fill(~valid, 0.0)
    if not bool(torch.isfinite(rel).all()) or bool((rel < 0).any()):
        raise ValueError("relevance must be finite gains >= 0 on valid entries")
    s = scores.masked_fill(~valid, 0.0)
    return _Lists(s, rel, valid, (rel > 0).any(dim=1))


def _reduce(per_user: Tensor, lists: _Lists, reduction: Reduction) -> Tensor:
    per_user = torch.where(lists.active, per_user, torch.zeros_like(per_user))
    if reduction == "none":
        return per_user
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r} is out of range: allowed 'mean', 'none'")
    return per_user.sum() / lists.active.sum().clamp_min(1).to(per_user.dtype)


def _discounts(n: int, like: Tensor) -> Tensor:
    """``1 / log2(1 + p)`` for ranks ``p = 1..n``."""
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=like.dtype, device=like.device))


def _ideal_dcg(rel: Tensor, k: int | None) -> Tensor:
    """Ideal DCG(@k) of each row's (masked) gains."""
    g = torch.sort(rel, dim=1, descending=True).values
    if k is not None:
        g = g[:, :k]
    return (g * _discounts(g.shape[1], rel)).sum(dim=1)


def _safe(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def _masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """``log_softmax`` over the valid entries of each row; 0 on invalid entries (and on empty rows)."""
    some = valid.any(dim=1, keepdim=True)
    x = torch.where(some, x.masked_fill(~valid, float("-inf")), torch.zeros_like(x))
    return F.log_softmax(x, dim=1).masked_fill(~valid, 0.0)


def _current_ranks(lists: _Lists) -> Tensor:
    """1-based rank of every valid entry by decreasing score (ties: lower index first); invalid after them."""
    key = lists.s.detach().masked_fill(~lists.valid, float("-inf"))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    u, n = key.shape
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, n + 1, device=order.device).expand(u, n))
    return ranks


def _relevant_entries(lists: _Lists) -> tuple[Tensor, Tensor]:
    """Indices ``(U, P)`` of the relevant (``G > 0``) entries of each row, in list order, padded to the largest
    count ``P`` (>= 1), and their ``(U, P)`` mask. Every pair ``G_i > G_j`` has a relevant ``i``, so the pairwise
    losses only need these ``P`` rows: ``O(U P L)`` instead of ``O(U L^2)`` (P = 10 vs L = 310 in the papers)."""
    relevant = lists.rel > 0
    p = max(int(relevant.sum(dim=1).max()), 1) if relevant.numel() else 1
    idx = torch.argsort((~relevant).to(torch.uint8), dim=1, stable=True)[:, :p]
    return idx, relevant.gather(1, idx)


def _lambda_weights(lists: _Lists, k: int | None, idx: Tensor) -> Tensor:
    """``w[u, a, j] = |Delta NDCG|`` of swapping entry ``idx[u, a]`` with entry ``j``, ``(U, A, L)``."""
    rel, valid = lists.rel, lists.valid
    ranks = _current_ranks(lists)
    inv_d = 1.0 / torch.log2(1.0 + ranks.to(rel.dtype))
    g = rel / _safe(_ideal_dcg(rel, k))[:, None]
    inv_a, g_a = inv_d.gather(1, idx), g.gather(1, idx)
    w = (inv_a[:, :, None] - inv_d[:, None, :]).abs() * (g_a[:, :, None] - g[:, None, :]).abs()
    keep = valid if k is None else valid & (ranks <= k)
    return torch.where(keep.gather(1, idx)[:, :, None] & keep[:, None, :], w, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------------------
# Losses


def ranknet_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    params: RankNetParams | None = None,
    *,
    reduction: Reduction = "mean",
    **overrides: Any,
) -> Tensor:
    """RankNet / BPR: pairwise logistic loss, see :class:`RankNetParams` and the module docstring."""
    p: RankNetParams = _resolve(RankNetParams, params, overrides)
    lists = _prepare(scores, relevance, mask)
    s, rel, valid = lists.s, lists.rel, lists.valid
    idx, is_rel = _relevant_entries(lists)  # the i of every pair
    if p.pairs == "binary":
        pairs = is_rel[:, :, None] & (valid & (rel == 0))[:, None, :]
    else:
        pairs = is_rel[:, :, None] & (rel.gather(1, idx)[:, :, None] > rel[:, None, :]) & valid[:, None, :]
    pair_loss = F.softplus(-p.sigma * (s.gather(1, idx)[:, :, None] - s[:, None, :]))  # -log sigmoid(sigma s_ij)
    total = torch.where(pairs, pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2))
    per_user = total / is_rel.sum(dim=1).clamp_min(1).to(s.dtype)
    return _reduce(per_user, lists, reduction)


def listnet_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    params: ListNetParams | None = None,
    *,
    reduction: Reduction = "mean",
    **overrides: Any,
) -> Tensor:
    """ListNet: cross-entropy between the target top-one distribution and ``softmax(scores)``."""
    p: ListNetParams = _resolve(ListNetParams, params, overrides)
    lists = _prepare(scores, relevance, mask)
    s, rel, valid = lists.s, lists.rel, lists.valid
    if p.label == "rating":
        target = _masked_log_softmax(torch.log2(1.0 + rel), valid).exp() * valid
    else:
        target = rel / _safe(rel.sum(dim=1, keepdim=True))
    if p.eps > 0:
        logp = torch.log(_masked_log_softmax(s, valid).exp() + p.eps).masked_fill(~valid, 0.0)
    else:
        logp = _masked_log_softmax(s, valid)
    return _reduce(-(target * logp).sum(dim=1), lists, reduction)


def listmle_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    params: ListMLEParams | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
    **overrides: Any,
) -> Tensor:
    """ListMLE: Plackett-Luce NLL of the permutation sorting the list by decreasing relevance.

    ``generator`` drives the random tie-breaking of ``ties="random"`` (default: the global RNG); it is not
    used with ``ties="stable"``.
    """
    p: ListMLEParams = _resolve(ListMLEParams, params, overrides)
    lists = _prepare(scores, relevance, mask)
    s, rel, valid = lists.s, lists.rel, lists.valid
    key = rel.masked_fill(~valid, -1.0)  # invalid entries last
    if p.ties == "random":
        noise_device = generator.device if generator is not None else key.device
        noise = torch.rand(key.shape, generator=generator, device=noise_device).to(key.device)
        perm = torch.argsort(noise, dim=1)
        order = perm.gather(1, torch.argsort(key.gather(1, perm), dim=1, descending=True, stable=True))
    else:
        order = torch.argsort(key, dim=1, descending=True, stable=True)
    ss = s.gather(1, order)
    vs = valid.gather(1, order)  # the valid entries come first
    # Invalid (trailing) entries get a finite score 1e4 below every valid one: exp() underflows to exactly 0,
    # so they drop out of the suffix sums without the NaN gradients of -inf in logcumsumexp.
    low = torch.where(valid, s.detach(), torch.full_like(s, float("inf"))).amin(dim=1, keepdim=True)
    low = torch.where(torch.isfinite(low), low - 1e4, torch.zeros_like(low))
    ss = torch.where(vs, ss, low.expand_as(ss))
    if p.eps > 0:
        z = ss - ss.max(dim=1, keepdim=True).values
        suffix = torch.flip(torch.cumsum(torch.flip(z.exp() * vs, dims=[1]), dim=1), dims=[1])
        terms = torch.log(suffix + p.eps) - z
    else:
        terms = torch.flip(torch.logcumsumexp(torch.flip(ss, dims=[1]), dim=1), dims=[1]) - ss
    per_user = torch.where(vs, terms, torch.zeros_like(terms)).sum(dim=1)
    return _reduce(per_user, lists, reduction)


def lambdarank_weights(scores: Tensor, relevance: Tensor, mask: Tensor | None = None, k: int | None = None) -> Tensor:
    """``|Delta NDCG_ij|`` of swapping items i and j in the current ranking, ``(U, L, L)``, no gradient.

    ``w_ij = |1/log2(1 + rank_i) - 1/log2(1 + rank_j)| * |G_i - G_j| / maxDCG(@k)``, ranks by decreasing score
    among the valid entries (ties: lower index first). Zero on the diagonal, on pairs with an invalid entry,
    with ``k`` on pairs not both ranked in the top ``k``, and on rows without relevant items.
    """
    _check_cutoff("lambdarank_weights", "k", k)
    lists = _prepare(scores.detach(), relevance, mask)
    u, n = lists.s.shape
    return _lambda_weights(lists, k, torch.arange(n, device=lists.s.device).expand(u, n))


def lambdarank_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    params: LambdaRankParams | None = None,
    *,
    reduction: Reduction = "mean",
    **overrides: Any,
) -> Tensor:
    """LambdaRank: ``-sum_{G_i > G_j} |Delta NDCG_ij| log2 sigmoid(sigma (s_i - s_j))`` per user.

    The weights (:func:`lambdarank_weights`) come from the current ranking and are constants (not
    differentiated).
    """
    p: LambdaRankParams = _resolve(LambdaRankParams, params, overrides)
    lists = _prepare(scores, relevance, mask)
    s, rel = lists.s, lists.rel
    idx, is_rel = _relevant_entries(lists)  # the i of every pair G_i > G_j
    w = _lambda_weights(lists, p.k, idx)  # computed without gradient (ranks are integers, gains constants)
    pairs = is_rel[:, :, None] & (rel.gather(1, idx)[:, :, None] > rel[:, None, :]) & (w > 0)
    log_prob = F.logsigmoid(p.sigma * (s.gather(1, idx)[:, :, None] - s[:, None, :]))
    per_user = -torch.where(pairs, w * log_prob, torch.zeros_like(log_prob)).sum(dim=(1, 2)) / _LN2
    return _reduce(per_user, lists, reduction)


def approxndcg_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    params: ApproxNDCGParams | None = None,
    *,
    reduction: Reduction = "mean",
    **overrides: Any,
) -> Tensor:
    """ApproxNDCG: ``-NDCG`` with the rank replaced by ``1 + sum_{j != i} sigmoid(alpha (s_j - s_i))``."""
    p: ApproxNDCGParams = _resolve(ApproxNDCGParams, params, overrides)
    lists = _prepare(scores, relevance, mask)
    s, rel, valid = lists.s, lists.rel, lists.valid
    idx, is_rel = _relevant_entries(lists)  # only relevant items contribute to the DCG
    # beats[u, a, j] = sigmoid(alpha (s_j - s_i)) for i = idx[u, a]
    beats = torch.sigmoid(p.alpha * (s[:, None, :] - s.gather(1, idx)[:, :, None]))
    # the j = i term is sigmoid(0) = 1/2, so 1/2 + sum over all valid j = 1 + sum over valid j != i
    approx_rank = 0.5 + torch.where(valid[:, None, :], beats, torch.zeros_like(beats)).sum(dim=2)
    gain = torch.where(is_rel, rel.gather(1, idx), torch.zeros_like(approx_rank))
    dcg = (gain / torch.log2(1.0 + approx_rank)).sum(dim=1)
    return _reduce(-dcg / _safe(_ideal_dcg(rel, None)), lists, reduction)


def _abs_deviation_sums(s: Tensor, valid: Tensor) -> Tensor:
    """``sum_{k valid} |s_i - s_k|`` for every valid ``i`` (0 elsewhere) in ``O(L log L)``: with the valid
    scores sorted increasingly ``v_1 <= ... <= v_n`` and prefix sums ``C_m``, entry ``m`` gets
    ``v_m (2m - n) + C_n - 2 C_m``."""
    order = torch.argsort(s.detach().masked_fill(~valid, float("inf")), dim=1, stable=True)
    v = s.gather(1, order) * valid.gather(1, order)  # valid first, then zeros
    c = torch.cumsum(v, dim=1)
    n = valid.sum(dim=1, keepdim=True)
    m = torch.arange(1, s.shape[1] + 1, device=s.device)[None, :]
    b_sorted = v * (2 * m - n).to(s.dtype) + c[:, -1:] - 2 * c
    return torch.zeros_like(s).scatter(1, order, b_sorted) * valid


def _neural_sort_kernel(s: Tensor, valid: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """NeuralSort matrix ``(U, L, L)`` with the rows of every rank ``1..L`` (rows past ``n`` are meaningless)
    and the ``(U, L)`` mask of the meaningful rows (``r <= n``). ``s`` must be 0 on invalid entries."""
    n_max = s.shape[1]
    n = valid.sum(dim=1, keepdim=True)
    ranks = torch.arange(1, n_max + 1, device=s.device)[None, :]
    scaling = (n + 1 - 2 * ranks).to(s.dtype) / tau  # (U, L) over ranks
    b = _abs_deviation_sums(s, valid) / tau
    # logits[u, r, i] = ((n + 1 - 2r) s_i - b_i) / tau, as one batched rank-1 update
    logits = torch.baddbmm(-b[:, None, :], scaling[:, :, None], s[:, None, :])
    if not bool(valid.all()):
        cols = valid | ~valid.any(dim=1, keepdim=True)  # an empty list keeps finite (unused) rows
        logits = logits.masked_fill(~cols[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=2), ranks <= n


def neural_sort(scores: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """Deterministic NeuralSort relaxation (Grover et al., ICLR 2019): ``(U, L, L)``, row ``r`` = rank r.

    ``Phat[r, i] = softmax_i(((n + 1 - 2r) s_i - sum_k |s_i - s_k|) / tau)`` over the ``n`` valid entries of
    the row, for ranks ``r = 1..n``; rows ``r > n`` and invalid columns are 0 (valid entries need not be
    contiguous). As ``tau -> 0`` it tends to the permutation matrix sorting the scores decreasingly.
    """
    _check_positive("neural_sort", "tau", tau)
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    phat, rows = _neural_sort_kernel(scores.masked_fill(~valid, 0.0), valid, tau)
    return phat.masked_fill(~(rows[:, :, None] & valid[:, None, :]), 0.0)


def _sinkhorn_factors(
    mat: Tensor, rows: Tensor, cols: Tensor, max_iter: int, tol: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Sinkhorn scaling kept in factored form ``diag(x) mat diag(y)``; returns ``(x, y)``, both ``(U, L)``.

    Identical to alternating ``mat / mat.sum(1).clamp_min(eps)`` (columns) and ``mat / mat.sum(2)
    .clamp_min(eps)`` (rows) on ``mat`` with the unmarked rows/columns zeroed, but each step is a batched
    matrix-vector product instead of two passes over ``(U, L, L)`` (and autograd stores ``mat`` once).
    """
    x, y = rows.to(mat.dtype), cols.to(mat.dtype)
    for _ in range(max_iter):
        y = y / (y * torch.bmm(x[:, None, :], mat).squeeze(1)).clamp_min(eps)
        x = x / (x * torch.bmm(mat, y[:, :, None]).squeeze(2)).clamp_min(eps)
        if tol > 0:
            with torch.no_grad():
                # rows sum to 1 after the row step (or to 0 if unmarked/empty); check the columns
                col_sum = y * torch.bmm(x[:, None, :], mat).squeeze(1)
                row_sum = x * torch.bmm(mat, y[:, :, None]).squeeze(2)
                err = torch.maximum(
                    torch.where(cols, (col_sum - 1).abs(), 0.0).amax(dim=1),
                    torch.where(rows, (row_sum - 1).abs(), 0.0).amax(dim=1),
                )
                if err.numel() == 0 or float(err.max()) < tol:
                    break
    return x, y


def _matvec(mat: Tensor, v: Tensor) -> Tensor:
    return torch.bmm(mat, v[:, :, None]).squeeze(2)


def _vecmat(v: Tensor, mat: Tensor) -> Tensor:
    return torch.bmm(v[:, None, :], mat).squeeze(1)


class _SinkhornGain(torch.autograd.Function):
    """``e = diag(x) K diag(y) g`` with ``(x, y)`` the Sinkhorn factors of ``K`` (:func:`_sinkhorn_factors`).

    Same value as autograd through :func:`_sinkhorn_factors`, but the backward pass is written out: the
    adjoints of the ``2T + 1`` matrix-vector products with ``K`` are rank-1 terms, summed by one batched
    ``(L, 2T+1) x (2T+1, L)`` product instead of ``2T + 1`` separate ``(U, L, L)`` outer products (about 10x
    faster for the papers' ``L = 310``). Differentiable once, with respect to ``K`` only.

    Subnormal entries of ``K`` (below ``finfo.tiny``, e.g. 1.2e-38 in float32) are flushed to 0 first: a
    softmax over hundreds of logits produces many, and they slow CPU matrix products down several-fold; the
    value changes by less than ``L * finfo.tiny``.
    """

    @staticmethod
    def forward(ctx, kernel, rows, cols, gain, max_iter, tol, eps):  # type: ignore[override]
        kernel = torch.where(kernel < torch.finfo(kernel.dtype).tiny, 0.0, kernel)
        x, y = rows.to(kernel.dtype), cols.to(kernel.dtype)
        xs, ys, a_s, b_s, c_s, d_s = [x], [y], [], [], [], []
        a = None
        for _ in range(max_iter):
            if a is None:
                a = _vecmat(x, kernel)  # K^T x: column sums are y * a
            c = y * a
            y = y / c.clamp_min(eps)
            b = _matvec(kernel, y)  # row sums are x * b
            d = x * b
            x = x / d.clamp_min(eps)
            xs.append(x), ys.append(y), a_s.append(a), b_s.append(b), c_s.append(c), d_s.append(d)
            a = None
            if tol > 0:
                a = _vecmat(x, kernel)  # reused by the next iteration
                zero = kernel.new_zeros(())
                col_err = torch.where(cols, (y * a - 1).abs(), zero)
                row_err = torch.where(rows, (d / d.clamp_min(eps) - 1).abs(), zero)
                if col_err.numel() == 0 or float(torch.maximum(col_err.amax(), row_err.amax())) < tol:
                    break
        z = y * gain
        h = _matvec(kernel, z)
        ctx.eps = eps
        ctx.save_for_backward(kernel, gain, z, h, *(torch.stack(v) for v in (xs, ys)))
        ctx.steps = (a_s, b_s, c_s, d_s)
        return x * h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        kernel, gain, z, h, xs, ys = ctx.saved_tensors
        a_s, b_s, c_s, d_s = ctx.steps
        eps = ctx.eps
        x_bar = grad_out * h
        h_bar = grad_out * xs[-1]
        lefts, rights = [h_bar], [z]  # K_bar = sum_i lefts[i] (outer) rights[i]
        y_bar = _vecmat(h_bar, kernel) * gain
        for t in range(len(a_s), 0, -1):
            x_t, x_prev, y_t, y_prev = xs[t], xs[t - 1], ys[t], ys[t - 1]
            a, b, c, d = a_s[t - 1], b_s[t - 1], c_s[t - 1], d_s[t - 1]
            # x_t = x_prev / max(d, eps), d = x_prev * b, b = K y_t
            m = d.clamp_min(eps)
            d_bar = torch.where(d >= eps, -x_bar * x_t / m, 0.0)
            x_prev_bar = x_bar / m + d_bar * b
            b_bar = d_bar * x_prev
            lefts.append(b_bar), rights.append(y_t)
            y_bar = y_bar + _vecmat(b_bar, kernel)
            # y_t = y_prev / max(c, eps), c = y_prev * a, a = K^T x_prev
            n = c.clamp_min(eps)
            c_bar = torch.where(c >= eps, -y_bar * y_t / n, 0.0)
            y_prev_bar = y_bar / n + c_bar * a
            a_bar = c_bar * y_prev
            lefts.append(x_prev), rights.append(a_bar)
            x_prev_bar = x_prev_bar + _matvec(kernel, a_bar)
            x_bar, y_bar = x_prev_bar, y_prev_bar
        grad_kernel = torch.bmm(torch.stack(lefts, dim=2), torch.stack(rights, dim=1))
        return grad_kernel, None, None, None, None, None, None


def sinkhorn_scaling(
    mat: Tensor, rows: Tensor, cols: Tensor, max_iter: int = 10, tol: float = 1e-6, eps: float = 1e-10
) -> Tensor:
    """Alternate column then row normalisation of ``(U, L, L)`` non-negative matrices (reference order).

    ``rows``/``cols`` ``(U, L)`` mark the rows/columns of each matrix that should sum to 1 (the others are
    zeroed). Stops after ``max_iter`` iterations or once all marked sums are within ``tol`` of 1 (checked over
    the whole batch, as the reference; ``tol=0`` never stops early). Each clamp uses ``eps``.
    """
    x, y = _sinkhorn_factors(mat, rows, cols, max_iter, tol, eps)
    return x[:, :, None] * mat * y[:, None, :]


def neuralndcg_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    params: NeuralNDCGParams | None = None,
    *,
    reduction: Reduction = "mean",
    **overrides: Any,
) -> Tensor:
    """NeuralNDCG: ``-relaxed NDCG(@K)`` with the Sinkhorn-scaled NeuralSort permutation."""
    p: NeuralNDCGParams = _resolve(NeuralNDCGParams, params, overrides)
    lists = _prepare(scores, relevance, mask)
    s, rel, valid = lists.s, lists.rel, lists.valid
    kernel, rows = _neural_sort_kernel(s, valid, p.tau)
    # relaxed gain at each rank: (diag(x) Phat diag(y) G)_r with (x, y) the Sinkhorn factors of Phat
    expected_gain = _SinkhornGain.apply(kernel, rows, valid, rel, p.sinkhorn_iters, p.sinkhorn_tol, p.eps)
    disc = _discounts(s.shape[1], s)
    if p.k is not None:
        disc = disc.masked_fill(torch.arange(s.shape[1], device=s.device) >= p.k, 0.0)
    dcg = (expected_gain * disc).sum(dim=1)
    return _reduce(-dcg / _safe(_ideal_dcg(rel, p.k)), lists, reduction)


# ------------------------------------------------------------------------------------------------------------
# Registry


BaselineLoss = Callable[..., Tensor]

BASELINE_LOSSES: dict[str, BaselineLoss] = {
    "ranknet": ranknet_loss,
    "listnet": listnet_loss,
    "listmle": listmle_loss,
    "lambdarank": lambdarank_loss,
    "approxndcg": approxndcg_loss,
    "neuralndcg": neuralndcg_loss,
}

BASELINE_PARAMS: dict[str, type] = {
    "ranknet": RankNetParams,
    "listnet": ListNetParams,
    "listmle": ListMLEParams,
    "lambdarank": LambdaRankParams,
    "approxndcg": ApproxNDCGParams,
    "neuralndcg": NeuralNDCGParams,
}


def make_baseline_loss(
    name: str, *, generator: torch.Generator | None = None, **hparams: Any
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """``loss(scores, relevance, mask=None)`` for baseline ``name`` with validated hyper-parameters.

    ``generator`` is only accepted for ``listmle`` (random tie-breaking).
    """
    check_choice("name", name, tuple(BASELINE_LOSSES))
    if generator is not None and name != "listmle":
        raise ValueError(f"generator is only used by 'listmle', not {name!r}")
    params = BASELINE_PARAMS[name](**hparams)
    fn = BASELINE_LOSSES[name]
    extra: dict[str, Any] = {"generator": generator} if name == "listmle" else {}

    def loss(scores: Tensor, relevance: Tensor, mask: Tensor | None = None) -> Tensor:
        return fn(scores, relevance, mask, params, **extra)

    loss.__name__ = f"{name}_loss"
    return loss


def list_targets(batch: ListBatch, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(relevance, mask)`` of a :class:`ListBatch`: gains ``2^r - 1`` (0 for negatives) and validity
    (False on padded positive slots), both ``(B, P + M)``, in ``batch.items``' order."""
    relevance = gains(batch.ratings.to(dtype))
    ones = torch.ones(batch.items.shape[0], batch.num_neg, dtype=torch.bool, device=batch.items.device)
    return relevance, torch.cat([batch.pos_mask, ones], dim=1)
