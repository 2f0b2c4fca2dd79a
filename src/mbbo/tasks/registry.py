"""Runnable tasks by name: their settings, the algorithms that fit them, and how to build them for the runner.

A :class:`TaskSpec` knows

- its settings: a dataclass with defaults (exposed under *setting names*; `aliases` renames a dataclass field
  for users, e.g. the hyper-parameter task's data `seed` is the setting `data_seed`, so that it never clashes
  with the run's `--seed`);
- which algorithms fit it (:meth:`TaskSpec.check_algorithm` raises :class:`IncompatibleAlgorithmError` saying
  why when one does not);
- how to build `(problem, evaluator)`: the :class:`~mbbo.problem.MultiBlockProblem` the algorithm runs on and a
  :class:`TaskAdapter` that the runner evaluates (`iterations_per_epoch()` bound to the algorithm's block batch,
  `evaluate(algorithm)`).

This module holds only the registry (:data:`TASKS`, name -> spec; :func:`register_task`); each task lives in its
own module, which registers its spec when imported. Importing the package :mod:`mbbo.tasks` (which any
``import mbbo.tasks.registry`` does first) imports every task module, so :data:`TASKS` is complete: `hyperparam`
(T1/T2, :mod:`mbbo.tasks.hyperparam`), `quadratic` (T3, :mod:`mbbo.tasks.quadratic`), the constrained tasks
(:mod:`mbbo.tasks.constrained_tasks`), `federated` (:mod:`mbbo.tasks.federated`), `ndcg` (:mod:`mbbo.tasks.ndcg`)
and the zoo tasks (:mod:`mbbo.tasks.zoo_tasks`). The task modules import this module, never the reverse.

How fit is decided (in this order): the name must be a registered algorithm; a spec may restrict itself to
an allow-list of base names (`algorithms`, `re_<name>` fits when `<name>` does); a single-block algorithm
(a :class:`~mbbo.algorithms.single.SingleBlockAlgorithm`, or any class declaring `single_block = True`) fits
only tasks whose `num_blocks` setting is 1; a spec may add its own check (`fits`, returning the reason for a
misfit or None); a method for constrained lower levels (a class declaring `constrained_only = True`: sflcb,
blocc, lv_hba, penalty) fits only the tasks whose allow-list names it (the constrained tasks, whose allow-lists
in turn hold only these methods). These need only the settings, so they run before any data is loaded.
Once the problem is built, the algorithm's own `unsuitable_for(problem)` has the last word (e.g. SABA needs
finite-sum samplers, FO-ITD-BiO an upper loss that depends on x): pass `problem=` to :meth:`TaskSpec.check_algorithm`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from mbbo.algorithms.registry import ALGORITHMS, RESTART_PREFIX, algorithm_names, split_name
from mbbo.algorithms.single import SingleBlockAlgorithm
from mbbo.config import coerce_value, field_types
from mbbo.problem import MultiBlockProblem

__all__ = [
    "TASKS",
    "BuiltTask",
    "IncompatibleAlgorithmError",
    "TaskAdapter",
    "TaskSpec",
    "algorithm_class",
    "get_task",
    "is_single_block",
    "register_task",
    "task_names",
]


class IncompatibleAlgorithmError(ValueError):
    """An algorithm that does not fit a task was asked for; the message says why and what fits."""


def algorithm_class(name: str) -> tuple[type, bool]:
    """`(class, restarted)` of a registered algorithm name (`re_<name>` is the restarted `<name>`).

    Raises:
        ValueError: unknown name (with close matches and the list of known names), or a restarted variant of an
            algorithm without `restart` (`mbbo.algorithms.registry.split_name`).
    """
    base, restarted = split_name(name)
    return ALGORITHMS[base], restarted


def is_single_block(cls: type) -> bool:
    """Whether an algorithm class solves only single-block (m = 1) problems."""
    declared = getattr(cls, "single_block", None)
    if declared is not None:
        return bool(declared)
    return issubclass(cls, SingleBlockAlgorithm)


# ---------------------------------------------------------------------------------------------------------
# what the runner evaluates
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TaskAdapter:
    """A task object as the runner wants it: `iterations_per_epoch()` without arguments and `evaluate`.

    Attributes:
        task: anything with `iterations_per_epoch(block_batch)` and `evaluate(algorithm)` (e.g.
            :class:`~mbbo.tasks.hyperparam.HyperparamTask`).
        block_batch: the algorithm's number of sampled blocks per iteration B.
    """

    task: Any
    block_batch: int = 1

    def iterations_per_epoch(self) -> float:
        """The task's iterations per epoch for this block batch (fractional where the task says so)."""
        return self.task.iterations_per_epoch(self.block_batch)

    def evaluate(self, algorithm: Any) -> dict[str, float]:
        """The task's metrics of the algorithm's current iterate."""
        return self.task.evaluate(algorithm)


