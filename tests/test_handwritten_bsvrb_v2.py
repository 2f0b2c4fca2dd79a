"""The hand-written closed-form BSVRB_v2 (benchmarks/handwritten_bsvrb_v2.py) follows the library's BSVRBv2
trajectory to rounding, which is what makes it a valid speed floor in benchmarks/bench_hyperparam.py."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from mbbo.algorithms.registry import make_algorithm
from mbbo.blocks import MovingBlocks
from mbbo.tasks.hyperparam import load_task
from module_loading import load_module

HANDWRITTEN = Path(__file__).resolve().parents[1] / "benchmarks" / "handwritten_bsvrb_v2.py"
TOL = 1e-10


def _load_handwritten() -> ModuleType:
    return load_module("handwritten_bsvrb_v2", HANDWRITTEN)


hw = _load_handwritten()


@pytest.mark.parametrize(("seed", "hyper"), [
    (0, {}),
    (3, {}),
    (1, {"v_radius": 0.3}),  # projection active: replayed projected steps of v
    (2, {"lr": 0.5, "lower_lr": 0.5, "linsys_lr": 0.7, "alpha": 0.5, "gamma": 0.3, "beta": 0.6,
         "init_batch_size": 8}),
])
def test_handwritten_follows_library_trajectory(seed: int, hyper: dict) -> None:
    task = load_task("breast_cancer", num_blocks=6, dtype=torch.float64, row_sampling="replacement")
    problem = task.problem()
    library = make_algorithm("bsvrb_v2", problem, seed=seed, block_batch=3, **hyper)
    mine = hw.HandwrittenBSVRBv2(task, problem, seed=seed, block_batch=3, **hyper)
    projected = 0
    for it in range(20):
        library.step()
        mine.step()
        ours = mine.state()
        theirs = {"x": library.x, "z": library.z, "y": library.lower_variables(),
                  "v": library.linear_system_variables()}
        for key, value in theirs.items():
            err = float((ours[key] - value).abs().max())
            assert err <= TOL, f"iteration {it}: {key} differs by {err:.3e}"
        if "v_radius" in hyper:
            projected += int((theirs["v"].norm(dim=1) >= hyper["v_radius"] * (1 - 1e-12)).sum())
    assert mine.iteration == library.iteration == 20
    assert float(library.x.sub(problem.x0).abs().max()) > 0  # the trajectory moved
    if "v_radius" in hyper:
        assert projected > 0  # the projected path was exercised


def test_replay_matches_projected_steps() -> None:
    """The 2-D replay equals the library's k-fold projected steps on d-vectors."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    start = start / start.norm(dim=1, keepdim=True) * torch.rand(7, 1, generator=gen, dtype=torch.float64)
    direction = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    steps = torch.tensor([0, 1, 2, 5, 9, 17, 40])
    ref = MovingBlocks(start, direction, 0.3, radius=1.0)
    want_cur, want_prev = ref._replay(start, direction, steps)
    got_cur, got_prev = hw.replay_projected(start, 0.3 * direction, steps, 1.0)
    torch.testing.assert_close(got_cur, want_cur, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_prev, want_prev, rtol=0, atol=1e-12)
    assert bool((want_cur.norm(dim=1) > 1.0 - 1e-9).any())  # some rows reached the sphere


def test_softplus_slope_matches_autograd() -> None:
    t = torch.tensor([-30.0, -1.0, 0.0, 3.0, 19.99, 20.01, 35.0], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(torch.nn.functional.softplus(t).sum(), t)
    torch.testing.assert_close(hw.softplus_slope(t.detach()), slope, rtol=0, atol=1e-15)
