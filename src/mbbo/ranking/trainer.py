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

Defaults (:class:`TrainerConfig`): the settings of the committed ML-100K experiment
(``experiments/ndcg_ml100k.py``, ``docs/results_ndcg.md``), chosen on the dev split: Adam lr 5e-3, eta0 = 1 and
tau1 = 0.1 for the top-K thresholds. The papers' values (``ndcg.md`` sections 1.3, 1.4), tuned for ML-20M with
541 Adam steps per epoch against ML-100K's 4, leave K-SONG below the popularity ranker in a 30-epoch ML-100K run;
they are one ``--set lr=4e-4 eta0=0.01 tau1=1e-3`` away. The rest follows the papers: L2 weight decay 1e-7 on
non-bias parameters, batch 256 users, 10 positives + 300 negatives, lr x0.25 halfway through ``epochs``
(epoch 60 of 120), K = 20 for the top-K methods (K/N ~ 1.2% on ML-100K, as K = 300 on ML-20M; ``ndcg.md``
section 5), gamma0 0.1, gamma1 0.9, tau2 1e-4, psi = 2 sigmoid(2 t), 'theo', BSVRB eta1 0.2 (the ML-20M log),
gamma_{v,z,s} 0.9, beta_{v,z,s} 0.005, gamma_m 0.01.

Determinism: every random draw (epoch order, positives, negatives, dropout masks) comes from the trainer's
``torch.Generator`` (dropout through a forked global stream seeded from it), and :meth:`state_dict` holds the
model, the optimiser, the objective's tables, the generator state, the epoch order and (BSVRB) the previous
parameters, so that resuming from it is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mbbo.data.movielens import RankingSplit
from mbbo.ranking.metrics import ideal_dcg
from mbbo.ranking.objectives import (
    BSVRBNDCGObjective,
    KSONGObjective,
    SONGObjective,
)
from mbbo.ranking.sampler import ListBatch, ListwiseSampler
from mbbo.steps import Adam, AdamState
from mbbo.validation import check_choice, check_int, check_nonnegative, check_positive, check_unit

__all__ = ["BASELINE_METHODS", "METHODS", "TOPK_METHODS", "RankingTrainer", "TrainerConfig"]

BASELINE_METHODS = ("ranknet", "listnet", "listmle", "lambdarank", "approxndcg", "neuralndcg")
TOPK_METHODS = ("ksong", "bsvrb_ndcg")
METHODS = ("song", *TOPK_METHODS, *BASELINE_METHODS)


