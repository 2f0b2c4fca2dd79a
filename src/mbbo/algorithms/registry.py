"""Algorithms by name: `make_algorithm("bsvrb_v2", problem, seed=0, lr=1e-3)`."""

from __future__ import annotations

import difflib
from typing import Any

from mbbo.algorithms.base import BilevelAlgorithm
from mbbo.algorithms.bsvrb import BSVRBv1, BSVRBv2, MovingAverageV1, MovingAverageV2
from mbbo.algorithms.restart import Restarted
from mbbo.algorithms.rsvrb import RSVRB
from mbbo.problem import MultiBlockProblem

ALGORITHMS: dict[str, type[BilevelAlgorithm]] = {
    cls.name: cls for cls in (BSVRBv1, BSVRBv2, RSVRB, MovingAverageV1, MovingAverageV2)
}
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
