from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the project (CI clones the project with shared/ beside it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _float64_and_threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def bq():
    """A small T3 (benchopt `simulated`) instance for the zoo tests: d_in = 20, d_out = 5, float64;
    ||grad h(x0)||^2 = 2.43, value-Hessian spectrum in [0.02, 1.07]. `bq.problem(batch_size)` is the m = 1 problem."""
    from mbbo.tasks.benchopt_quadratic import make_benchopt_quadratic

    return make_benchopt_quadratic(n_inner=512, n_outer=512, d_in=20, d_out=5, random_state=0)


def _resumed_twin(make: Callable[[int], Any], before: int, after: int) -> tuple[Any, Any]:
    """``(reference, resumed)`` for the resume tests. ``make(seed)`` builds an algorithm; the reference runs ``before``
    steps, its ``state_dict`` goes through ``torch.save`` / ``torch.load`` into one built with another seed, then
    each runs ``after`` more steps. Equal states afterwards mean resuming is bit-identical."""
    reference = make(3)
    for _ in range(before):
        reference.step()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    buffer.seek(0)
    for _ in range(after):
        reference.step()
    resumed = make(99)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for _ in range(after):
        resumed.step()
    return reference, resumed


@pytest.fixture
def resumed_twin() -> Callable[[Callable[[int], Any], int, int], tuple[Any, Any]]:
    """:func:`_resumed_twin`: ``ref, resumed = resumed_twin(lambda seed: make_algorithm(..., seed=seed), 3, 3)``."""
    return _resumed_twin
