"""Steppable trainers for learning to rank with top-K NDCG: SONG, K-SONG, BSVRB and six baseline losses.

One :meth:`RankingTrainer.step` is one mini-batch: ``batch_size`` users (one list per user per epoch, users in a
fresh random order every epoch), each list ``num_pos`` sampled training items followed by ``num_neg`` uniform
negatives (:class:`~mbbo.ranking.sampler.ListwiseSampler`, the protocol of ``shared/specs/ndcg.md`` section 2),
scored by the model in training mode (dropout), then one Adam step (:class:`mbbo.steps.Adam`, the formulas of
``torch.optim.Adam``, with the coupled L2 weight decay on non-bias parameters only). The trainer satisfies
:class:`mbbo.protocols.SteppableAlgorithm`, so :func:`mbbo.runner.run` drives it.

Methods (:data:`METHODS`):

================  ===========================================================================================
``song``          :class:`~mbbo.ranking.objectives.SONGObjective` (full-list NDCG, ``Z_q``)
``ksong``         :class:`~mbbo.ranking.objectives.KSONGObjective` (top-K, ``Z_q^K``, moving averages)
``bsvrb_ndcg``    :class:`~mbbo.ranking.objectives.BSVRBNDCGObjective` (top-K, MSVR estimators) plus the
                  STORM-type correction: the gradient fed to Adam is ``grad_t(w_t) - gamma_m grad_{t-1}(w_{t-1})``,
                  the second term from a copy of the previous parameters on the same list with the same
                  dropout mask (``torch.func.functional_call``); two forward/backward passes per step
``ranknet`` ...   the baseline losses of :mod:`mbbo.ranking.baselines` (``BASELINE_LOSSES``) on gains
================  ===========================================================================================

Hyper-parameters: one dataclass per method (:mod:`mbbo.ranking.configs`, :data:`METHOD_CONFIGS`), with the shared
training settings in :class:`~mbbo.ranking.configs.TrainingConfig`; the defaults are the settings of the committed
ML-100K experiment (``experiments/ndcg_ml100k.py``, ``docs/results_ndcg.md``), their sources in that module.

Determinism: every random draw (epoch order, positives, negatives, dropout masks) comes from the trainer's
``torch.Generator`` (dropout through a forked global stream seeded from it), and :meth:`state_dict` holds the
model, the optimiser, the objective's tables, the generator state, the epoch order and (BSVRB) the previous
parameters, so that resuming from it is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mbbo.data.movielens import RankingSplit
from mbbo.ranking.configs import (
    BASELINE_METHODS,
    METHOD_CONFIGS,
    METHODS,
    TOPK_METHODS,
    BaselineConfig,
    BSVRBConfig,
    ObjectiveConfig,
    TrainingConfig,
    method_config,
)
from mbbo.ranking.metrics import ideal_dcg
from mbbo.ranking.objectives import BSVRBNDCGObjective, SONGObjective
from mbbo.ranking.sampler import ListBatch, ListwiseSampler
from mbbo.steps import Adam, AdamState

__all__ = ["BASELINE_METHODS", "METHODS", "METHOD_CONFIGS", "TOPK_METHODS", "RankingTrainer", "method_config"]

class RankingTrainer:
    """One method trained on one :class:`~mbbo.data.movielens.RankingSplit` (see the module docstring).

    Args:
        model: a scorer ``model(users (B,), items (B, L)) -> (B, L)`` (e.g. a warm-started
            :class:`~mbbo.ranking.neumf.NeuMF`), trained in place.
        split: the data (lists are sampled from ``split.train`` on ``split``'s device).
        config: the method's config (:data:`METHOD_CONFIGS`, e.g. ``method_config("ksong", eta0=0.5)``), which
            names the method; keyword ``overrides`` replace its fields.

    Attributes:
        iteration: number of steps done.
        objective: the SONG/K-SONG/BSVRB objective (None for baselines).
        last_loss: surrogate loss of the last step (the current-model loss for BSVRB); None before the first.
    """

    def __init__(self, model: nn.Module, split: RankingSplit, config: TrainingConfig, **overrides: Any) -> None:
        if type(config) not in METHOD_CONFIGS.values():
            raise ValueError(f"config={type(config).__name__} must be one of the method configs "
                             f"{sorted(c.__name__ for c in METHOD_CONFIGS.values())}")
        config = dataclasses.replace(config, **overrides)
        config.validate()
        self.config = config
        self.model = model
        self.split = split
        self.method = config.method
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sampler = ListwiseSampler(split.train, config.num_pos, config.num_neg, config.few_positives)  # type: ignore[arg-type]
        self.generator = torch.Generator(device=split.device).manual_seed(config.seed)
        # Adam (mbbo.steps.Adam = torch.optim.Adam's formulas) on the trainable parameters; the coupled L2 weight
        # decay is added to the gradients of the non-bias parameters only (the reference's parameter groups)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._decay = [not n.endswith("bias") for n in self._names]
        self.adam = Adam(lr=self.lr_at, betas=tuple(config.betas), eps=config.adam_eps)  # type: ignore[arg-type]
        self.adam_state: AdamState = self.adam.init([p.detach() for p in self._params()])
        self.topk = config.topk if isinstance(config, ObjectiveConfig) else -1
        self.objective: SONGObjective | None = None
        self._baseline_loss: Any = None
        self._build_loss()
        self.iteration = 0
        self._perm = torch.empty(0, dtype=torch.int64, device=split.device)
        self._pos = 0
        self._prev: dict[str, Tensor] | None = None
        self.last_loss: float | None = None
        self.counts = {"forward": 0, "backward": 0, "scored_pairs": 0, "lists": 0}

    # --- construction -----------------------------------------------------------------------------------------
    def _build_loss(self) -> None:
        c, split = self.config, self.split
        n_pairs, n_users, n_items = split.train.nnz, split.n_users, split.n_items
        if isinstance(c, BaselineConfig):
            from mbbo.ranking.baselines import make_baseline_loss  # lazy: the module is optional for the others

            self._baseline_loss = make_baseline_loss(self.method, **dict(c.baseline))
            return
        assert isinstance(c, ObjectiveConfig)
        k = self.topk
        if k != -1 and k >= n_items:
            raise ValueError(f"topk={k} must be < the number of items {n_items}")
        z = ideal_dcg(split.train, None if k == -1 else k, dtype=torch.float64)
        # users without training items never appear in a batch; keep their Z at 1 so the table is finite
        z = torch.where(z > 0, z, torch.ones_like(z)).to(self.device, self.dtype)
        self.objective = c.objective_class(n_pairs, n_users, n_items, z, **c.objective_kwargs(), dtype=self.dtype,
                                           device=self.device)

    # --- schedule -----------------------------------------------------------------------------------------
    def iterations_per_epoch(self) -> int:
        """``ceil(#users with training items / batch_size)``."""
        return self.sampler.batches_per_epoch(self.config.batch_size)

    @property
    def epoch(self) -> float:
        """Epochs done (fractional)."""
        return self.iteration / self.iterations_per_epoch()

    def lr_at(self, iteration: int) -> float:
        """Learning rate of step ``iteration`` (0-based): ``lr * lr_decay^(#decay epochs <= epoch index)``."""
        epoch = iteration // self.iterations_per_epoch()
        n = sum(1 for e in self.config.decay_epochs() if epoch >= e)
        return self.config.lr * self.config.lr_decay**n

    # --- one step ---------------------------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self._names]

    @torch.no_grad()
    def _adam_step(self) -> None:
        params = self._params()
        wd = self.config.weight_decay
        grads = []
        for p, decay in zip(params, self._decay, strict=True):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            grads.append(g + wd * p if (decay and wd) else g)
        updates, self.adam_state = self.adam.update(grads, self.adam_state)
        for p, u in zip(params, updates, strict=True):
            p.add_(u)
            p.grad = None

    def _next_users(self) -> Tensor:
        if self._pos >= self._perm.numel():
            users = self.sampler.active_users
            order = torch.randperm(users.numel(), generator=self.generator, device=users.device)
            self._perm = users[order]
            self._pos = 0
        chunk = self._perm[self._pos : self._pos + self.config.batch_size]
        self._pos += chunk.numel()
        return chunk

    def _forward(self, batch: ListBatch, seed: int, params: dict[str, Tensor] | None = None) -> Tensor:
        """Scores of the batch in training mode with the dropout masks of ``seed`` (at ``params`` if given)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self.model.train()
            if params is None:
                scores = self.model(batch.users, batch.items)
            else:
                scores = torch.func.functional_call(self.model, params, (batch.users, batch.items))
        self.counts["forward"] += 1
        self.counts["scored_pairs"] += batch.items.numel()
        return scores

    def _loss(self, scores: Tensor, batch: ListBatch) -> Tensor:
        if self._baseline_loss is not None:
            from mbbo.ranking.baselines import list_targets

            relevance, mask = list_targets(batch, scores.dtype)
            return self._baseline_loss(scores, relevance, mask)
        assert self.objective is not None
        return self.objective(scores, batch)

    def step(self) -> float:
        """One mini-batch and one Adam step; returns the surrogate loss of the batch."""
        users = self._next_users()
        batch = self.sampler.sample(users, self.generator).to(self.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        for p in self.model.parameters():
            p.grad = None
        scores = self._forward(batch, seed)
        if self.method == "bsvrb_ndcg":
            assert isinstance(self.objective, BSVRBNDCGObjective)
            prev = self._prev
            scores_prev = None if prev is None else self._forward(batch, seed, prev)
            loss, loss_prev = self.objective(scores, batch, scores_prev)
            loss.backward()
            self.counts["backward"] += 1
            gamma_m = self.config.gamma_m if isinstance(self.config, BSVRBConfig) else 0.0
            if loss_prev is not None and prev is not None and gamma_m > 0:
                names = self._names
                grads = torch.autograd.grad(loss_prev, [prev[n] for n in names], allow_unused=True)
                self.counts["backward"] += 1
                params = dict(self.model.named_parameters())
                for n, g in zip(names, grads, strict=True):
                    p = params[n]
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = -gamma_m * g
                    else:
                        p.grad.sub_(g, alpha=gamma_m)
            self._prev = {
                n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in self.model.named_parameters()
            }
        else:
            loss = self._loss(scores, batch)
            loss.backward()
            self.counts["backward"] += 1
        self._adam_step()
        self.counts["lists"] += batch.users.numel()
        self.iteration += 1
        self.last_loss = float(loss.detach())
        return self.last_loss

    # --- protocol -------------------------------------------------------------------------------------------
    def oracle_counts(self) -> dict[str, int]:
        """Forward passes, backward passes, scored (user, item) pairs and user lists processed so far."""
        return dict(self.counts)

    def is_finite(self) -> bool:
        """The last loss and every model parameter are finite."""
        if self.last_loss is not None and not math.isfinite(self.last_loss):
            return False
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-identical resume needs (tensors are copies)."""
        return {
            "method": self.method,
            "iteration": self.iteration,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "adam": {
                "count": self.adam_state.count,
                "exp_avg": [t.clone() for t in self.adam_state.exp_avg],
                "exp_avg_sq": [t.clone() for t in self.adam_state.exp_avg_sq],
            },
            "objective": None if self.objective is None else self.objective.state_dict(),
            "generator": self.generator.get_state(),
            "perm": self._perm.clone(),
            "pos": self._pos,
            "prev": None if self._prev is None else {k: v.detach().clone() for k, v in self._prev.items()},
            "last_loss": self.last_loss,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["method"] != self.method:
            raise ValueError(f"state is for method {state['method']!r}, this trainer runs {self.method!r}")
        self.model.load_state_dict(state["model"])
        adam = state["adam"]
        params = self._params()
        if len(adam["exp_avg"]) != len(params):
            raise ValueError(f"state has Adam moments for {len(adam['exp_avg'])} tensors, the model has {len(params)}")
        self.adam_state = AdamState(
            int(adam["count"]),
            [t.to(p.device, p.dtype).clone() for t, p in zip(adam["exp_avg"], params, strict=True)],
            [t.to(p.device, p.dtype).clone() for t, p in zip(adam["exp_avg_sq"], params, strict=True)],
        )
        if self.objective is not None:
            self.objective.load_state_dict(state["objective"])
        self.generator.set_state(state["generator"].clone())
        self._perm = state["perm"].to(self.split.device).clone()
        self._pos = int(state["pos"])
        prev = state["prev"]
        self._prev = (
            None
            if prev is None
            else {k: v.to(self.device).clone().requires_grad_(True) for k, v in prev.items()}
        )
        self.iteration = int(state["iteration"])
        self.last_loss = None if state["last_loss"] is None else float(state["last_loss"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
