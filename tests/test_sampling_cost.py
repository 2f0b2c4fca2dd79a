"""The authors' options (reshuffled blocks and rows, delayed lower step, U[0, 1) estimators) add no per-iteration
work that grows with m: at m = 10^4 the samplers return the same rows and the step reads/writes the same number
of block rows as at m = 100, and the whole step produces no more tensor elements, except at the iterations
where a block permutation is drawn (one O(m) draw every m // B iterations: amortised O(B))."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mbbo.algorithms.registry import make_algorithm
from mbbo.tasks.hyperparam import HyperparamSettings, HyperparamTask

B, b, STEPS = 10, 4, 12
AUTHORS = {"block_batch": B, "block_sampling": "reshuffle", "estimator_init": "uniform"}


class ElementCounter(TorchDispatchMode):
    """Sums the elements of the outputs of every op that allocates them (in-place ops and views, which return
    their whole input, are left out); records the sizes of the permutations drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0
        self.permutations: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if "randperm" in str(func):
            self.permutations.append(int(args[0]))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


def synthetic_task(m: int) -> HyperparamTask:
    """T1 on random data: n_train = 400, n_val = 200, d = 5 (with bias), m temperatures."""
    gen = torch.Generator().manual_seed(0)
    X = torch.cat([torch.ones(600, 1, dtype=torch.float64), torch.randn(600, 4, generator=gen, dtype=torch.float64)], 1)
    y = torch.where(torch.rand(600, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0).to(torch.float64)
    temps = 1 + 10 * torch.rand(m, generator=gen, dtype=torch.float64)
    return HyperparamTask(X[:400], y[:400], X[400:], y[400:], X[400:], y[400:], temps,
                          HyperparamSettings(num_blocks=m, batch_size=b, row_sampling="reshuffle"))


def step_costs(name: str, m: int, **hyper: Any) -> tuple[list[int], list[list[int]], Counter[str]]:
    """Per step: tensor elements produced, sizes of the permutations drawn; and the rows/blocks the samplers and
    tables saw."""
    algo = make_algorithm(name, synthetic_task(m).problem(), seed=0, **AUTHORS, **hyper)
    seen: Counter[str] = Counter()

    def count(obj: Any, method: str, key: str, rows_of: Any) -> None:
        inner = getattr(obj, method)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            seen[key] += rows_of(args, out)
            return out
        setattr(obj, method, wrapped)

    for sampler in ("lower_sampler", "upper_sampler"):
        count(getattr(algo, sampler), "sample", "rows sampled", lambda a, out: out["index"].numel())
    tables = [algo.y] + ([algo.v] if hasattr(algo, "v") else [])
    for table in tables:
        count(table, "read", "block rows read", lambda a, out: a[0].numel())
        count(table, "write", "block rows written", lambda a, out: a[0].numel())
    elements, permutations = [], []
    for _ in range(STEPS):
        with ElementCounter() as counter:
            algo.step()
        elements.append(counter.elements)
        permutations.append(counter.permutations)
    return elements, permutations, seen


@pytest.mark.parametrize(("name", "hyper"), [
    ("bsvrb_v1", {}),
    ("bsvrb_v1", {"hessian_guard": "frobenius_rescale", "hessian_timing": "previous"}),
    ("bsvrb_v2", {"lower_update": "delayed"}),
    ("ma_v2", {"lower_update": "delayed"}),
    ("rsvrb", {}),
])
def test_per_step_cost_does_not_grow_with_m(name: str, hyper: dict[str, Any]) -> None:
    small_el, small_perm, small_seen = step_costs(name, 100, **hyper)
    large_el, large_perm, large_seen = step_costs(name, 10_000, **hyper)
    assert large_seen == small_seen  # identical sampled rows and table accesses
    assert small_seen["rows sampled"] == 2 * STEPS * B * b
    # row permutations (n = 400 and 200 rows): the same at both m, one per data epoch of n // (B b) steps
    def rows(perms: list[list[int]]) -> list[list[int]]:
        return [[n for n in p if n in (400, 200)] for p in perms]
    assert rows(large_perm) == rows(small_perm)
    assert sum(p.count(400) for p in small_perm) == -(-STEPS // (400 // (B * b)))
    # block permutations: one per m // B steps (RSVRB: two samplers); at m = 10^4 only at the first step
    samplers = 2 if name == "rsvrb" else 1
    assert [p.count(10_000) for p in large_perm] == [samplers] + [0] * (STEPS - 1)
    assert [p.count(100) for p in small_perm] == [samplers if k % (100 // B) == 0 else 0 for k in range(STEPS)]
    # without the steps that draw a block permutation, the step's work is not larger at m = 10^4
    for k in range(1, STEPS):
        if 100 not in small_perm[k]:
            assert large_el[k] <= small_el[k], (k, large_el[k], small_el[k])
