"""Algorithms by name: `make_algorithm("bsvrb_v2", problem, seed=0, lr=1e-3)`; `register_algorithm(cls)` adds one
(see docs/adding_an_algorithm.md)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from typing import Any, TypeVar

from mbbo.algorithms.base import BilevelAlgorithm, Hyper
from mbbo.algorithms.restart import Restarted
from mbbo.problem import MultiBlockProblem

# every class in these modules that sets its own `name` is registered under it
ALGORITHM_MODULES = ("bsvrb", "rsvrb", "stocbio", "aid_itd", "classic", "amigo", "soba", "saba", "mrbo", "f2sa",
                     "unbounded", "sflcb", "blocc", "lv_hba", "constrained_penalty")


RESTART_PREFIX = "re_"
AlgorithmClass = TypeVar("AlgorithmClass", bound=type[BilevelAlgorithm])
ALGORITHMS: dict[str, type[BilevelAlgorithm]] = {}


def register_algorithm(cls: AlgorithmClass, *, replace: bool = False) -> AlgorithmClass:
    """Registers an algorithm class under its `name` (usable as a class decorator); returns the class.

    The class must subclass `BilevelAlgorithm`, set its own `name` (lower-case letters, digits and "_", not
    starting with "re_", which names restarted variants), a `Config` dataclass deriving from `Hyper` and, when it
    keeps state beyond the base's, a `State` dataclass deriving from its parent's `State`. A name registered
    already raises ValueError unless `replace=True`. Registered algorithms are run by `make_algorithm`, the CLI
    and the contract suite (tests/test_algorithm_contract.py).
    """
    if not (inspect.isclass(cls) and issubclass(cls, BilevelAlgorithm)):
        raise TypeError(f"register_algorithm takes a BilevelAlgorithm subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name.startswith(RESTART_PREFIX):
        raise ValueError(f"{cls.__name__}.name must be a lower-case identifier not starting with "
                         f"{RESTART_PREFIX!r}, got {name!r}")
    if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, Hyper)):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass deriving from Hyper, got {cls.Config!r}")
    if not (dataclasses.is_dataclass(cls.State) and issubclass(cls.State, BilevelAlgorithm.State)):
        raise TypeError(f"{cls.__name__}.State must be a dataclass deriving from BilevelAlgorithm.State")
    if name in ALGORITHMS and ALGORITHMS[name] is not cls and not replace:
        raise ValueError(f"algorithm name {name!r} is registered already (by {ALGORITHMS[name].__qualname__}); "
                         "pass replace=True to replace it")
    ALGORITHMS[name] = cls
    return cls


def _collect() -> None:
    for module_name in ALGORITHM_MODULES:
        module = importlib.import_module(f"mbbo.algorithms.{module_name}")
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, BilevelAlgorithm) and cls.__module__ == module.__name__
                    and "name" in cls.__dict__):
                if cls.name in ALGORITHMS:
                    raise RuntimeError(f"algorithm name {cls.name!r} registered twice")
                register_algorithm(cls)


_collect()
RESTART_OPTIONS = ("stage_length", "decay", "growth", "output")


def restartable(cls: type[BilevelAlgorithm]) -> bool:
    """Whether `re_<name>` exists for the algorithm: it has a `restart()` (re-initialising its estimators at the
    current point between the stages of `Restarted`).

    The constrained methods (SFLCB, BLOCC, LV-HBA) have none, so no `re_` variant: they are deterministic
    primal-dual / value-function methods with no variance-reduced estimator to re-initialise, their multipliers and
    slacks are the state their convergence rests on (resetting them would discard progress), and their step
    sizes are not the ones `Restarted` decays; a restarted variant would be a step-size schedule under another
    name, with no analysis behind it."""
    return callable(getattr(cls, "restart", None))


def algorithm_names() -> list[str]:
    """Every registered name, and the restarted variants (re_<name>) of the `restartable` ones."""
    return sorted(ALGORITHMS) + sorted(RESTART_PREFIX + n for n, c in ALGORITHMS.items() if restartable(c))


def split_name(name: str) -> tuple[str, bool]:
    """(registered name, restarted) of an algorithm name (`re_<name>` is the restarted `<name>`).

    Raises:
        ValueError: unknown name (with close matches and the known names), or `re_<name>` of an algorithm that is
            not `restartable` (naming the ones that are).
    """
    base = name[len(RESTART_PREFIX):] if name.startswith(RESTART_PREFIX) else name
    if base not in ALGORITHMS:
        close = difflib.get_close_matches(name, algorithm_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint} Known: {', '.join(algorithm_names())}")
    if base != name and not restartable(ALGORITHMS[base]):
        supported = sorted(n for n, c in ALGORITHMS.items() if restartable(c))
        raise ValueError(f"{base} has no restarted variant {name!r} (it has no restart(): nothing to re-initialise "
                         f"between stages); restartable algorithms: {', '.join(supported)}")
    return base, base != name


def make_algorithm(name: str, problem: MultiBlockProblem, *, seed: int = 0, **hyper: Any
                   ) -> BilevelAlgorithm | Restarted:
    """Builds an algorithm by name; `re_<name>` wraps it in `Restarted` (options: stage_length, decay,
    growth, output). Unknown names raise ValueError listing the known ones (`split_name`)."""
    base, restarted = split_name(name)
    restart = {k: hyper.pop(k) for k in RESTART_OPTIONS if k in hyper}
    if restart and not restarted:
        raise ValueError(f"options {sorted(restart)} apply only to restarted algorithms (re_{name})")
    algorithm = ALGORITHMS[base](problem, seed=seed, **hyper)
    return Restarted(algorithm, **restart) if restarted else algorithm
