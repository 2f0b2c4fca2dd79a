"""NDCG surrogates as (multi-block) compositional / bilevel objectives: SONG, K-SONG and BSVRB for NDCG.

Notation (``shared/specs/ndcg.md`` section 1). A query ``q`` is a user, ``S_q`` the ``N`` items of the catalogue,
``S_q^+`` the user's training items with gains ``G_i = 2^{r_i} - 1``, ``h_q(x; w)`` the model's score and
``Z_q`` the ideal DCG of the user's training ratings (``Z_q^K`` cut at ``K`` for the top-K objectives).

**SONG** (Qiu et al., ICML 2022). The rank ``r_q(x_i)`` is replaced by the smooth surrogate ``N g_{q,i}(w)`` with

    g_{q,i}(w) = (1/N) sum_{x in S_q} l(h_q(x) - h_q(x_i)),      l(t) = (t + c)_+^2  (c = ``margin`` = 1),

and NDCG by ``F(w) = (1/|Q|) sum_q (1/Z_q) sum_{i in S_q^+} f_{q,i}(g_{q,i}(w))`` with

    f_{q,i}(g) = -G_i / log2(1 + N g),     f'_{q,i}(g) = G_i N / (ln 2 (1 + N g) log2(1 + N g)^2).

A mini-batch holds ``B`` users, each with a list of ``P`` sampled positives followed by ``M`` negatives
(:class:`~mbbo.ranking.sampler.ListBatch`). ``g`` is estimated on the list, ``g^_{q,i} = sum_x w_x l(h_x - h_i)``
with list weights ``w`` summing to 1 (``"uniform"``: ``1/L``, the reference; ``"importance"``: ``n_q^+/(N P)`` on
positives and ``(N - n_q^+)/(N M)`` on negatives, an unbiased estimate of the mean over the catalogue). Each
training pair ``(q, i)`` keeps a moving average ``u_{q,i} <- (1 - gamma0) u_{q,i} + gamma0 g^_{q,i}`` in a table of
length ``num_pairs`` indexed by the pair id (never a users x items table), and the gradient estimate is the
gradient of

    loss = mean_q [ n_q^+ / Z_q * mean_i( sg[f'(u_{q,i})] g^_{q,i}(w) ) ]         (sg = stop-gradient).

**K-SONG** (top-K NDCG as bilevel compositional optimisation, one 1-D strongly convex lower problem per user):

    min_w (1/|S|) sum_{(q,i)} psi(h_q(x_i) - lambda_q(w)) f_{q,i}(g_{q,i}(w))     (f with Z_q^K),
    lambda_q(w) = argmin_lam L_q(lam) = (K + eps)/N lam + tau2/2 lam^2 + (1/N) sum_x tau1 ln(1 + exp((h_x - lam)/tau1)),

    dL/dlam   = (K + eps)/N + tau2 lam - (1/N) sum_x sigma((h_x - lam)/tau1),
    d2L/dlam2 = tau2 + (1/N) sum_x sigma'((h_x - lam)/tau1) / tau1,                 (a positive scalar)
    grad_w lambda_q = [(1/N) sum_x sigma'((h_x - lam)/tau1)/tau1 grad h_x] / d2L/dlam2,

with ``psi(t) = c sigma(alpha t)`` and its derivative ``psi'(t) = c alpha sigma(alpha t)(1 - sigma(alpha t))``. The
reference code (NDCG-Optimization, LibAUC) omits the factor ``alpha`` in ``psi'``, a defect: its ``psi'`` is the
exact one divided by ``alpha``. ``psi_derivative="reference"`` reproduces it, for comparisons only.
As ``tau1, tau2 -> 0`` the minimiser is the ``(K+1)``-th largest score when ``0 < eps < 1`` (with the reference's
``eps = 0`` a point between the ``(K+1)``-th and the ``K``-th, the minimisers of the unsmoothed problem):
``psi(h_i - lambda_q)`` is a smooth indicator of ``i`` being in the top K.
The per-user state is ``lambda_q``, a moving average ``v_q`` of ``dL/dlam`` (``lambda_q <- lambda_q - eta0 v_q``,
``lambda_step="moving_average"``, the NDCG-Optimization code) and a moving average ``s_q`` of
``d2L/dlam2`` (scalar Hessian tracking: the inverse Hessian is a division).
``lambda_step="plain"`` is LibAUC's plain SGD step ``lambda_q <- lambda_q - eta0 dL/dlam`` on the current sample
(``v_q`` is then unused and stays at 0).
The hypergradient of pair ``(q,i)`` is

    psi f'(u) grad g + f(u) psi'(h_i - lambda_q) (grad h_i - grad lambda_q);

``"theo"`` keeps both terms, ``"prac"`` only the first.

**BSVRB for NDCG** (Hu et al., ICML 2023, ``BSVRB_NDCG_Loss``): ``u_{q,i}`` is the lower variable of the block
problem ``min_u (u - g_{q,i}(w))^2 / 2``; its lower gradient ``u - g`` is tracked by MSVR (Jiang et al., 2022) with
the same list evaluated at the current and the previous model, ``v <- MSVR(v; u - g^_t, u - g^_{t-1})``, then
``u <- max(u - eta1 v, c^2/N)`` (the exact ``g`` is never below ``l(0)/N = c^2/N``). The top-K branch (dead code
in the released file) runs here: ``z_q <- MSVR(z_q; dL/dlam(h_t), dL/dlam(h_{t-1}))``, ``lambda_q <- lambda_q -
eta0 z_q`` and ``s_q <- max(MSVR(s_q; H_t, H_{t-1}), tau2)``. The objective also returns the surrogate of the
*previous* model on the same list, built with the states from before this step, whose gradient the trainer
subtracts (times ``gamma_m``) from the current one before Adam (the STORM-type correction of the reference).
``topk = -1`` gives the full-list objective, which is what the released BSVRB code optimises.

All states live in 1-D tables (``num_pairs`` long per training pair, ``num_users`` long per user) and are read
and written only at the sampled rows (``index_select`` / ``index_copy_``): a step costs O(batch).

Initialisation. ``init="first_sample"`` (default) sets a row from its first sample (``u = g^``; ``lambda_q`` =
exact minimiser of the sampled lower problem; ``v, z`` = first gradient sample; ``s`` = first Hessian sample) and
then applies the ordinary update. ``init="zero"`` starts every table at 0 as the reference does; at ML-100K
scale (a pair is sampled about once in ten epochs) the zero start biases ``u`` for most of the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mbbo.ranking.sampler import ListBatch
from mbbo.trackers import EMA, MSVR
from mbbo.validation import check_choice, check_int, check_nonnegative, check_positive, check_unit

__all__ = [
    "BSVRBNDCGObjective",
    "KSONGObjective",
    "SONGObjective",
    "inner_g",
    "lambda_grad",
    "lambda_hessian",
    "list_weights",
    "ndcg_f",
    "ndcg_f_grad",
    "psi",
    "psi_grad",
    "solve_lambda",
    "squared_hinge",
]

ListWeighting = Literal["uniform", "importance"]
InitMode = Literal["first_sample", "zero"]
TopKVersion = Literal["theo", "prac"]
LambdaStep = Literal["moving_average", "plain"]
PsiDerivative = Literal["exact", "reference"]

_LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def squared_hinge(t: Tensor, margin: float = 1.0) -> Tensor:
    """``l(t) = (t + margin)_+^2``, the rank surrogate of SONG (``t = h_x - h_i``)."""
    return torch.clamp(t + margin, min=0.0).square()


def list_weights(batch: ListBatch, n_items: int, mode: ListWeighting = "uniform") -> Tensor:
    """Weights ``w`` (``(B, L)``, rows summing to 1) of the list items in the estimates of catalogue means.

    ``"uniform"``: ``1/L`` over the valid entries (masked positive slots get 0), the reference.
    ``"importance"``: ``n_q^+ / (N P_q)`` per valid positive and ``(N - n_q^+) / (N M)`` per negative, which makes
    ``sum_x w_x phi(x)`` unbiased for ``(1/N) sum_{x in S_q} phi(x)`` (positives are drawn from ``S_q^+``, negatives
    uniformly from the other items); with ``M = 0`` all weight goes to the positives.
    """
    mask = batch.pos_mask
    p_valid = mask.sum(dim=1, keepdim=True).to(torch.float64)
    m = batch.num_neg
    b = mask.shape[0]
    dev = mask.device
    if mode == "uniform":
        valid = torch.cat([mask, torch.ones(b, m, dtype=torch.bool, device=dev)], dim=1).to(torch.float64)
        return valid / valid.sum(dim=1, keepdim=True)
    if mode == "importance":
        n_pos = batch.num_pos_items.to(dev, torch.float64)[:, None]
        if m == 0:
            w_pos = 1.0 / p_valid
            w_neg = torch.zeros(b, 0, dtype=torch.float64, device=dev)
        else:
            w_pos = n_pos / (n_items * p_valid)
            w_neg = ((n_items - n_pos) / (n_items * m)).expand(b, m)
        return torch.cat([mask.to(torch.float64) * w_pos, w_neg], dim=1)
    raise ValueError(f"list_weighting={mode!r} must be 'uniform' or 'importance'")


def inner_g(scores: Tensor, num_pos: int, weights: Tensor, margin: float = 1.0) -> Tensor:
    """``g^_{q,i} = sum_x w_x l(h_x - h_i)`` for the ``num_pos`` first items ``i`` of each list: ``(B, P)``."""
    pos = scores[:, :num_pos]
    diff = scores[:, None, :] - pos[:, :, None]  # (B, P, L): h_x - h_i
    return (squared_hinge(diff, margin) * weights.to(scores.dtype)[:, None, :]).sum(dim=-1)


def ndcg_f(u: Tensor, gains: Tensor, n_items: int) -> Tensor:
    """``f(u) = -G / log2(1 + N u)`` (the per-pair NDCG surrogate without ``1/Z_q``)."""
    return -gains / torch.log2(1.0 + n_items * u)


def ndcg_f_grad(u: Tensor, gains: Tensor, n_items: int) -> Tensor:
    """``f'(u) = G N / (ln 2 (1 + N u) log2(1 + N u)^2)``."""
    a = 1.0 + n_items * u
    return gains * n_items / (_LN2 * a * torch.log2(a).square())


