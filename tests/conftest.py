from __future__ import annotations

from pathlib import Path

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
