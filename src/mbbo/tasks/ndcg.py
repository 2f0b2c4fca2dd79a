"""Top-K NDCG learning to rank on MovieLens as a multi-block bilevel task (``shared/specs/ndcg.md``).

Pipeline: ratings -> leave-last-out split (5 test / 5 dev per user, graded gains ``2^r - 1``) -> NeuMF warm-started
by listwise cross-entropy (cached per seed and shared by all methods, last layer re-initialised) -> one of the
:data:`~mbbo.ranking.trainer.METHODS` trained by :class:`~mbbo.ranking.trainer.RankingTrainer` -> all-ranking
NDCG@{5, 10, 20, 50} on dev (train items excluded) and test (train and dev items excluded).

:func:`build` gives ``(trainer, task)`` for :func:`mbbo.runner.run`; ``task.evaluate(trainer)`` returns
``dev_ndcg@K`` and ``test_ndcg@K`` for every K, plus ``train_loss`` (the last step's surrogate loss).

Warm-up on ML-100K. The papers' warm-up is 20 epochs of Adam at lr 1e-3 (``pretrain_ml.sh``), but ML-20M has
541 steps per epoch and ML-100K 4: 20 epochs are 80 Adam steps, and that warm start ranks below popularity
(test NDCG@10 0.045-0.057 against 0.066). The defaults here are 40 epochs at lr 5e-3 (160 steps), measured at
test NDCG@10 0.087-0.090 (seeds 0-2) before the head reset (``experiments/results/ndcg_ml100k_table.md``); set
``warmup_epochs=20, warmup_lr=1e-3`` for the papers' schedule. The methods' defaults (:mod:`mbbo.ranking.configs`)
are the ML-100K experiment's settings (lr 5e-3, eta0 1, tau1 0.1; the papers' 4e-4, 0.01, 1e-3 are one ``--set``
away; the experiment's docstring says why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbbo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mbbo.data.errors import DataError
from mbbo.data.movielens import RankingSplit, load_movielens, read_ratings, split_leave_last
from mbbo.ranking.configs import METHOD_CONFIGS, METHODS, TrainingConfig, method_config
from mbbo.ranking.metrics import evaluate_split
from mbbo.ranking.neumf import NeuMF
from mbbo.ranking.trainer import RankingTrainer
from mbbo.ranking.warmup import warmup
from mbbo.tasks.block_eval import check_eval_blocks, evaluation_blocks

__all__ = ["METRICS", "NDCGSettings", "NDCGTask", "build", "load_split", "popularity_ndcg", "warm_start"]

WARMUP_CACHE_VERSION = 1
#: keys of :meth:`NDCGTask.evaluate` with the default cut-offs (``train_loss`` appears after the first step)
METRICS = (*(f"{w}_ndcg@{k}" for w in ("dev", "test") for k in (5, 10, 20, 50)), "train_loss")


@dataclass
class NDCGSettings:
    """Data, warm-up and evaluation settings of the NDCG task.

    Attributes:
        dataset: ``"ml-100k"`` (default), ``"ml-1m"`` or ``"ml-20m"`` (see :func:`mbbo.data.movielens.load_movielens`).
        data_path: the ratings file (``u.data``, ``ml-100k.inter``, ``ratings.dat``, ``ratings.csv``) or its
            directory; None: an installed ``recbole`` wheel (ML-100K) or the mbbo cache.
        n_test, n_dev: interactions per user held out for test / dev (5 / 5).
        seed: model initialisation, warm-up and trainer seed.
        warmup_epochs, warmup_lr: the warm-up schedule (see the module docstring; papers: 20 epochs, 1e-3).
        warmup_weight_decay, warmup_gamma: Adam L2 and moving-average weight of the warm-up (1e-7, 0.1).
        head_init: ``"torch"`` (the reference ``--init_last 1``) or ``"normal"``: re-initialisation of the head.
        warmup_cache: directory of the cached warm starts; None: ``<mbbo cache>/ndcg_warmup``; ``""``: no cache.
        emb_size, dropout: NeuMF (64, 0.2 inside the MLP).
        output_dropout: NeuMF's extra dropout before the head (0: the reference architecture; 0.2 was mbbo's
            earlier default, kept as an option).
        ks: NDCG cut-offs.
        eval_test: also evaluate the test split at every evaluation.
        eval_chunk: users scored per evaluation call (memory O(eval_chunk * n_items)).
        eval_users: users the NDCG averages over: None (all), "auto" (all up to 1000, else a seeded subset of
            1000) or K (a seeded subset of K); with a subset, ``*_sem`` metrics give the standard errors (see
            :mod:`mbbo.tasks.block_eval`: each user is a block of the ranking objective).
        device: ``"cpu"`` or a CUDA device.
    """

    dataset: str = "ml-100k"
    data_path: str | None = None
    n_test: int = 5
    n_dev: int = 5
    seed: int = 0
    warmup_epochs: int = 40
    warmup_lr: float = 5e-3
    warmup_weight_decay: float = 1e-7
    warmup_gamma: float = 0.1
    head_init: str = "torch"
    warmup_cache: str | None = None
    emb_size: int = 64
    dropout: float = 0.2
    output_dropout: float = 0.0
    ks: tuple[int, ...] = (5, 10, 20, 50)
    eval_test: bool = True
    eval_chunk: int = 512
    eval_users: int | str | None = None
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting, its value and the allowed range."""
        if self.dataset not in ("ml-100k", "ml-1m", "ml-20m"):
            raise ValueError(f"dataset={self.dataset!r} must be one of ('ml-100k', 'ml-1m', 'ml-20m')")
        for name, low in (("n_test", 1), ("n_dev", 1), ("warmup_epochs", 0), ("emb_size", 1), ("eval_chunk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        if not (isinstance(self.warmup_lr, int | float) and math.isfinite(self.warmup_lr) and self.warmup_lr > 0):
            raise ValueError(f"warmup_lr={self.warmup_lr!r} must be in (0, inf)")
        if not (isinstance(self.warmup_weight_decay, int | float) and self.warmup_weight_decay >= 0):
            raise ValueError(f"warmup_weight_decay={self.warmup_weight_decay!r} must be in [0, inf)")
        if not (isinstance(self.warmup_gamma, int | float) and 0 < self.warmup_gamma <= 1):
            raise ValueError(f"warmup_gamma={self.warmup_gamma!r} must be in (0, 1]")
        check_eval_blocks(self.eval_users)
        if self.head_init not in ("torch", "normal"):
            raise ValueError(f"head_init={self.head_init!r} must be 'torch' or 'normal'")
        for name in ("dropout", "output_dropout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1):
                raise ValueError(f"{name}={value!r} must be in [0, 1)")
        ks = tuple(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks={self.ks!r} must be a non-empty tuple of integers >= 1")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device={self.device!r} is not a torch device") from err


def _as_settings(settings: NDCGSettings | Mapping[str, Any] | None) -> NDCGSettings:
    if settings is None:
        settings = NDCGSettings()
    elif isinstance(settings, Mapping):
        known = {f.name for f in dataclasses.fields(NDCGSettings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown NDCG setting(s) {unknown}; valid: {sorted(known)}")
        values = dict(settings)
        if "ks" in values:
            values["ks"] = tuple(values["ks"])
        settings = NDCGSettings(**values)
    settings.validate()
    return settings


_SPLITS: dict[tuple[Any, ...], RankingSplit] = {}


def load_split(settings: NDCGSettings) -> RankingSplit:
    """The leave-last-out split of the settings' ratings (memoised per file, sizes and device)."""
    path = settings.data_path
    key = (settings.dataset, path, settings.n_test, settings.n_dev, settings.device)
    if path is not None:
        p = Path(path)
        stat = p.stat() if p.exists() else None
        key += ((stat.st_size, stat.st_mtime_ns) if stat else None,)
    if key not in _SPLITS:
        if path is not None and Path(path).is_file():
            ratings = read_ratings(path)
        else:
            ratings = load_movielens(settings.dataset, path)
        split = split_leave_last(ratings, settings.n_test, settings.n_dev, device=settings.device)
        where = path if path is not None else settings.dataset
        for part in ("dev", "test"):
            if getattr(split, part).nnz == 0:
                raise DataError(
                    f"{where}: no user has {part} interactions (n_test={settings.n_test}, n_dev={settings.n_dev}; "
                    "a user's last ratings go to test, then dev, and each user keeps one for training): every NDCG "
                    "would be NaN. Use data with more ratings per user")
        _SPLITS[key] = split
    return _SPLITS[key]


def _split_digest(split: RankingSplit) -> str:
    h = hashlib.sha256()
    for part in (split.train, split.dev, split.test):
        for t in (part.offsets, part.items, part.ratings):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(split.n_items).encode())
    return h.hexdigest()[:16]


def _make_model(split: RankingSplit, settings: NDCGSettings) -> NeuMF:
    gen = torch.Generator().manual_seed(settings.seed)
    model = NeuMF(split.n_users, split.n_items, settings.emb_size, dropout=settings.dropout,
                  output_dropout=settings.output_dropout, generator=gen)
    return model.to(settings.device)


def _cache_root(settings: NDCGSettings) -> Path | None:
    if settings.warmup_cache == "":
        return None
    if settings.warmup_cache is not None:
        return Path(settings.warmup_cache)
    try:
        from mbbo.data.cache import cache_dir

        base = Path(cache_dir())
    except ImportError:  # pragma: no cover - depends on the data layer
        env = os.environ.get("MBBO_CACHE")
        base = Path(env) if env else Path.home() / ".cache" / "mbbo"
    return base / "ndcg_warmup"


def warm_start(split: RankingSplit, settings: NDCGSettings) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The warm-started NeuMF state (head re-initialised) and a summary, from the cache when present.

    The cache file name hashes the split's content, the seed, the warm-up schedule and the model settings, so
    every method of one seed starts from the same weights and the warm-up runs once per seed.
    """
    spec = {
        "version": WARMUP_CACHE_VERSION,
        "split": _split_digest(split),
        "seed": settings.seed,
        "epochs": settings.warmup_epochs,
        "lr": settings.warmup_lr,
        "weight_decay": settings.warmup_weight_decay,
        "gamma": settings.warmup_gamma,
        "head_init": settings.head_init,
        "emb_size": settings.emb_size,
        "dropout": settings.dropout,
        "output_dropout": settings.output_dropout,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    root = _cache_root(settings)
    path = None if root is None else root / f"warmup_{key}.pt"
    if path is not None and path.is_file():
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:  # a cache is disposable: recompute it
            cause = type(exc.__cause__ or exc).__name__
            warnings.warn(f"the NDCG warm-up cache {path} is unreadable (corrupt or truncated: {cause}); "
                          "recomputing it", RuntimeWarning, stacklevel=2)
            payload = {}
        if payload.get("spec") == spec:
            return payload["model"], payload["info"]
    model = _make_model(split, settings)
    gen = torch.Generator(device=split.device).manual_seed(2 * settings.seed + 1)
    result = warmup(
        model, split, settings.warmup_epochs, lr=settings.warmup_lr, weight_decay=settings.warmup_weight_decay,
        gamma=settings.warmup_gamma, generator=gen, reset_head=False,
    )
    before = evaluate_split(model, split, "test", settings.ks, chunk_size=settings.eval_chunk)
    before_dev = evaluate_split(model, split, "dev", settings.ks, chunk_size=settings.eval_chunk)
    head_gen = gen if gen.device == next(model.parameters()).device else None
    model.reset_head(head_gen, init=settings.head_init)  # type: ignore[arg-type]
    info = {
        "spec": spec,
        "final_ce": result.ce[-1] if result.ce else float("nan"),
        "before_reset": {**{f"dev_ndcg@{k}": before_dev[f"ndcg@{k}"] for k in settings.ks},
                         **{f"test_ndcg@{k}": before[f"ndcg@{k}"] for k in settings.ks}},
    }
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"spec": spec, "model": state, "info": info})
    return state, info


@torch.no_grad()
def popularity_ndcg(
    split: RankingSplit, which: str = "test", ks: tuple[int, ...] = (5, 10, 20, 50)
) -> dict[str, float]:
    """All-ranking NDCG@K of the popularity ranking, the sanity anchor (``ndcg.md`` section 5: test NDCG@10 about
    0.066 on ML-100K). Items are ranked by their number of interactions observed before the evaluated part:
    train for dev, train and dev for test (ties in the order of ``torch.topk``)."""
    if which not in ("dev", "test"):
        raise ValueError(f"which={which!r} must be 'dev' or 'test'")
    counts = torch.bincount(split.train.items, minlength=split.n_items).to(torch.float64)
    if which == "test":
        counts = counts + torch.bincount(split.dev.items, minlength=split.n_items).to(torch.float64)

    def scorer(users: torch.Tensor) -> torch.Tensor:
        return counts.to(users.device)[None, :].expand(users.numel(), -1)

    return evaluate_split(scorer, split, which, ks)


class NDCGTask:
    """The evaluator of the NDCG task for :func:`mbbo.runner.run`.

    Args:
        split: the data.
        settings: :class:`NDCGSettings`.
        batch_size: users per step of the trainer (sets :meth:`iterations_per_epoch`).
        warm_info: summary of the warm start (for reports).
    """

    def __init__(
        self,
        split: RankingSplit,
        settings: NDCGSettings,
        batch_size: int = 256,
        warm_info: dict[str, Any] | None = None,
    ) -> None:
        self.split, self.settings, self.batch_size = split, settings, batch_size
        self.warm_info = warm_info or {}
        active = int((split.train.counts() > 0).sum())
        self._ipe = max(1, -(-active // batch_size))

    @classmethod
    def load(cls, settings: NDCGSettings | Mapping[str, Any] | None = None, batch_size: int = 256) -> NDCGTask:
        s = _as_settings(settings)
        return cls(load_split(s), s, batch_size)

    def iterations_per_epoch(self) -> int:
        """Steps per epoch: ``ceil(#users with training items / batch_size)`` (4 on ML-100K)."""
        return self._ipe

    def make_model(self) -> NeuMF:
        """A NeuMF holding the cached warm start (computed on first use)."""
        state, info = warm_start(self.split, self.settings)
        self.warm_info = info
        model = _make_model(self.split, self.settings)
        model.load_state_dict(state)
        return model

    @torch.no_grad()
    def evaluate(self, trainer: Any) -> dict[str, float]:
        """``dev_ndcg@K`` (and ``test_ndcg@K``) of ``trainer.model`` and its last ``train_loss``."""
        model = trainer.model if hasattr(trainer, "model") else trainer
        out: dict[str, float] = {}
        splits = ("dev", "test") if self.settings.eval_test else ("dev",)
        n_users = self.split.dev.n_users
        users = evaluation_blocks(n_users, self.settings.eval_users, self.settings.seed)
        for which in splits:
            m = evaluate_split(model, self.split, which, self.settings.ks, chunk_size=self.settings.eval_chunk,
                               users=users, with_std=users is not None)
            out.update({f"{which}_ndcg@{k}": m[f"ndcg@{k}"] for k in self.settings.ks})
            if users is not None:
                n = m["users"]
                out.update({f"{which}_ndcg@{k}_sem": m[f"ndcg@{k}_std"] / math.sqrt(n) * math.sqrt(1 - n / n_users)
                            for k in self.settings.ks})
        loss = getattr(trainer, "last_loss", None)  # None before the first step
        if loss is not None:
            out["train_loss"] = float(loss)
        return out


def build(
    method: str,
    settings: NDCGSettings | Mapping[str, Any] | None = None,
    config: TrainingConfig | None = None,
    **hparams: Any,
) -> tuple[RankingTrainer, NDCGTask]:
    """``(trainer, task)`` for ``mbbo run --task ndcg --algorithm <method>``.

    Args:
        method: one of :data:`~mbbo.ranking.trainer.METHODS`.
        settings: :class:`NDCGSettings` or a mapping of its fields (data, warm-up, evaluation, seed).
        config: the method's hyper-parameters (its class in :data:`~mbbo.ranking.configs.METHOD_CONFIGS`; default:
            its defaults); ``hparams`` override its fields. The trainer's seed is ``settings.seed`` unless ``seed``
            is given in ``hparams``.

    Raises:
        ValueError: an unknown method, setting or hyper-parameter, or a value out of range (the message names it).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    s = _as_settings(settings)
    if config is not None and type(config) is not METHOD_CONFIGS[method]:
        raise ValueError(f"config is a {type(config).__name__}; method {method!r} takes a "
                         f"{METHOD_CONFIGS[method].__name__}")
    base = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    cfg = method_config(method, **{**base, "seed": s.seed, **hparams})
    split = load_split(s)
    task = NDCGTask(split, s, cfg.batch_size)
    model = task.make_model()
    trainer = RankingTrainer(model, split, cfg)
    if trainer.iterations_per_epoch() != task.iterations_per_epoch():  # pragma: no cover - same formula
        raise RuntimeError("trainer and task disagree on the epoch length")
    return trainer, task


# --- the CLI task: `mbbo run --task ndcg --algorithm <method>` ------------------------------------------------


class _Evaluator:
    """The registry's view of :class:`NDCGTask` (its epoch length does not depend on a block batch)."""

    def __init__(self, task: NDCGTask) -> None:
        self.task = task

    def iterations_per_epoch(self, block_batch: int = 1) -> int:
        return self.task.iterations_per_epoch()

    def evaluate(self, trainer: Any) -> dict[str, float]:
        return self.task.evaluate(trainer)


def _build_for_cli(settings: NDCGSettings, dtype: torch.dtype, device: torch.device) -> tuple[NDCGTask, _Evaluator]:
    settings.validate()
    task = NDCGTask.load(settings)
    return task, _Evaluator(task)


def _make_trainer(name: str, task: NDCGTask, evaluator: Any, seed: int, hyper: dict[str, Any]) -> RankingTrainer:
    """The method's trainer on the task's warm start; `--seed` seeds the trainer, `data_seed` the warm start."""
    trainer = RankingTrainer(task.make_model(), task.split, method_config(name, **{**hyper, "seed": seed}))
    task._ipe = trainer.iterations_per_epoch()  # the epoch length follows the trainer's batch size
    return trainer


def _register() -> None:
    from mbbo.tasks.registry import TaskSpec, register_task

    register_task(TaskSpec(
        name="ndcg",
        description="top-K NDCG learning to rank on MovieLens (NeuMF warm start): SONG, K-SONG, BSVRB and six "
                    "ranking baselines",
        settings_cls=NDCGSettings,
        builder=_build_for_cli,
        metrics=METRICS,
        aliases={"data_seed": "seed"},
        dataset_setting="dataset",
        data_dir_setting="data_path",
        methods=dict(METHOD_CONFIGS),
        make_method=_make_trainer,
    ))


_register()