@dataclass
class TrainerConfig:
    """Hyper-parameters of :class:`RankingTrainer` (defaults and sources in the module docstring).

    Attributes:
        method: one of :data:`METHODS`.
        lr, weight_decay, betas, adam_eps: Adam (weight decay is coupled L2 on non-bias parameters only).
        batch_size, num_pos, num_neg, few_positives: the list sampler.
        epochs: planned length of the run (sets "halfway" for the learning-rate decay).
        lr_decay: factor applied at each epoch of ``lr_decay_epochs`` (0-based epoch index at which the decayed
            rate starts); ``lr_decay_epochs=None`` means ``(epochs // 2,)``, ``()`` disables the decay.
        topk: K; ``None`` picks 20 for ``ksong``/``bsvrb_ndcg`` and -1 (full list) for ``song``. For ``song`` a
            K >= 1 only truncates the normaliser (``Z_q^K``); for ``bsvrb_ndcg`` -1 is the full-list objective.
        gamma0: SONG/K-SONG moving-average weight of ``u``.
        gamma1, eta0, tau1, tau2, psi_scale, psi_alpha, topk_version, topk_eps: the top-K lower problem.
        margin, list_weighting, init: see :mod:`mbbo.ranking.objectives`.
        eta1, gamma_v, beta_v, gamma_z, beta_z, gamma_s, beta_s, gamma_m: BSVRB.
        baseline: keyword hyper-parameters of the baseline loss (``mbbo.ranking.baselines.BASELINE_PARAMS``).
        seed: seed of the trainer's generator.
    """

    method: str = "song"
    lr: float = 5e-3  # papers: 4e-4 (ML-20M)
    weight_decay: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 256
    num_pos: int = 10
    num_neg: int = 300
    few_positives: str = "replace"
    epochs: int = 120
    lr_decay: float = 0.25
    lr_decay_epochs: tuple[int, ...] | None = None
    topk: int | None = None
    gamma0: float = 0.1
    gamma1: float = 0.9
    eta0: float = 1.0  # papers: 0.01
    tau1: float = 0.1  # papers: 1e-3
    tau2: float = 1e-4
    psi_scale: float = 2.0
    psi_alpha: float = 2.0
    topk_version: str = "theo"
    topk_eps: float = 0.0
    margin: float = 1.0
    list_weighting: str = "uniform"
    init: str = "first_sample"
    eta1: float = 0.2
    gamma_v: float = 0.9
    beta_v: float = 0.005
    gamma_z: float = 0.9
    beta_z: float = 0.005
    gamma_s: float = 0.9
    beta_s: float = 0.005
    gamma_m: float = 0.01
    baseline: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def resolved_topk(self) -> int:
        """K after the method-dependent default."""
        if self.topk is not None:
            return self.topk
        return 20 if self.method in TOPK_METHODS else -1

    def decay_epochs(self) -> tuple[int, ...]:
        """0-based epochs at which the learning rate is multiplied by ``lr_decay``."""
        return (self.epochs // 2,) if self.lr_decay_epochs is None else tuple(self.lr_decay_epochs)

    def validate(self) -> None:
        """Raise ValueError naming the first bad hyper-parameter, its value and the allowed range."""
        check_choice("method", self.method, METHODS)
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        if len(self.betas) != 2 or not all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        check_nonnegative("adam_eps", self.adam_eps)
        check_int("batch_size", self.batch_size, 1)
        check_int("num_pos", self.num_pos, 1)
        check_int("num_neg", self.num_neg, 1)
        check_choice("few_positives", self.few_positives, ("replace", "mask"))
        check_int("epochs", self.epochs, 1)
        check_unit("lr_decay", self.lr_decay)
        for e in self.decay_epochs():
            check_int("lr_decay_epochs", e, 0)
        k = self.resolved_topk()
        if self.method in TOPK_METHODS or k != -1:
            allow_full = self.method in ("song", "bsvrb_ndcg")
            if not (allow_full and k == -1):  # -1: the whole list
                check_int("topk", k, 1)
        check_unit("gamma0", self.gamma0)
        check_unit("gamma1", self.gamma1)
        check_nonnegative("eta0", self.eta0)
        check_positive("tau1", self.tau1)
        check_positive("tau2", self.tau2)
        check_positive("psi_scale", self.psi_scale)
        check_positive("psi_alpha", self.psi_alpha)
        check_choice("topk_version", self.topk_version, ("theo", "prac"))
        if not (isinstance(self.topk_eps, int | float) and 0.0 <= self.topk_eps < 1.0):
            raise ValueError(f"topk_eps={self.topk_eps!r} must be in [0, 1)")
        check_positive("margin", self.margin)
        check_choice("list_weighting", self.list_weighting, ("uniform", "importance"))
        check_choice("init", self.init, ("first_sample", "zero"))
        check_positive("eta1", self.eta1)
        for name in ("gamma_v", "gamma_z", "gamma_s"):
            check_unit(name, getattr(self, name))
        for name in ("beta_v", "beta_z", "beta_s", "gamma_m"):
            check_nonnegative(name, getattr(self, name))
        if not isinstance(self.baseline, Mapping):
            raise ValueError(f"baseline={self.baseline!r} must be a mapping of baseline hyper-parameters")
        if self.baseline and self.method not in BASELINE_METHODS:
            raise ValueError(f"baseline={dict(self.baseline)!r} is only for the methods {BASELINE_METHODS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")


class RankingTrainer:
    """One method trained on one :class:`~mbbo.data.movielens.RankingSplit` (see the module docstring).

    Args:
        model: a scorer ``model(users (B,), items (B, L)) -> (B, L)`` (e.g. a warm-started
            :class:`~mbbo.ranking.neumf.NeuMF`), trained in place.
        split: the data (lists are sampled from ``split.train`` on ``split``'s device).
        config: a :class:`TrainerConfig`; keyword ``overrides`` replace its fields.

    Attributes:
        iteration: number of steps done.
        objective: the SONG/K-SONG/BSVRB objective (None for baselines).
        last_loss: surrogate loss of the last step (the current-model loss for BSVRB); None before the first.
    """

    def __init__(
        self, model: nn.Module, split: RankingSplit, config: TrainerConfig | None = None, **overrides: Any
    ) -> None:
        config = dataclasses.replace(config or TrainerConfig(), **overrides)
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
        self.topk = config.resolved_topk()
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
        if self.method in BASELINE_METHODS:
            from mbbo.ranking.baselines import make_baseline_loss  # lazy: the module is optional for the others

            self._baseline_loss = make_baseline_loss(self.method, **dict(c.baseline))
            return
        k = self.topk
        if k != -1 and k >= n_items:
            raise ValueError(f"topk={k} must be < the number of items {n_items}")
        z = ideal_dcg(split.train, None if k == -1 else k, dtype=torch.float64)
        # users without training items never appear in a batch; keep their Z at 1 so the table is finite
        z = torch.where(z > 0, z, torch.ones_like(z)).to(self.device, self.dtype)
        common = {"margin": c.margin, "list_weighting": c.list_weighting, "init": c.init,
                  "dtype": self.dtype, "device": self.device}
        topk_common = {"eta0": c.eta0, "tau1": c.tau1, "tau2": c.tau2, "psi_scale": c.psi_scale,
                       "psi_alpha": c.psi_alpha, "version": c.topk_version, "topk_eps": c.topk_eps}
        if self.method == "song":
            self.objective = SONGObjective(n_pairs, n_users, n_items, z, gamma0=c.gamma0, **common)
        elif self.method == "ksong":
            self.objective = KSONGObjective(
                n_pairs, n_users, n_items, z, topk=k, gamma0=c.gamma0, gamma1=c.gamma1, **topk_common, **common
            )
        else:
            self.objective = BSVRBNDCGObjective(
                n_pairs, n_users, n_items, z, topk=k, eta1=c.eta1, gamma_v=c.gamma_v, beta_v=c.beta_v,
                gamma_z=c.gamma_z, beta_z=c.beta_z, gamma_s=c.gamma_s, beta_s=c.beta_s, **topk_common, **common,
            )

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
            if loss_prev is not None and prev is not None and self.config.gamma_m > 0:
                names = self._names
                grads = torch.autograd.grad(loss_prev, [prev[n] for n in names], allow_unused=True)
                self.counts["backward"] += 1
                params = dict(self.model.named_parameters())
                for n, g in zip(names, grads, strict=True):
                    p = params[n]
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = -self.config.gamma_m * g
                    else:
                        p.grad.sub_(g, alpha=self.config.gamma_m)
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
