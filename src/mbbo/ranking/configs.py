"""Hyper-parameters of the ranking methods: one dataclass per method, the shared training settings in one base.

:class:`TrainingConfig` holds what every method shares (Adam, the list sampler, the schedule, the seed); each
method's class adds its own fields (:data:`METHOD_CONFIGS`, name -> class):

================  ======================  ===================================================================
``song``          :class:`SONGConfig`     :class:`~mbbo.ranking.objectives.SONGObjective`
``ksong``         :class:`KSONGConfig`    :class:`~mbbo.ranking.objectives.KSONGObjective`
``bsvrb_ndcg``    :class:`BSVRBConfig`    :class:`~mbbo.ranking.objectives.BSVRBNDCGObjective` + ``gamma_m``
``ranknet`` ...   :class:`RankNetConfig`  a baseline loss of :mod:`mbbo.ranking.baselines` (``baseline`` holds
                  ...                     its keyword hyper-parameters, validated by its ``*Params`` class)
================  ======================  ===================================================================

Defaults are declared once. An objective's hyper-parameter takes the default of the objective's own signature
(:func:`_objective_default`), except where the ML-100K experiment (``experiments/ndcg_ml100k.py``,
``docs/results_ndcg.md``) chose another value on the dev split, which is declared here with the papers' value in a
comment: Adam lr 5e-3 (papers 4e-4), eta0 = 1 (0.01) and tau1 = 0.1 (1e-3) for the top-K thresholds. The papers'
values tuned for ML-20M (541 Adam steps per epoch against ML-100K's 4) leave K-SONG below the popularity ranker in
a 30-epoch ML-100K run; they are one ``--set lr=4e-4 eta0=0.01 tau1=1e-3`` away. The rest follows the papers: L2
weight decay 1e-7 on non-bias parameters, batch 256 users, 10 positives + 300 negatives, lr x0.25 halfway through
``epochs`` (epoch 60 of 120), K = 20 for the top-K methods (K/N ~ 1.2% on ML-100K, as K = 300 on ML-20M;
``ndcg.md`` section 5).

Validation (on construction): :meth:`TrainingConfig.validate` checks the shared fields and lets the method's owner
check the rest (the objective's constructor on a one-row problem, the baseline's ``*Params`` class), so that every
range is written in one place and a bad value is reported before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mbbo.ranking.objectives import (
    BSVRBNDCGObjective,
    KSONGObjective,
    SONGObjective,
)
from mbbo.validation import check_choice, check_int, check_nonnegative, check_positive, check_unit

__all__ = [
    "BASELINE_METHODS",
    "METHODS",
    "METHOD_CONFIGS",
    "TOPK_METHODS",
    "ApproxNDCGConfig",
    "BSVRBConfig",
    "BaselineConfig",
    "KSONGConfig",
    "LambdaRankConfig",
    "ListMLEConfig",
    "ListNetConfig",
    "NeuralNDCGConfig",
    "ObjectiveConfig",
    "RankNetConfig",
    "SONGConfig",
    "TrainingConfig",
    "method_config",
]

BASELINE_METHODS = ("ranknet", "listnet", "listmle", "lambdarank", "approxndcg", "neuralndcg")
TOPK_METHODS = ("ksong", "bsvrb_ndcg")
METHODS = ("song", *TOPK_METHODS, *BASELINE_METHODS)


def _objective_default(objective: type, name: str) -> Any:
    """The default of keyword ``name`` in ``objective``'s constructor (the one place it is declared)."""
    return inspect.signature(objective).parameters[name].default