class BuiltTask(NamedTuple):
    """What :meth:`TaskSpec.build` returns: unpack as `problem, evaluator = spec.build(...)`."""

    problem: MultiBlockProblem
    evaluator: TaskAdapter


# ---------------------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------------------

BuildFn = Callable[[Any, torch.dtype, torch.device], tuple[MultiBlockProblem, Any]]
FitsFn = Callable[[str, type, Any], str | None]


@dataclass(frozen=True)
class TaskSpec:
    """A runnable task.

    Attributes:
        name: the registry name (`mbbo run --task NAME`).
        description: one line for `mbbo list`.
        settings_cls: dataclass of the task's settings, with defaults.
        builder: `(settings, dtype, device) -> (problem, task)` where `task` has
            `iterations_per_epoch(block_batch)` and `evaluate(algorithm)`.
        metrics: names of the metrics `evaluate` returns (for documentation and listing).
        aliases: setting name -> dataclass field name, for fields exposed under another name.
        dataset_setting: the setting naming the data set (`--dataset`), or None for tasks without data.
        data_dir_setting: the setting naming a data directory (`--data-dir`), or None.
        algorithms: allow-list of base algorithm names, or None for every registered algorithm.
        algorithms_reason: why only the allow-list fits (used in the error message).
        fits: extra check `(name, algorithm class, settings) -> reason for a misfit or None`.
        devices: device types the task supports, or None for any.
        methods: for tasks trained by their own methods rather than registered bilevel algorithms (NDCG):
            method name -> hyper-parameter dataclass; then only these names fit the task.
        make_method: `(name, problem, evaluator, seed, hyper) -> steppable` building such a method.
        finite_sum: whether the task's samplers draw rows of stored data; False (fresh noise) rules out the
            algorithms whose `needs_finite_sum` is "always" and flags those needing it "by default".
        distributed: the task's methods run on torch.distributed ranks (`mbbo run --nproc R`, torchrun).
        sharded: those ranks share the m blocks of a multi-block algorithm (`mbbo.distributed.BlockShard`);
            the evaluator then reduces over the ranks (`mbbo.tasks.block_eval.ShardedBlocks`).
        algorithm_defaults: hyper-parameter defaults the task sets: algorithm name (or "*" for every algorithm)
            -> {name: value}; applied to the algorithms that have the field, before the user's values.
    """

    name: str
    description: str
    settings_cls: type
    builder: BuildFn
    metrics: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    dataset_setting: str | None = None
    data_dir_setting: str | None = None
    algorithms: tuple[str, ...] | None = None
    algorithms_reason: str = ""
    fits: FitsFn | None = None
    devices: tuple[str, ...] | None = None
    methods: Mapping[str, type] | None = None
    make_method: Callable[..., Any] | None = None
    finite_sum: bool = True
    distributed: bool = False
    sharded: bool = False
    algorithm_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def hyper_defaults(self, algorithm: str, fields: Sequence[str]) -> dict[str, Any]:
        """The task's defaults for `algorithm`'s hyper-parameters named in `fields` ("*" first, then by name)."""
        out = {**self.algorithm_defaults.get("*", {}), **self.algorithm_defaults.get(algorithm, {})}
        return {k: v for k, v in out.items() if k in fields}

    def algorithm_class(self, name: str) -> tuple[type, bool]:
        """`(class with name and Config, restarted)` for an algorithm or one of the task's own methods."""
        if self.methods is None:
            return algorithm_class(name)
        if name not in self.methods:
            raise ValueError(f"task {self.name!r} runs its own methods; {name!r} is not one of them. "
                             f"Known: {', '.join(sorted(self.methods))}")
        return type(name, (), {"name": name, "Config": self.methods[name]}), False

    # --- settings -----------------------------------------------------------------------------------------
    def _field(self, setting: str) -> str:
        """The dataclass field behind a setting name."""
        return self.aliases.get(setting, setting)

    def _setting(self, field_name: str) -> str:
        """The setting name of a dataclass field."""
        for setting, name in self.aliases.items():
            if name == field_name:
                return setting
        return field_name

    def setting_names(self) -> list[str]:
        """Every setting name, in the dataclass's field order."""
        return [self._setting(f.name) for f in dataclasses.fields(self.settings_cls)]

    def setting_types(self) -> dict[str, Any]:
        """Setting name -> type annotation."""
        return {self._setting(name): annotation for name, annotation in field_types(self.settings_cls).items()}

    def defaults(self) -> dict[str, Any]:
        """Setting name -> default value."""
        return self.settings_dict(self.settings_cls())

    def settings_dict(self, settings: Any) -> dict[str, Any]:
        """A settings object as a dict keyed by setting names."""
        return {self._setting(name): value for name, value in dataclasses.asdict(settings).items()}

    def make_settings(self, values: Mapping[str, Any] | None = None) -> Any:
        """The settings object from `values` (setting names; missing ones take their defaults).

        Values are type-checked (:func:`coerce_value`) and the object's `validate()` runs if it has one.

        Raises:
            ValueError: an unknown setting (listing the valid ones), a value of the wrong type or one that
                `validate()` rejects.
        """
        values = dict(values or {})
        types_ = self.setting_types()
        unknown = sorted(set(values) - set(types_))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for task {self.name!r}; valid: {sorted(types_)}")
        typed = {
            self._field(key): coerce_value(key, value, types_[key], what=f"{self.name} setting")
            for key, value in values.items()
        }
        settings = self.settings_cls(**typed)
        validate = getattr(settings, "validate", None)
        if callable(validate):
            validate()
        return settings

    def dataset(self, settings: Any) -> str | None:
        """The data set a settings object names, or None for tasks without data."""
        return None if self.dataset_setting is None else getattr(settings, self._field(self.dataset_setting))

    # --- algorithms -----------------------------------------------------------------------------------
    def misfit(self, algorithm: str, settings: Any | None = None, problem: MultiBlockProblem | None = None
               ) -> str | None:
        """Why `algorithm` does not fit this task (with `settings`, default: the defaults), or None if it does.

        With the built `problem`, the algorithm's `unsuitable_for(problem)` is consulted too.

        Raises:
            ValueError: the algorithm name is not registered, or names the restarted variant of an algorithm without
                `restart()` (`mbbo.algorithms.registry.split_name`).
        """
        cls, _ = self.algorithm_class(algorithm)
        if self.methods is not None:
            return None
        settings = self.settings_cls() if settings is None else settings
        base = cls.name
        if self.algorithms is not None and base not in self.algorithms:
            reason = f" ({self.algorithms_reason})" if self.algorithms_reason else ""
            return f"task {self.name!r} accepts only {', '.join(self.algorithms)}{reason}"
        if getattr(cls, "constrained_only", False) and (self.algorithms is None or base not in self.algorithms):
            return (f"{base} solves bilevel problems with a constrained lower level h(x, y) <= 0 and fits only the "
                    f"tasks that list it (svm_slack, toy_sflcb, toy_coupled); task {self.name!r} has no constraint")
        num_blocks = getattr(settings, "num_blocks", 1)
        if is_single_block(cls) and num_blocks != 1:
            return (f"{base} is a single-block algorithm and task {self.name!r} has num_blocks={num_blocks} "
                    f"(set num_blocks=1 to run it, or use a multi-block algorithm)")
        if self.fits is not None:
            reason = self.fits(algorithm, cls, settings)
            if reason is not None:
                return reason
        if not self.finite_sum and getattr(cls, "needs_finite_sum", None) == "always":
            return (f"{base} needs a finite-sum problem (samplers over stored rows), and task {self.name!r} "
                    "draws fresh noise")
        unsuitable = getattr(cls, "unsuitable_for", None)
        if problem is not None and callable(unsuitable):
            reason = unsuitable(problem)
            if reason:
                return f"{base}: {reason}"
        return None

    def check_algorithm(self, algorithm: str, settings: Any | None = None,
                        problem: MultiBlockProblem | None = None) -> None:
        """Raise :class:`IncompatibleAlgorithmError` if `algorithm` does not fit (ValueError if unknown).

        Without `problem` only the settings-level checks run (cheap: nothing is loaded); with the built
        problem the algorithm's `unsuitable_for(problem)` runs as well.
        """
        reason = self.misfit(algorithm, settings, problem)
        if reason is not None:
            fitting = [n for n in self.compatible_algorithms(settings, problem) if not n.startswith(RESTART_PREFIX)]
            listed = f"{', '.join(fitting)} (and their {RESTART_PREFIX}<name> variants)" if fitting else "none"
            raise IncompatibleAlgorithmError(
                f"algorithm {algorithm!r} does not fit task {self.name!r}: {reason}. Algorithms that fit: {listed}"
            )

    def compatible_algorithms(self, settings: Any | None = None, problem: MultiBlockProblem | None = None
                              ) -> list[str]:
        """Registered algorithm names (restarted variants included) that fit this task with `settings`
        (and, when given, the built `problem`)."""
        if self.methods is not None:
            return sorted(self.methods)
        return [name for name in algorithm_names() if self.misfit(name, settings, problem) is None]

    # --- building -----------------------------------------------------------------------------------------
    def check_device(self, device: torch.device | str) -> None:
        """Raise ValueError if the task cannot run on `device`."""
        kind = torch.device(device).type
        if self.devices is not None and kind not in self.devices:
            raise ValueError(f"task {self.name!r} runs only on {', '.join(self.devices)}, not on {kind!r}")

    def build(self, settings: Any | None = None, *, block_batch: int = 1, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> BuiltTask:
        """`(problem, evaluator)` for the runner; the evaluator's epoch length uses `block_batch`.

        Raises:
            ValueError: bad settings, an unsupported device, or a data error (`DataError` is a ValueError).
        """
        settings = self.settings_cls() if settings is None else settings
        if isinstance(block_batch, bool) or not isinstance(block_batch, int) or block_batch < 1:
            raise ValueError(f"block_batch must be an integer >= 1, got {block_batch!r}")
        self.check_device(device)
        problem, task = self.builder(settings, dtype, torch.device(device))
        return BuiltTask(problem, TaskAdapter(task, block_batch))


# ---------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add `spec` to :data:`TASKS` (ValueError if the name is taken, unless `replace`)."""
    if not replace and spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    fields_ = {f.name for f in dataclasses.fields(spec.settings_cls)}
    bad = sorted(name for name in spec.aliases.values() if name not in fields_)
    if bad:
        raise ValueError(f"aliases of task {spec.name!r} name unknown settings fields {bad}")
    names = spec.setting_names()
    for label, setting in (("dataset_setting", spec.dataset_setting), ("data_dir_setting", spec.data_dir_setting)):
        if setting is not None and setting not in names:
            raise ValueError(f"{label} {setting!r} of task {spec.name!r} is not one of its settings {names}")
    TASKS[spec.name] = spec
    return spec


def task_names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of a registered task.

    Raises:
        ValueError: unknown name (with close matches and the known names).
    """
    if name not in TASKS:
        close = difflib.get_close_matches(name, task_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} Known: {', '.join(task_names())}")
    return TASKS[name]
