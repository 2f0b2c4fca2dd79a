"""Federated bilevel tasks on scikit-learn's embedded digits (8x8, 1,797 images; MNIST cannot be downloaded
here), following FedNest's protocols (specs/distributed.md §3):

- ``fed_hyperrep``: hyper-representation. An MLP 64-200-10; x = the body (64 -> 200, ReLU), y = the head
  (200 -> 10). g_i = cross-entropy on client i's training half + (reg / 2) ||y||^2 (squared: strongly convex,
  FedNest defect 4 fixed); f_i = cross-entropy on its validation half. Metric: test accuracy of the server's
  (x, y).
- ``fed_imbalance``: imbalanced loss tuning. The training rows are subsampled to a long tail (class c keeps
  ceil(n_max ratio^(-c / 9)) rows, imbalance ratio 100); y = a linear classifier 64 -> 10; x = class-wise logit
  scale and offset (a, b): g_i = cross-entropy of exp(a_c) z_c + b_c on the imbalanced training rows +
  (reg / 2) ||y||^2, f_i = plain cross-entropy on balanced validation rows. Metrics: test accuracy and
  balanced accuracy on a balanced test set.

Splits (setting ``split``): ``iid`` (random equal parts) or ``noniid`` (FedNest's label shards: sort by label,
cut into M * shards_per_client shards, ``shards_per_client`` per client). In ``fed_hyperrep`` half of each
client's rows are its validation (upper) data. Settings: M = ``num_clients``, n / M = ``participation``
(n = max(floor(C M), 1) clients per communication), the split. One epoch = ceil(M / n) outer iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from mbbo.federated import METHODS
from mbbo.federated.base import FederatedAlgorithm
from mbbo.federated.comm import make_backend
from mbbo.federated.data import ClientBatch, ClientData, FederatedProblem, split_iid, split_label_shards
from mbbo.federated.sampling import participation_count
from mbbo.validation import check_int, check_real

__all__ = ["FedHyperrepSettings", "FedImbalanceSettings", "FederatedEvaluator", "build_hyperrep",
           "build_imbalance", "load_digits_tensors"]

SPLITS = ("iid", "noniid")


def load_digits_tensors(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Digits features scaled to [0, 1] (1797, 64) and labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.as_tensor(digits.data, dtype=dtype) / 16.0, torch.as_tensor(digits.target, dtype=torch.long)


@dataclass
class _CommonSettings:
    num_clients: int = 100
    participation: float = 0.1
    split: str = "iid"
    shards_per_client: int = 2
    reg: float = 0.01
    data_seed: int = 0

    def validate(self) -> None:
        check_int("num_clients", self.num_clients, 1)
        check_real("participation", self.participation, 0.0, 1.0, low_open=True)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        check_int("shards_per_client", self.shards_per_client, 1)
        check_real("reg", self.reg, 0.0, None, low_open=True)


@dataclass
class FedHyperrepSettings(_CommonSettings):
    """M = num_clients, n / M = participation, split iid | noniid (label shards), test_fraction of the digits
    held out for testing, hidden units of the body, reg = strong-convexity weight of the head."""

    test_fraction: float = 0.2
    hidden: int = 200

    def validate(self) -> None:
        super().validate()
        check_real("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("hidden", self.hidden, 1)


@dataclass
class FedImbalanceSettings(_CommonSettings):
    """Imbalanced loss tuning: long-tailed training rows (imbalance ``ratio``), ``val_per_class`` balanced
    validation rows and ``test_per_class`` balanced test rows per class."""

    num_clients: int = 20
    ratio: float = 100.0
    val_per_class: int = 20
    test_per_class: int = 50

    def validate(self) -> None:
        super().validate()
        check_real("ratio", self.ratio, 1.0, None)
        check_int("val_per_class", self.val_per_class, 1)
        check_int("test_per_class", self.test_per_class, 1)


def _split(labels: Tensor, settings: _CommonSettings, g: torch.Generator) -> list[Tensor]:
    if settings.split == "iid":
        return split_iid(len(labels), settings.num_clients, g)
    return split_label_shards(labels, settings.num_clients, settings.shards_per_client, g)


def _weighted_ce(logits: Tensor, batch: ClientBatch) -> Tensor:
    return (F.cross_entropy(logits, batch["label"], reduction="none") * batch["weight"]).sum()


# --- hyper-representation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MLP:
    d_in: int
    hidden: int
    classes: int = 10

    def body(self, x: Tensor, features: Tensor) -> Tensor:
        w = x[: self.hidden * self.d_in].view(self.hidden, self.d_in)
        return torch.relu(features @ w.T + x[self.hidden * self.d_in:])

    def head(self, y: Tensor, h: Tensor) -> Tensor:
        w = y[: self.classes * self.hidden].view(self.classes, self.hidden)
        return h @ w.T + y[self.classes * self.hidden:]

    def logits(self, x: Tensor, y: Tensor, features: Tensor) -> Tensor:
        return self.head(y, self.body(x, features))


def build_hyperrep(settings: FedHyperrepSettings, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> tuple[FederatedProblem, FederatedEvaluator]:
    """The ``fed_hyperrep`` problem and its evaluator."""
    settings.validate()
    features, labels = load_digits_tensors(dtype)
    g = torch.Generator().manual_seed(settings.data_seed)
    perm = torch.randperm(len(labels), generator=g)
    n_test = round(settings.test_fraction * len(labels))
    test, pool = perm[:n_test], perm[n_test:]
    lower_parts, upper_parts = [], []
    for i, rows in enumerate(_split(labels[pool], settings, g)):
        rows = pool[rows][torch.randperm(len(rows), generator=g)]
        half = len(rows) // 2
        if half == 0:
            raise ValueError(f"client {i} has {len(rows)} row(s) after the split: it cannot give half to each "
                             "level; use fewer clients")
        upper_parts.append({"X": features[rows[:half]], "label": labels[rows[:half]]})
        lower_parts.append({"X": features[rows[half:]], "label": labels[rows[half:]]})
    mlp = _MLP(features.shape[1], settings.hidden)
    bound = 1.0 / math.sqrt(mlp.d_in)
    x0 = (torch.rand(mlp.hidden * (mlp.d_in + 1), generator=g, dtype=dtype) * 2 - 1) * bound
    y0 = torch.zeros(mlp.classes * (mlp.hidden + 1), dtype=dtype)
    reg = settings.reg

    def lower(x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        return _weighted_ce(mlp.logits(x, y, batch["X"]), batch) + 0.5 * reg * torch.dot(y, y)

    def upper(x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        return _weighted_ce(mlp.logits(x, y, batch["X"]), batch)

    problem = FederatedProblem(upper, lower, x0.to(device), y0.to(device),
                               ClientData.from_parts(lower_parts, "lower data"),
                               ClientData.from_parts(upper_parts, "upper data"),
                               participation=settings.participation, name="fed_hyperrep")
    return problem, FederatedEvaluator(problem, features[test], labels[test], mlp.logits)


# --- imbalanced loss tuning -----------------------------------------------------------------------------


def build_imbalance(settings: FedImbalanceSettings, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu") -> tuple[FederatedProblem, FederatedEvaluator]:
    """The ``fed_imbalance`` problem and its evaluator."""
    settings.validate()
    features, labels = load_digits_tensors(dtype)
    g = torch.Generator().manual_seed(settings.data_seed)
    classes = int(labels.max()) + 1
    per_class = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    per_class = [rows[torch.randperm(len(rows), generator=g)] for rows in per_class]
    t, v = settings.test_per_class, settings.val_per_class
    n_max = min(len(rows) for rows in per_class) - t - v
    if n_max < 1:
        raise ValueError(f"test_per_class + val_per_class = {t + v} leaves no training rows (a class has "
                         f"{min(len(r) for r in per_class)} rows)")
    keep = [max(1, math.ceil(n_max * settings.ratio ** (-c / (classes - 1)))) for c in range(classes)]
    test = torch.cat([rows[:t] for rows in per_class])
    val = torch.cat([rows[t:t + v] for rows in per_class])
    train = torch.cat([rows[t + v:t + v + k] for rows, k in zip(per_class, keep, strict=True)])
    lower_parts = [{"X": features[train[r]], "label": labels[train[r]]} for r in _split(labels[train], settings, g)]
    upper_parts = [{"X": features[val[r]], "label": labels[val[r]]} for r in _split(labels[val], settings, g)]
    d = features.shape[1]
    reg = settings.reg

    def model(y: Tensor, feats: Tensor) -> Tensor:
        return feats @ y[: classes * d].view(classes, d).T + y[classes * d:]

    def lower(x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        logits = model(y, batch["X"]) * torch.exp(x[:classes]) + x[classes:]
        return _weighted_ce(logits, batch) + 0.5 * reg * torch.dot(y, y)

    def upper(x: Tensor, y: Tensor, batch: ClientBatch) -> Tensor:
        return _weighted_ce(model(y, batch["X"]), batch)

    x0 = torch.zeros(2 * classes, dtype=dtype)
    y0 = torch.zeros(classes * (d + 1), dtype=dtype)
    problem = FederatedProblem(upper, lower, x0.to(device), y0.to(device),
                               ClientData.from_parts(lower_parts, "lower data"),
                               ClientData.from_parts(upper_parts, "upper data"),
                               participation=settings.participation, name="fed_imbalance")
    return problem, FederatedEvaluator(problem, features[test], labels[test], lambda x, y, f: model(y, f))


# --- evaluation -----------------------------------------------------------------------------------------


class FederatedEvaluator:
    """Test accuracy (and balanced accuracy) of the method's evaluation point, the upper objective
    F(x, y) = (1/M) sum_i f_i on the clients' full validation data, and the method's communication counts."""

    def __init__(self, problem: FederatedProblem, test_x: Tensor, test_y: Tensor, logits: Any) -> None:
        self.problem = problem
        self.test_x, self.test_y = test_x, test_y
        self.logits = logits
        self._upper = vmap(problem.upper_loss, in_dims=(None, None, 0))

    def iterations_per_epoch(self, block_batch: int = 1) -> int:
        p = self.problem
        return max(1, math.ceil(p.num_clients / participation_count(p.num_clients, p.participation)))

    @torch.no_grad()
    def evaluate(self, algorithm: Any) -> dict[str, float]:
        x, y = algorithm.evaluation_point()
        pred = self.logits(x, y, self.test_x).argmax(-1)
        correct = (pred == self.test_y).to(x.dtype)
        per_class = [correct[self.test_y == c].mean() for c in self.test_y.unique()]
        clients = torch.arange(self.problem.num_clients)
        objective = self._upper(x, y, self.problem.upper_data.full(clients)).mean()
        return {"test_accuracy": float(correct.mean()), "balanced_accuracy": float(torch.stack(per_class).mean()),
                "objective": float(objective), **algorithm.extra_metrics()}


# --- registration -----------------------------------------------------------------------------------------


def make_federated(name: str, problem: FederatedProblem, evaluator: Any, seed: int, hyper: dict[str, Any]
                   ) -> FederatedAlgorithm:
    """The method on the simulated back-end, or on torch.distributed ranks under torchrun / ``--nproc``."""
    return METHODS[name](problem, seed=seed, backend=make_backend(problem.num_clients), **hyper)


METRICS = ("test_accuracy", "balanced_accuracy", "objective", "comm_rounds", "gossip_rounds", "comm_mbytes",
           "consensus_x", "consensus_y")


def _register() -> None:
    from mbbo.tasks.registry import TaskSpec, register_task

    methods = {name: cls.Config for name, cls in METHODS.items()}
    descriptions = {
        "fed_hyperrep": ("federated hyper-representation on digits (MLP 64-200-10, x = body, y = head), iid or "
                         "label-shard clients: FedNest variants, FedMBO, DSBO; simulated or torch.distributed",
                         FedHyperrepSettings, build_hyperrep),
        "fed_imbalance": ("federated imbalanced loss tuning on digits (class-wise logit scale and offset, "
                          "imbalance ratio 100, linear model): FedNest variants, FedMBO, DSBO",
                          FedImbalanceSettings, build_imbalance),
    }
    for name, (description, settings_cls, builder) in descriptions.items():
        register_task(TaskSpec(name=name, description=description, settings_cls=settings_cls, builder=builder,
                               metrics=METRICS, methods=methods, make_method=make_federated, distributed=True))


_register()