@dataclass
class TrainingConfig:
    """Settings shared by every ranking method.

    Attributes:
        lr, weight_decay, betas, adam_eps: Adam (weight decay is coupled L2 on non-bias parameters only).
        batch_size, num_pos, num_neg, few_positives: the list sampler.
        epochs: planned length of the run (sets "halfway" for the learning-rate decay).
        lr_decay: factor applied at each epoch of ``lr_decay_epochs`` (0-based epoch index at which the decayed
            rate starts); ``lr_decay_epochs=None`` means ``(epochs // 2,)``, ``()`` disables the decay.
        seed: seed of the trainer's generator.
    """

    method: ClassVar[str] = ""

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
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()  # a config that exists is valid (the CLI reports a bad value before loading data)

    def decay_epochs(self) -> tuple[int, ...]:
        """0-based epochs at which the learning rate is multiplied by ``lr_decay``."""
        return (self.epochs // 2,) if self.lr_decay_epochs is None else tuple(self.lr_decay_epochs)

    def validate(self) -> None:
        """Raise ValueError naming the first bad hyper-parameter, its value and the allowed range."""
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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        self._validate_method()

    def _validate_method(self) -> None:
        """The method's own checks (overridden)."""


# --- SONG, K-SONG, BSVRB --------------------------------------------------------------------------------------


@dataclass
class ObjectiveConfig(TrainingConfig):
    """Fields shared by the three NDCG objectives (``margin``, ``list_weighting``, ``init``: see
    :mod:`mbbo.ranking.objectives`); ``topk`` is K (-1: the full list)."""

    objective_class: ClassVar[type] = SONGObjective
    #: config field -> objective keyword where the names differ
    renamed: ClassVar[Mapping[str, str]] = {}

    topk: int = -1
    margin: float = _objective_default(SONGObjective, "margin")
    list_weighting: str = _objective_default(SONGObjective, "list_weighting")
    init: str = _objective_default(SONGObjective, "init")

    def objective_kwargs(self) -> dict[str, Any]:
        """The objective's keyword arguments (``topk`` only for the top-K objectives)."""
        params = inspect.signature(self.objective_class).parameters
        out = {}
        for f in dataclasses.fields(self):
            name = self.renamed.get(f.name, f.name)
            if name in params:
                out[name] = getattr(self, f.name)
        return out

    def _validate_method(self) -> None:
        k = self.topk
        if not (isinstance(k, int) and not isinstance(k, bool) and (k >= 1 or k == -1)):
            raise ValueError(f"topk must be -1 or an integer >= 1 for method {self.method!r}, got {k!r}")
        # the objective owns the ranges of its hyper-parameters: build it on a one-row problem
        self.objective_class(1, 1, max(k, 1) + 1, torch.ones(1), **self.objective_kwargs())


@dataclass
class SONGConfig(ObjectiveConfig):
    """SONG (full-list NDCG; a ``topk`` K >= 1 only truncates the normaliser to ``Z_q^K``)."""

    method: ClassVar[str] = "song"

    gamma0: float = _objective_default(SONGObjective, "gamma0")


@dataclass
class _ThresholdConfig(ObjectiveConfig):
    """The top-K lower problem (K-SONG, BSVRB): thresholds ``lambda_q`` with step ``eta0``, smoothing ``tau1``,
    strong convexity ``tau2``, ``psi(t) = psi_scale sigmoid(psi_alpha t)``, ``topk_version`` 'theo' / 'prac'."""

    objective_class: ClassVar[type] = KSONGObjective
    renamed: ClassVar[Mapping[str, str]] = {"topk_version": "version"}

    topk: int = _objective_default(KSONGObjective, "topk")
    eta0: float = 1.0  # papers: 0.01 (the objective's default)
    tau1: float = 0.1  # papers: 1e-3 (the objective's default)
    tau2: float = _objective_default(KSONGObjective, "tau2")
    psi_scale: float = _objective_default(KSONGObjective, "psi_scale")
    psi_alpha: float = _objective_default(KSONGObjective, "psi_alpha")
    topk_version: str = _objective_default(KSONGObjective, "version")
    topk_eps: float = _objective_default(KSONGObjective, "topk_eps")

    def _validate_method(self) -> None:
        check_choice("topk_version", self.topk_version, ("theo", "prac"))  # named as the user sets it
        super()._validate_method()


@dataclass
class KSONGConfig(_ThresholdConfig):
    """K-SONG. The defaults are mbbo's variant (``init="first_sample"``, ``lambda_step="moving_average"``,
    ``psi_derivative="exact"``); ``init="zero", lambda_step="plain", psi_derivative="reference"`` is the reference
    form (see :class:`~mbbo.ranking.objectives.KSONGObjective`)."""

    method: ClassVar[str] = "ksong"

    gamma0: float = _objective_default(KSONGObjective, "gamma0")
    gamma1: float = _objective_default(KSONGObjective, "gamma1")
    lambda_step: str = _objective_default(KSONGObjective, "lambda_step")
    psi_derivative: str = _objective_default(KSONGObjective, "psi_derivative")


@dataclass
class BSVRBConfig(_ThresholdConfig):
    """BSVRB for NDCG (``topk = -1``: the full-list objective) and the STORM-type correction weight ``gamma_m``
    of the trainer (the gradient fed to Adam is ``grad_t(w_t) - gamma_m grad_{t-1}(w_{t-1})``)."""

    method: ClassVar[str] = "bsvrb_ndcg"
    objective_class: ClassVar[type] = BSVRBNDCGObjective

    topk: int = _objective_default(BSVRBNDCGObjective, "topk")
    eta1: float = _objective_default(BSVRBNDCGObjective, "eta1")
    gamma_v: float = _objective_default(BSVRBNDCGObjective, "gamma_v")
    beta_v: float = _objective_default(BSVRBNDCGObjective, "beta_v")
    gamma_z: float = _objective_default(BSVRBNDCGObjective, "gamma_z")
    beta_z: float = _objective_default(BSVRBNDCGObjective, "beta_z")
    gamma_s: float = _objective_default(BSVRBNDCGObjective, "gamma_s")
    beta_s: float = _objective_default(BSVRBNDCGObjective, "beta_s")
    gamma_m: float = 0.01

    def _validate_method(self) -> None:
        check_nonnegative("gamma_m", self.gamma_m)
        super()._validate_method()


# --- baselines ------------------------------------------------------------------------------------------------


@dataclass
class BaselineConfig(TrainingConfig):
    """A baseline loss; ``baseline``: its keyword hyper-parameters (``mbbo.ranking.baselines.BASELINE_PARAMS``,
    whose ``*Params`` dataclass holds the defaults and checks the values)."""

    baseline: dict[str, Any] = field(default_factory=dict)

    def _validate_method(self) -> None:
        if not isinstance(self.baseline, Mapping):
            raise ValueError(f"baseline={self.baseline!r} must be a mapping of baseline hyper-parameters")
        from mbbo.ranking.baselines import BASELINE_PARAMS  # lazy: the module is optional for the others

        params = BASELINE_PARAMS[self.method]
        known = {f.name for f in dataclasses.fields(params)}
        unknown = sorted(set(self.baseline) - known)
        if unknown:
            raise ValueError(f"baseline hyper-parameter(s) {unknown} of {self.method!r}: valid {sorted(known)}")
        params(**self.baseline)


def _baseline_config(method: str, name: str) -> type[BaselineConfig]:
    """The config class of one baseline (no fields of its own: only its method name)."""
    doc = f"The ``{method}`` baseline (``baseline``: its hyper-parameters, see :class:`BaselineConfig`)."
    return type(name, (BaselineConfig,), {"method": method, "__doc__": doc, "__module__": __name__})


RankNetConfig = _baseline_config("ranknet", "RankNetConfig")
ListNetConfig = _baseline_config("listnet", "ListNetConfig")
ListMLEConfig = _baseline_config("listmle", "ListMLEConfig")
LambdaRankConfig = _baseline_config("lambdarank", "LambdaRankConfig")
ApproxNDCGConfig = _baseline_config("approxndcg", "ApproxNDCGConfig")
NeuralNDCGConfig = _baseline_config("neuralndcg", "NeuralNDCGConfig")


METHOD_CONFIGS: dict[str, type[TrainingConfig]] = {
    "song": SONGConfig,
    "ksong": KSONGConfig,
    "bsvrb_ndcg": BSVRBConfig,
    "ranknet": RankNetConfig,
    "listnet": ListNetConfig,
    "listmle": ListMLEConfig,
    "lambdarank": LambdaRankConfig,
    "approxndcg": ApproxNDCGConfig,
    "neuralndcg": NeuralNDCGConfig,
}


def method_config(method: str, **values: Any) -> TrainingConfig:
    """The validated config of ``method`` with ``values`` replacing its defaults.

    Raises:
        ValueError: an unknown method, a field the method does not have (the message lists its fields), or a
            value out of range (the message names it).
    """
    check_choice("method", method, METHODS)
    cls = METHOD_CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; valid: {sorted(known)}")
    config = cls(**values)
    config.validate()
    return config
