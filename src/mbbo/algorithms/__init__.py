"""Bilevel algorithms: `make_algorithm(name, problem, **hyper)`, `register_algorithm(cls)` to add one.

The names are loaded lazily from `mbbo.algorithms.registry` (importing it imports every algorithm module).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALGORITHMS", "algorithm_names", "make_algorithm", "register_algorithm"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mbbo.algorithms import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mbbo.algorithms' has no attribute {name!r}")