def psi(t: Tensor, scale: float = 2.0, alpha: float = 2.0) -> Tensor:
    """``psi(t) = scale * sigmoid(alpha t)``, a smooth ``scale * 1[t >= 0]``."""
    return scale * torch.sigmoid(alpha * t)


def psi_grad(t: Tensor, scale: float = 2.0, alpha: float = 2.0, form: PsiDerivative = "exact") -> Tensor:
    """``psi'(t) = scale * alpha * sigmoid(alpha t) (1 - sigmoid(alpha t))`` (``form="exact"``).

    ``form="reference"``: ``scale * sigmoid(alpha t) (1 - sigmoid(alpha t))``, the reference code's ``psi'``
    without the factor ``alpha`` -- a defect of the reference (not the derivative of ``psi`` unless
    ``alpha = 1``), kept only to compare with it.
    """
    check_choice("psi_derivative", form, ("exact", "reference"))
    s = torch.sigmoid(alpha * t)
    return scale * (alpha if form == "exact" else 1.0) * s * (1.0 - s)


def lambda_grad(
    scores: Tensor, lam: Tensor, weights: Tensor, topk: int, n_items: int, tau1: float, tau2: float, eps: float = 0.0
) -> Tensor:
    """``dL_q/dlam = (K + eps)/N + tau2 lam - sum_x w_x sigmoid((h_x - lam)/tau1)``: ``(B,)``."""
    z = (scores - lam[:, None]) / tau1
    return (topk + eps) / n_items + tau2 * lam - (weights.to(scores.dtype) * torch.sigmoid(z)).sum(dim=1)


