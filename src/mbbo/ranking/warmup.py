"""Warm-up of the ranking model by listwise cross-entropy with a moving-average denominator.

The pre-training step of SONG/K-SONG (Qiu et al., ICML 2022) and BSVRB (Hu et al., ICML 2023); ReChorus
``Listwise_CE_Loss`` = LibAUC ``ListwiseCELoss`` (``shared/specs/ndcg.md`` section 1.5). For a list with
positives ``i`` and negatives ``j`` (scores ``h``), and one tracked scalar ``u_{q,i}`` per training pair,

    u_{q,i} <- (1 - gamma) u_{q,i} + gamma * mean_j exp(h_j - h_i - M),
    loss     = (1/B) sum_{(q,i) in batch} sum_j (h_j - h_i) * sg[exp(h_j - h_i - M)] / u_{q,i},

with ``M`` the largest margin ``h_j - h_i`` of the batch (a detached shift), ``sg`` stop-gradient and ``B``
the number of lists. When ``u`` equals the mean exactly, the gradient is ``(#neg / B) * grad sum_{(q,i)}
log sum_j exp(h_j - h_i)``, i.e. that of the softmax cross-entropy of the positive against the negatives;
``u`` makes it a consistent stochastic estimate (SONG's moving average applied to the log-partition).

Because ``M`` changes between batches, the reference mixes ``u`` values computed with different shifts.
``shift="none"`` tracks ``log u`` of the unshifted mean instead (exact in log-space, no overflow).

Schedule of the papers: 20 epochs, Adam lr 1e-3, weight decay 1e-7 on non-bias parameters, batches of 256
users, 10 positives + 300 negatives, gamma = 0.1; then the last layer is re-initialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mbbo.data.movielens import RankingSplit
from mbbo.ranking.metrics import evaluate_split
from mbbo.ranking.sampler import FewPositives, ListBatch, ListwiseSampler

__all__ = ["ListwiseCELoss", "WarmupResult", "warmup"]

Shift = Literal["batch_max", "none"]


class ListwiseCELoss:
    """Listwise cross-entropy with a per-pair moving-average denominator (see the module docstring).

    Args:
        num_pairs: number of training pairs (length of the ``u`` table, indexed by pair id).
        gamma: moving-average weight (0.1).
        shift: ``"batch_max"`` (the reference: ``exp(margin - M)`` with the batch max ``M``) or ``"none"``
            (track ``log u`` of the unshifted mean).
        eps: added to ``u`` in the denominator (``"batch_max"`` only; the reference's 1e-10).
        device, dtype: of the table (default CPU / float32; moved to the scores' device and dtype if they
            differ).
    """

    def __init__(
        self,
        num_pairs: int,
        gamma: float = 0.1,
        shift: Shift = "batch_max",
        eps: float = 1e-10,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must be in (0, 1]")
        if shift not in ("batch_max", "none"):
            raise ValueError(f"shift={shift!r} must be 'batch_max' or 'none'")
        if num_pairs < 1:
            raise ValueError(f"num_pairs={num_pairs} must be >= 1")
        self.gamma, self.shift, self.eps = gamma, shift, eps
        fill = 0.0 if shift == "batch_max" else float("-inf")
        #: ``u`` (``shift="batch_max"``) or ``log u`` (``shift="none"``) per pair id
        self.table = torch.full((num_pairs,), fill, device=device, dtype=dtype)

    def state_dict(self) -> dict[str, object]:
        return {"table": self.table.clone(), "gamma": self.gamma, "shift": self.shift, "eps": self.eps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.table = state["table"].clone()  # type: ignore[union-attr]
        self.gamma, self.shift, self.eps = state["gamma"], state["shift"], state["eps"]  # type: ignore[assignment]

    def __call__(self, scores: Tensor, batch: ListBatch) -> Tensor:
        """Loss of one batch (updates ``table`` for the batch's pairs first, as the reference does).

        ``scores``: ``(B, P + M)`` model scores of ``batch.items``.
        """
        p = batch.num_pos
        if self.table.device != scores.device or self.table.dtype != scores.dtype:
            self.table = self.table.to(scores.device, scores.dtype)
        margin = scores[:, p:, None].transpose(1, 2) - scores[:, :p, None]  # (B, P, M): h_j - h_i
        valid = batch.pos_mask.to(scores.device)
        ids = batch.pos_pair_ids.to(scores.device)[valid]
        m = margin.detach()[valid]  # (V, M)
        g = self.gamma
        if self.shift == "batch_max":
            big = m.max() if m.numel() else m.new_zeros(())
            e = torch.exp(m - big)
            self.table[ids] = (1 - g) * self.table[ids] + g * e.mean(dim=1)
            weight = e / (self.table[ids][:, None] + self.eps)
        else:
            log_mean = torch.logsumexp(m, dim=1) - math.log(m.shape[1])
            old = self.table[ids] + (math.log1p(-g) if g < 1 else float("-inf"))
            self.table[ids] = torch.logaddexp(old, log_mean + math.log(g))
            weight = torch.exp(m - self.table[ids][:, None])
        return (margin[valid] * weight).sum() / scores.shape[0]


@dataclass
class WarmupResult:
    """Outcome of :func:`warmup`: per-epoch mean surrogate ``losses``, per-epoch mean listwise
    cross-entropy ``ce = mean_{(q,i)} log sum_j exp(h_j - h_i)`` (the objective being minimised), optional
    per-epoch dev metrics, and the loss state (its ``u`` table)."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    dev_metrics: list[dict[str, float]] = field(default_factory=list)
    loss_state: ListwiseCELoss | None = None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup(
    model: nn.Module,
    split: RankingSplit,
    epochs: int = 20,
    *,
    lr: float = 1e-3,
    weight_decay: float = 1e-7,
    batch_size: int = 256,
    num_pos: int = 10,
    num_neg: int = 300,
    gamma: float = 0.1,
    shift: Shift = "batch_max",
    few_positives: FewPositives = "replace",
    reset_head: bool = True,
    head_init: Literal["torch", "normal"] = "torch",
    generator: torch.Generator | None = None,
    seed: int = 0,
    eval_every: int = 0,
    callback: Callable[[int, nn.Module, dict[str, float]], None] | None = None,
) -> WarmupResult:
    """Train ``model`` (a scorer ``model(users (B,), items (B, L)) -> (B, L)``, e.g.
    :class:`~mbbo.ranking.neumf.NeuMF`) by :class:`ListwiseCELoss` with Adam, then re-initialise its head.

    Args:
        model: trained in place (train mode during the epochs).
        split: the data; lists are sampled from ``split.train`` (on ``split``'s device) and moved to the
            model's device.
        epochs: number of passes, each one list per user (``ceil(#users / batch_size)`` Adam steps).
        lr, weight_decay: Adam; weight decay (L2) on non-bias parameters only (the reference's setting).
        batch_size, num_pos, num_neg, few_positives: see :class:`~mbbo.ranking.sampler.ListwiseSampler`.
        gamma, shift: see :class:`ListwiseCELoss`.
        reset_head, head_init: call ``model.reset_head(generator, init=head_init)`` at the end.
        generator: random stream of the sampler, of the dropout masks (through a forked, seeded global
            stream) and of the head reset, on ``split``'s device; else one seeded with ``seed``.
        eval_every: if > 0, dev NDCG every that many epochs (into ``dev_metrics``, before the head reset).
        callback: called as ``callback(epoch, model, stats)`` after every epoch (stats: loss, ce, and the dev
            metrics when computed).
    """
    if epochs < 0:
        raise ValueError(f"epochs={epochs} must be >= 0")
    if num_neg < 1:
        raise ValueError(f"num_neg={num_neg} must be >= 1 for the listwise cross-entropy")
    if generator is None:
        generator = torch.Generator(device=split.device).manual_seed(seed)
    param = next(model.parameters())
    sampler = ListwiseSampler(split.train, num_pos, num_neg, few_positives)
    loss_fn = ListwiseCELoss(sampler.num_pairs, gamma, shift, device=param.device, dtype=param.dtype)
    opt = torch.optim.Adam(_param_groups(model, weight_decay), lr=lr)
    result = WarmupResult(model=model, loss_state=loss_fn)
    # dropout draws from the global stream: seed it from `generator` inside a fork, so that a run is
    # reproducible from its generator alone and the caller's global random state is left untouched
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng():
        torch.manual_seed(dropout_seed)
        model.train()
        for epoch in range(1, epochs + 1):
            total = ce_total = 0.0
            steps = pairs = 0
            for batch in sampler.epoch(generator, batch_size):
                b = batch.to(param.device)
                scores = model(b.users, b.items)
                loss = loss_fn(scores, b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    s = scores.detach()
                    lse = torch.logsumexp(s[:, num_pos:, None].transpose(1, 2) - s[:, :num_pos, None], dim=2)
                    ce_total += float(lse[b.pos_mask].sum())
                    pairs += int(b.pos_mask.sum())
                total += float(loss.detach())
                steps += 1
            stats = {"loss": total / max(steps, 1), "ce": ce_total / max(pairs, 1)}
            result.losses.append(stats["loss"])
            result.ce.append(stats["ce"])
            if eval_every > 0 and epoch % eval_every == 0:
                metrics = evaluate_split(model, split, "dev")
                result.dev_metrics.append({"epoch": float(epoch), **metrics})
                stats.update(metrics)
            if callback is not None:
                callback(epoch, model, stats)
    if reset_head:
        reset = getattr(model, "reset_head", None)
        if not callable(reset):
            raise TypeError("reset_head=True needs a model with a reset_head(generator, init) method")
        head_gen = generator if generator.device == param.device else None
        reset(head_gen, init=head_init)
    return result
