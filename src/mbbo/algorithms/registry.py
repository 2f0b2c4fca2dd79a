"""Algorithms by name: `make_algorithm("bsvrb_v2", problem, seed=0, lr=1e-3)`."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from mbbo.algorithms.base import BilevelAlgorithm
from mbbo.algorithms.restart import Restarted
from mbbo.problem import MultiBlockProblem

# every class in these modules that sets its own `name` is registered under it
ALGORITHM_MODULES = ("bsvrb", "rsvrb", "stocbio", "aid_itd", "classic", "amigo", "soba", "saba", "mrbo", "f2sa",
                     "unbounded", "sflcb", "blocc", "lv_hba", "constrained_penalty")


def _collect() -> dict[str, type[BilevelAlgorithm]]:
    found: dict[str, type[BilevelAlgorithm]] = {}
    for module_name in ALGORITHM_MODULES:
        module = importlib.import_module(f"mbbo.algorithms.{module_name}")
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, BilevelAlgorithm) and cls.__module__ == module.__name__
                    and "name" in cls.__dict__):
                if cls.name in found:
                    raise RuntimeError(f"algorithm name {cls.name!r} registered twice")
                found[cls.name] = cls
    return found


ALGORITHMS: dict[str, type[BilevelAlgorithm]] = _collect()
RESTART_PREFIX = "re_"
RESTART_OPTIONS = ("stage_length", "decay", "growth", "output")


def algorithm_names() -> list[str]:
    """Every registered name, restarted variants included (re_<name>)."""
    return sorted(ALGORITHMS) + sorted(RESTART_PREFIX + n for n in ALGORITHMS)


def make_algorithm(name: str, problem: MultiBlockProblem, *, seed: int = 0, **hyper: Any
                   ) -> BilevelAlgorithm | Restarted:
    """Builds an algorithm by name; `re_<name>` wraps it in `Restarted` (options: stage_length, decay,
    growth, output). Unknown names raise ValueError listing the known ones."""
    base = name[len(RESTART_PREFIX):] if name.startswith(RESTART_PREFIX) else name
    if base not in ALGORITHMS:
        close = difflib.get_close_matches(name, algorithm_names(), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint} Known: {algorithm_names()}")
    restart = {k: hyper.pop(k) for k in RESTART_OPTIONS if k in hyper}
    if restart and base == name:
        raise ValueError(f"options {sorted(restart)} apply only to restarted algorithms (re_{name})")
    algorithm = ALGORITHMS[base](problem, seed=seed, **hyper)
    return Restarted(algorithm, **restart) if base != name else algorithm