def _sigma_prime_over_tau(scores: Tensor, lam: Tensor, tau1: float) -> Tensor:
    s = torch.sigmoid((scores - lam[:, None]) / tau1)
    return s * (1.0 - s) / tau1


def lambda_hessian(scores: Tensor, lam: Tensor, weights: Tensor, tau1: float, tau2: float) -> Tensor:
    """``d2L_q/dlam2 = tau2 + sum_x w_x sigmoid'((h_x - lam)/tau1) / tau1``: ``(B,)``, always ``>= tau2``."""
    return tau2 + (weights.to(scores.dtype) * _sigma_prime_over_tau(scores, lam, tau1)).sum(dim=1)


@torch.no_grad()
def solve_lambda(
    scores: Tensor,
    weights: Tensor,
    topk: int,
    n_items: int,
    tau1: float,
    tau2: float,
    eps: float = 0.0,
    iterations: int = 100,
) -> Tensor:
    """The exact minimiser of each row's lower problem ``L_q`` (bisection on its increasing derivative).

    Computed in float64 and returned in ``scores.dtype``: ``(B,)``. The bracket starts at the score range
    (padded by ``50 tau1``) and is widened until the derivative changes sign.
    """
    h = scores.detach().to(torch.float64)
    w = weights.to(torch.float64)

    def d(lam: Tensor) -> Tensor:
        return lambda_grad(h, lam, w, topk, n_items, tau1, tau2, eps)

    lo = h.min(dim=1).values - 50 * tau1
    hi = h.max(dim=1).values + 50 * tau1
    span = (hi - lo).clamp_min(1.0)
    for _ in range(200):
        bad_lo, bad_hi = d(lo) > 0, d(hi) < 0
        if not bool(bad_lo.any() or bad_hi.any()):
            break
        lo = torch.where(bad_lo, lo - span, lo)
        hi = torch.where(bad_hi, hi + span, hi)
        span = span * 2
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        pos = d(mid) > 0
        hi = torch.where(pos, mid, hi)
        lo = torch.where(pos, lo, mid)
    return (0.5 * (lo + hi)).to(scores.dtype)


# ------------------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------------------
# Stateful objectives


class _TableObjective:
    """Shared machinery: named 1-D state tables, O(batch) gather/scatter, state dicts."""

    _pair_tables: tuple[str, ...] = ()
    _user_tables: tuple[str, ...] = ()

    def __init__(
        self,
        num_pairs: int,
        num_users: int,
        n_items: int,
        ideal_dcg: Tensor,
        *,
        margin: float,
        list_weighting: ListWeighting,
        init: InitMode,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        check_int("num_pairs", num_pairs, 1)
        check_int("num_users", num_users, 1)
        check_int("n_items", n_items, 2)
        check_positive("margin", margin)
        check_choice("list_weighting", list_weighting, ("uniform", "importance"))
        check_choice("init", init, ("first_sample", "zero"))
        ideal_dcg = torch.as_tensor(ideal_dcg)
        if ideal_dcg.shape != (num_users,):
            raise ValueError(f"ideal_dcg has shape {tuple(ideal_dcg.shape)}, expected ({num_users},)")
        self.num_pairs, self.num_users, self.n_items = num_pairs, num_users, n_items
        self.margin, self.list_weighting, self.init = float(margin), list_weighting, init
        self.ideal_dcg = ideal_dcg.to(device, dtype)
        self.tables: dict[str, Tensor] = {}
        for name in self._pair_tables:
            self.tables[name] = torch.zeros(num_pairs, dtype=dtype, device=device)
        for name in self._user_tables:
            self.tables[name] = torch.zeros(num_users, dtype=dtype, device=device)
        if self._pair_tables:
            self.tables["pair_seen"] = torch.zeros(num_pairs, dtype=torch.bool, device=device)
        if self._user_tables:
            self.tables["user_seen"] = torch.zeros(num_users, dtype=torch.bool, device=device)

    # --- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All tables (cloned)."""
        return {"tables": {k: v.clone() for k, v in self.tables.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tables = state["tables"]
        if set(tables) != set(self.tables):
            raise ValueError(f"state has tables {sorted(tables)}, expected {sorted(self.tables)}")
        for k, v in tables.items():
            if v.shape != self.tables[k].shape:
                raise ValueError(f"table {k!r} has shape {tuple(v.shape)}, expected {tuple(self.tables[k].shape)}")
            self.tables[k] = v.to(self.tables[k].device, self.tables[k].dtype).clone()

    def table_sizes(self) -> dict[str, int]:
        """Length of every state table (pair tables: ``num_pairs``; user tables: ``num_users``)."""
        return {k: v.numel() for k, v in self.tables.items()}

    # --- helpers -------------------------------------------------------------------------------------------
    def _match(self, scores: Tensor) -> None:
        """Move the tables to the scores' device / floating dtype (once)."""
        for k, v in self.tables.items():
            want = torch.bool if v.dtype == torch.bool else scores.dtype
            if v.device != scores.device or v.dtype != want:
                self.tables[k] = v.to(scores.device, want)
        if self.ideal_dcg.device != scores.device or self.ideal_dcg.dtype != scores.dtype:
            self.ideal_dcg = self.ideal_dcg.to(scores.device, scores.dtype)

    @staticmethod
    def _scatter_pairs(table: Tensor, ids: Tensor, values: Tensor) -> None:
        """``table[ids] = values`` for flat ``ids``; duplicated ids get the mean of their values (deterministic)."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        if uniq.numel() == ids.numel():
            table.index_copy_(0, ids, values.to(table.dtype))
            return
        sums = torch.zeros(uniq.numel(), dtype=values.dtype, device=values.device).index_add_(0, inv, values)
        counts = torch.bincount(inv, minlength=uniq.numel()).to(values.dtype)
        table.index_copy_(0, uniq, (sums / counts).to(table.dtype))

    def _pairs(self, batch: ListBatch) -> tuple[Tensor, Tensor]:
        """Flat valid pair ids and the (B, P) mask."""
        mask = batch.pos_mask
        return batch.pos_pair_ids[mask], mask

    def _unflatten(self, flat: Tensor, mask: Tensor) -> Tensor:
        """(V,) values of the valid slots -> (B, P) (invalid slots: the row's first valid value)."""
        out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
        out[mask] = flat
        first = out.gather(1, mask.to(torch.int64).argmax(dim=1, keepdim=True)).expand_as(out)
        return torch.where(mask, out, first)

    def _weights(self, batch: ListBatch, scores: Tensor) -> Tensor:
        return list_weights(batch, self.n_items, self.list_weighting).to(scores.device, scores.dtype)

    def _floor_u(self) -> float:
        """``l(0) / N = c^2 / N``: the exact ``g`` never lies below it."""
        return self.margin**2 / self.n_items

    def _reduce(self, per_pair: Tensor, batch: ListBatch) -> Tensor:
        """``mean_q [ n_q^+ / Z_q * mean_{valid i} per_pair[q, i] ]``."""
        mask = batch.pos_mask.to(per_pair.dtype)
        mean_i = (per_pair * mask).sum(dim=1) / mask.sum(dim=1)
        users = batch.users
        n_pos = batch.num_pos_items.to(per_pair.device, per_pair.dtype)
        return (n_pos * mean_i / self.ideal_dcg.index_select(0, users)).mean()


class SONGObjective(_TableObjective):
    """SONG: NDCG surrogate with one moving average ``u_{q,i}`` per training pair (see the module docstring).

    Args:
        num_pairs: number of training pairs (length of ``u``, indexed by pair id).
        num_users: number of users (rows of ``ideal_dcg``).
        n_items: catalogue size ``N``.
        ideal_dcg: ``(num_users,)`` ideal DCG ``Z_q`` of each user's training ratings.
        gamma0: moving-average weight of ``u`` in (0, 1] (0.1 on ML-20M, 0.3 on Netflix).
        margin: ``c`` of the squared hinge (1).
        list_weighting, init: see the module docstring.

    Calling the objective on ``(scores (B, L), batch)`` updates ``u`` at the batch's pairs and returns the
    surrogate loss whose gradient is SONG's gradient estimate.
    """

    _pair_tables = ("u",)

    def __init__(
        self,
        num_pairs: int,
        num_users: int,
        n_items: int,
        ideal_dcg: Tensor,
        *,
        gamma0: float = 0.1,
        margin: float = 1.0,
        list_weighting: ListWeighting = "uniform",
        init: InitMode = "first_sample",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        check_unit("gamma0", gamma0)
        super().__init__(
            num_pairs, num_users, n_items, ideal_dcg, margin=margin, list_weighting=list_weighting, init=init,
            dtype=dtype, device=device,
        )
        self.gamma0 = float(gamma0)
        self.tracker = EMA(self.gamma0)

    def _update_u(self, g_hat: Tensor, batch: ListBatch) -> Tensor:
        """EMA update of ``u`` at the batch's pairs; returns the new ``u`` as (B, P)."""
        ids, mask = self._pairs(batch)
        u = self.tables["u"]
        seen = self.tables["pair_seen"]
        g_flat = g_hat.detach()[mask]
        old = u.index_select(0, ids)
        if self.init == "first_sample":
            old = torch.where(seen.index_select(0, ids), old, g_flat)
        new = self.tracker.update(old, g_flat)
        self._scatter_pairs(u, ids, new)
        seen.index_fill_(0, ids, True)
        return self._unflatten(u.index_select(0, ids), mask)

    def __call__(self, scores: Tensor, batch: ListBatch) -> Tensor:
        self._match(scores)
        p = batch.num_pos
        g_hat = inner_g(scores, p, self._weights(batch, scores), self.margin)
        u = self._update_u(g_hat, batch)
        df = ndcg_f_grad(u, batch.pos_gains.to(scores.dtype), self.n_items)
        return self._reduce(df.detach() * g_hat, batch)


class KSONGObjective(SONGObjective):
    """K-SONG: top-K NDCG with one strongly convex 1-D lower problem (threshold ``lambda_q``) per user.

    Args (besides :class:`SONGObjective`'s; ``ideal_dcg`` should be ``Z_q^K``):
        topk: ``K >= 1``.
        gamma1: moving-average weight of the per-user trackers ``v_q`` (lambda gradient) and ``s_q`` (Hessian).
        eta0: step size of ``lambda_q``.
        tau1, tau2: smoothing (softplus temperature) and strong convexity of the lower problem.
        psi_scale, psi_alpha: ``psi(t) = psi_scale * sigmoid(psi_alpha t)``.
        version: ``"theo"`` (both hypergradient terms) or ``"prac"`` (``psi``-weighted SONG term only).
        topk_eps: the ``eps`` of ``(K + eps)/N`` (0 in the reference code; in (0, 1) the threshold tends to the
            (K+1)-th largest score).
        lambda_step: ``"moving_average"`` (``lambda_q <- lambda_q - eta0 v_q``, the NDCG-Optimization code) or
            ``"plain"`` (``lambda_q <- lambda_q - eta0 dL/dlam`` on the current sample, LibAUC).
        psi_derivative: ``"exact"`` or ``"reference"`` (the reference code's ``psi'`` without the factor
            ``psi_alpha``: a defect kept only for comparison, see :func:`psi_grad`).

    mbbo's defaults (``init="first_sample"``, ``lambda_step="moving_average"``, ``psi_derivative="exact"``) are
    *mbbo's K-SONG variant*; ``init="zero", lambda_step="plain", psi_derivative="reference"`` is the reference
    form (LibAUC 2.0.1's update with the NDCG-Optimization code's ``psi = 2 sigmoid(2 t)``).
    """

    _user_tables = ("lam", "v", "s")

    def __init__(
        self,
        num_pairs: int,
        num_users: int,
        n_items: int,
        ideal_dcg: Tensor,
        *,
        topk: int = 20,
        gamma0: float = 0.1,
        gamma1: float = 0.9,
        eta0: float = 0.01,
        tau1: float = 1e-3,
        tau2: float = 1e-4,
        psi_scale: float = 2.0,
        psi_alpha: float = 2.0,
        version: TopKVersion = "theo",
        topk_eps: float = 0.0,
        lambda_step: LambdaStep = "moving_average",
        psi_derivative: PsiDerivative = "exact",
        margin: float = 1.0,
        list_weighting: ListWeighting = "uniform",
        init: InitMode = "first_sample",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("topk", topk, 1)
        if topk >= n_items:
            raise ValueError(f"topk={topk} must be < n_items={n_items}")
        check_unit("gamma1", gamma1)
        check_nonnegative("eta0", eta0)
        check_positive("tau1", tau1)
        check_positive("tau2", tau2)
        check_positive("psi_scale", psi_scale)
        check_positive("psi_alpha", psi_alpha)
        check_choice("version", version, ("theo", "prac"))
        check_choice("lambda_step", lambda_step, ("moving_average", "plain"))
        check_choice("psi_derivative", psi_derivative, ("exact", "reference"))
        if not (isinstance(topk_eps, int | float) and 0.0 <= topk_eps < 1.0):
            raise ValueError(f"topk_eps={topk_eps!r} must be in [0, 1)")
        super().__init__(
            num_pairs, num_users, n_items, ideal_dcg, gamma0=gamma0, margin=margin, list_weighting=list_weighting,
            init=init, dtype=dtype, device=device,
        )
        self.topk, self.gamma1, self.eta0 = int(topk), float(gamma1), float(eta0)
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.psi_scale, self.psi_alpha = float(psi_scale), float(psi_alpha)
        self.version, self.topk_eps = version, float(topk_eps)
        self.lambda_step, self.psi_derivative = lambda_step, psi_derivative
        self.user_tracker = EMA(self.gamma1)

    # --- the lower problem ------------------------------------------------------------------------------------
    def _grad_lam(self, scores: Tensor, lam: Tensor, w: Tensor) -> Tensor:
        return lambda_grad(scores, lam, w, self.topk, self.n_items, self.tau1, self.tau2, self.topk_eps)

    def _hess_lam(self, scores: Tensor, lam: Tensor, w: Tensor) -> Tensor:
        return lambda_hessian(scores, lam, w, self.tau1, self.tau2)

    def _current_lambda(self, scores: Tensor, w: Tensor, users: Tensor) -> Tensor:
        """``lambda_q`` of the batch's users; rows never seen are initialised (``init="first_sample"``: exact
        minimiser of the sampled lower problem) and written back."""
        lam = self.tables["lam"].index_select(0, users)
        if self.init == "first_sample":
            fresh = ~self.tables["user_seen"].index_select(0, users)
            if bool(fresh.any()):
                solved = solve_lambda(scores, w, self.topk, self.n_items, self.tau1, self.tau2, self.topk_eps)
                lam = torch.where(fresh, solved, lam)
                self.tables["lam"].index_copy_(0, users, lam)
        return lam

    def _track(self, name: str, users: Tensor, new: Tensor, old: Tensor | None, tracker: EMA | MSVR) -> Tensor:
        """Update a per-user tracker (``first_sample``: unseen rows start at ``new``); returns the new values."""
        prev = self.tables[name].index_select(0, users)
        if self.init == "first_sample":
            seen = self.tables["user_seen"].index_select(0, users)
            prev = torch.where(seen, prev, new)
        value = tracker.update(prev, new, new if old is None else old)
        self.tables[name].index_copy_(0, users, value)
        return value

    def _topk_terms(
        self, scores: Tensor, g_hat: Tensor, u: Tensor, lam: Tensor, s: Tensor, w: Tensor, batch: ListBatch
    ) -> Tensor:
        """Per-pair surrogate ``sg[psi f'(u)] g^ + sg[psi' f(u)] (h_i - sum_x sg[w_x sigma'_x/tau1] h_x / s)``."""
        p = batch.num_pos
        gains = batch.pos_gains.to(scores.dtype)
        h = scores.detach()
        t = h[:, :p] - lam[:, None]
        weight = psi(t, self.psi_scale, self.psi_alpha) * ndcg_f_grad(u, gains, self.n_items)
        term = weight.detach() * g_hat
        if self.version == "theo":
            coef = psi_grad(t, self.psi_scale, self.psi_alpha, self.psi_derivative) * ndcg_f(u, gains, self.n_items)
            hw = w * _sigma_prime_over_tau(h, lam, self.tau1)  # (B, L)
            grad_lam_surrogate = (hw.detach() * scores).sum(dim=1) / s.detach()  # value-free: only its gradient
            term = term + coef.detach() * (scores[:, :p] - grad_lam_surrogate[:, None])
        return term

    def __call__(self, scores: Tensor, batch: ListBatch) -> Tensor:
        self._match(scores)
        p = batch.num_pos
        users = batch.users.to(scores.device)
        w = self._weights(batch, scores)
        g_hat = inner_g(scores, p, w, self.margin)
        u = self._update_u(g_hat, batch)
        h = scores.detach()
        lam = self._current_lambda(h, w, users)
        # trackers of the lower gradient and Hessian at the current lambda; lambda steps after (LibAUC order)
        grad = self._grad_lam(h, lam, w)
        step = self._track("v", users, grad, None, self.user_tracker) if self.lambda_step == "moving_average" else grad
        s = self._track("s", users, self._hess_lam(h, lam, w), None, self.user_tracker).clamp_min(self.tau2)
        self.tables["s"].index_copy_(0, users, s)
        self.tables["lam"].index_copy_(0, users, lam - self.eta0 * step)
        self.tables["user_seen"].index_fill_(0, users, True)
        return self._reduce(self._topk_terms(scores, g_hat, u, lam, s, w, batch), batch)


class BSVRBNDCGObjective(KSONGObjective):
    """BSVRB for (top-K) NDCG: MSVR estimators for ``u`` (lower variable of ``(u - g)^2/2``), the lambda
    gradient and the scalar Hessian, evaluated on the same list at the current and the previous model.

    Args (besides :class:`KSONGObjective`'s; ``topk = -1`` is the full-list objective with ``Z_q``):
        eta1: step size of ``u`` (0.2 in the ML-20M log; 0.4 in ``run_ml_bsvrb.sh``).
        gamma_v, beta_v: MSVR weights ``(alpha, gamma)`` of the lower gradient of ``u`` (0.9, 0.005).
        gamma_z, beta_z: MSVR weights of the lambda gradient (0.9, 0.005).
        gamma_s, beta_s: MSVR weights of the lambda Hessian (0.9, 0.005).

    ``objective(scores, batch, scores_prev)`` returns ``(loss, loss_prev)``: the surrogate at the current model
    (after the estimator updates) and, when ``scores_prev`` (the previous model's scores of the same list, with
    their own graph) is given, the surrogate at the previous model with the states from before this step.
    """

    _pair_tables = ("u", "v")
    _user_tables = ("lam", "z", "s")

    def __init__(
        self,
        num_pairs: int,
        num_users: int,
        n_items: int,
        ideal_dcg: Tensor,
        *,
        topk: int = 20,
        eta1: float = 0.2,
        gamma_v: float = 0.9,
        beta_v: float = 0.005,
        eta0: float = 0.01,
        gamma_z: float = 0.9,
        beta_z: float = 0.005,
        gamma_s: float = 0.9,
        beta_s: float = 0.005,
        tau1: float = 1e-3,
        tau2: float = 1e-4,
        psi_scale: float = 2.0,
        psi_alpha: float = 2.0,
        version: TopKVersion = "theo",
        topk_eps: float = 0.0,
        margin: float = 1.0,
        list_weighting: ListWeighting = "uniform",
        init: InitMode = "first_sample",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if topk != -1:
            check_int("topk", topk, 1)
        for name, value in (("gamma_v", gamma_v), ("gamma_z", gamma_z), ("gamma_s", gamma_s)):
            check_unit(name, value)
        for name, value in (("beta_v", beta_v), ("beta_z", beta_z), ("beta_s", beta_s)):
            check_nonnegative(name, value)
        check_positive("eta1", eta1)
        self.full_list = topk == -1
        super().__init__(
            num_pairs, num_users, n_items, ideal_dcg, topk=1 if self.full_list else topk, gamma0=1.0, gamma1=1.0,
            eta0=eta0, tau1=tau1, tau2=tau2, psi_scale=psi_scale, psi_alpha=psi_alpha, version=version,
            topk_eps=topk_eps, margin=margin, list_weighting=list_weighting, init=init, dtype=dtype, device=device,
        )
        if self.full_list:
            self.topk = -1
            for name in (*self._user_tables, "user_seen"):
                self.tables[name] = self.tables[name][:0]  # no per-user state for the full-list objective
        self.eta1 = float(eta1)
        self.msvr_v = MSVR(float(gamma_v), float(beta_v))
        self.msvr_z = MSVR(float(gamma_z), float(beta_z))
        self.msvr_s = MSVR(float(gamma_s), float(beta_s))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)

    def _update_lower_u(self, g_hat: Tensor, g_prev: Tensor | None, batch: ListBatch) -> tuple[Tensor, Tensor]:
        """MSVR step on ``u``; returns ``(u before, u after)`` as (B, P)."""
        ids, mask = self._pairs(batch)
        u_tab, v_tab, seen_tab = self.tables["u"], self.tables["v"], self.tables["pair_seen"]
        g_new = g_hat.detach()[mask]
        u = u_tab.index_select(0, ids)
        v = v_tab.index_select(0, ids)
        if self.init == "first_sample":
            seen = seen_tab.index_select(0, ids)
            u = torch.where(seen, u, g_new)
        grad_new = u - g_new
        grad_old = grad_new if g_prev is None else u - g_prev.detach()[mask]
        if self.init == "first_sample":
            v = torch.where(seen, v, grad_new)
        v = self.msvr_v.update(v, grad_new, grad_old)
        u_after = (u - self.eta1 * v).clamp_min(self._floor_u())
        self._scatter_pairs(v_tab, ids, v)
        self._scatter_pairs(u_tab, ids, u_after)
        seen_tab.index_fill_(0, ids, True)
        return self._unflatten(u, mask), self._unflatten(u_tab.index_select(0, ids), mask)

    def _full_list_terms(self, g_hat: Tensor, u: Tensor, batch: ListBatch) -> Tensor:
        df = ndcg_f_grad(u, batch.pos_gains.to(g_hat.dtype), self.n_items)
        return df.detach() * g_hat

    def __call__(  # type: ignore[override]
        self, scores: Tensor, batch: ListBatch, scores_prev: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        self._match(scores)
        p = batch.num_pos
        users = batch.users.to(scores.device)
        w = self._weights(batch, scores)
        g_hat = inner_g(scores, p, w, self.margin)
        g_prev = None if scores_prev is None else inner_g(scores_prev, p, w, self.margin)
        u_before, u_after = self._update_lower_u(g_hat, g_prev, batch)
        if self.full_list:
            loss = self._reduce(self._full_list_terms(g_hat, u_after, batch), batch)
            loss_prev = None
            if scores_prev is not None:
                assert g_prev is not None
                loss_prev = self._reduce(self._full_list_terms(g_prev, u_before, batch), batch)
            return loss, loss_prev
        h = scores.detach()
        h_prev = None if scores_prev is None else scores_prev.detach()
        lam = self._current_lambda(h, w, users)
        s_before = self.tables["s"].index_select(0, users)
        if self.init == "first_sample":
            s_before = torch.where(
                self.tables["user_seen"].index_select(0, users), s_before, self._hess_lam(h, lam, w)
            )
        s_before = s_before.clamp_min(self.tau2)
        z_old = None if h_prev is None else self._grad_lam(h_prev, lam, w)
        s_old = None if h_prev is None else self._hess_lam(h_prev, lam, w)
        z = self._track("z", users, self._grad_lam(h, lam, w), z_old, self.msvr_z)
        s = self._track("s", users, self._hess_lam(h, lam, w), s_old, self.msvr_s).clamp_min(self.tau2)
        self.tables["s"].index_copy_(0, users, s)
        self.tables["lam"].index_copy_(0, users, lam - self.eta0 * z)
        self.tables["user_seen"].index_fill_(0, users, True)
        loss = self._reduce(self._topk_terms(scores, g_hat, u_after, lam, s, w, batch), batch)
        loss_prev = None
        if scores_prev is not None:
            assert g_prev is not None
            loss_prev = self._reduce(self._topk_terms(scores_prev, g_prev, u_before, lam, s_before, w, batch), batch)
        return loss, loss_prev
