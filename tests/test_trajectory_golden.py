"""Golden trajectories of the algorithms: a refactor must not change any iterate.

For every registered algorithm (and option variants that take other code paths), the tiny
problem and the cheap hyper-parameters of the contract suite (`test_algorithm_contract.build`) are run for
`STEPS` steps, plain and, where the algorithm has a `restart`, restarted (`re_<name>`, stage length 2: exercises
`restart` and `set_hyper`), in float64;
x and `lower_variables()` after every step must equal the stored values to 1e-12 (they are compared
bit for bit first; the tolerance only absorbs a different summation order, should one appear).
The blockwise methods (BSVRB_v1/v2, the moving-average method, RSVRB) also run on a small T1 (hyperparam,
m = 6, sparse x; x and y compared through `digest`; skipped when the shared data is absent).

The values live in `tests/data/trajectory_golden.pt`. Regenerate them (only when a trajectory is meant to change,
and say why in the commit) with

    PYTHONPATH=src python tests/test_trajectory_golden.py --regenerate
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mbbo.algorithms.registry import ALGORITHMS, make_algorithm, restartable
from mbbo.problem import MultiBlockProblem
from mbbo.tasks.registry import get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SHARED_DATA
from test_algorithm_contract import fitting_problem, small_hyper

GOLDEN = Path(__file__).resolve().parent / "data" / "trajectory_golden.pt"
STEPS = 5
TOLERANCE = 1e-12

# the single-block algorithms
NAMES = ("accbo", "ada_bio", "adambo", "aid_bio", "amigo", "blocc", "bo_rep", "bsa", "f2sa", "f2sa_projected",
         "fo_itd_bio", "fsla", "itd_bio", "lv_hba", "ma_soba", "mrbo", "penalty", "saba", "sflcb", "slip", "soba",
         "srba", "stocbio", "sustain", "ttsa", "vr_adambo", "vrbo")
# option variants: other solvers, memories, orderings, step rules
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "aid_bio[neumann]": ("aid_bio", {"linsys_solver": "neumann"}),
    "aid_bio[cg]": ("aid_bio", {"linsys_solver": "cg"}),
    "aid_bio[fixed_point,cold]": ("aid_bio", {"linsys_solver": "fixed_point", "warm_start_v": False,
                                              "warm_start": False}),
    "stocbio[decay]": ("stocbio", {"lr_exponent": 0.5, "lower_lr_exponent": 0.3}),
    "saba[sample,full]": ("saba", {"memory": "sample", "init_memory": "full"}),
    "srba[period2]": ("srba", {"period": 2}),
    "srba[refresh_batch]": ("srba", {"period": 2, "refresh_batch_size": 8}),
    "vrbo[period2]": ("vrbo", {"period": 2}),
    "soba[radius]": ("soba", {"v_radius": 0.05}),
    "f2sa[two_samples,paper]": ("f2sa", {"shared_x_sample": False, "lambda_schedule": "paper"}),
    "slip[clipped]": ("slip", {"step_rule": "clipped", "clip": 0.1}),
    "slip[sgd]": ("slip", {"step_rule": "sgd"}),
    "bo_rep[epochs]": ("bo_rep", {"refine_epochs": 2, "refine_radius": 0.5, "z_radius": 0.5}),
    "accbo[biased,warm]": ("accbo", {"neumann_unbiased": False, "warm_start_steps": 2}),
    "ada_bio[consecutive]": ("ada_bio", {"variance_estimate": "consecutive"}),
    "sflcb[gauss_seidel,cold]": ("sflcb", {"ordering": "gauss_seidel", "warm_start": False}),
}
# the blockwise multi-block methods: the options that take other code paths (block sampling, lower-update
# form, lazy or eager tables, estimator initialisation, v1's Hessian guard and timing), on the tiny m = 4 problem
UNIFORM, RESHUFFLE = {"block_sampling": "uniform"}, {"block_sampling": "reshuffle"}
DELAYED, EAGER = {"lower_update": "delayed"}, {"lower_update": "eager", "lazy": False}
FROBENIUS_PREVIOUS = {"hessian_guard": "frobenius_rescale", "hessian_timing": "previous"}
BLOCKWISE: dict[str, tuple[str, dict[str, Any]]] = {
    "bsvrb_v1": ("bsvrb_v1", {}),
    "bsvrb_v1[reshuffle,delayed,uniform]": ("bsvrb_v1", {**RESHUFFLE, **DELAYED, "estimator_init": "uniform"}),
    "bsvrb_v1[eager,zeros]": ("bsvrb_v1", {**EAGER, "estimator_init": "zeros"}),
    "bsvrb_v1[frobenius,previous]": ("bsvrb_v1", FROBENIUS_PREVIOUS),
    "bsvrb_v1[frobenius,previous,delayed,uniform]": ("bsvrb_v1", {**FROBENIUS_PREVIOUS, **DELAYED,
                                                                  "estimator_init": "uniform"}),
    "bsvrb_v1[previous,eager,reshuffle]": ("bsvrb_v1", {"hessian_timing": "previous", **EAGER, **RESHUFFLE}),
    "bsvrb_v2": ("bsvrb_v2", {}),
    "bsvrb_v2[reshuffle,delayed,uniform]": ("bsvrb_v2", {**RESHUFFLE, **DELAYED, "estimator_init": "uniform"}),
    "bsvrb_v2[eager,zeros]": ("bsvrb_v2", {**EAGER, "estimator_init": "zeros"}),
    "bsvrb_v2[delayed,zeros,theory]": ("bsvrb_v2", {**DELAYED, "estimator_init": "zeros", "gamma": "theory",
                                                    "alpha": 0.5}),
    "ma_v1": ("ma_v1", {}),
    "ma_v1[reshuffle,delayed]": ("ma_v1", {**RESHUFFLE, **DELAYED}),
    "ma_v1[eager,uniform]": ("ma_v1", {**EAGER, "estimator_init": "uniform"}),
    "ma_v1[frobenius,previous,reshuffle]": ("ma_v1", {**FROBENIUS_PREVIOUS, **RESHUFFLE}),
    "ma_v2": ("ma_v2", {}),
    "ma_v2[delayed,uniform]": ("ma_v2", {**DELAYED, "estimator_init": "uniform"}),
    "ma_v2[eager,zeros,reshuffle]": ("ma_v2", {**EAGER, "estimator_init": "zeros", **RESHUFFLE}),
    "rsvrb": ("rsvrb", {}),
    "rsvrb[reshuffle,uniform]": ("rsvrb", {**RESHUFFLE, "estimator_init": "uniform"}),
    "rsvrb[zeros]": ("rsvrb", {**UNIFORM, "estimator_init": "zeros"}),
}
# ... and on a small T1 (hyperparam: sparse x, grad_x f absent), as tests/test_distributed.py builds it
T1 = {"num_blocks": 6, "batch_size": 4, "eval_blocks": None}
T1_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "bsvrb_v1[t1]": ("bsvrb_v1", {"block_batch": 3}),
    "bsvrb_v1[t1,previous,uniform]": ("bsvrb_v1", {"block_batch": 4, "hessian_timing": "previous",
                                                   "estimator_init": "uniform"}),
    "bsvrb_v2[t1,delayed,reshuffle,uniform]": ("bsvrb_v2", {"block_batch": 3, **RESHUFFLE, **DELAYED,
                                                            "estimator_init": "uniform"}),
    "ma_v1[t1]": ("ma_v1", {"block_batch": 3}),
    "ma_v2[t1,eager]": ("ma_v2", {"block_batch": 3, **EAGER}),
    "rsvrb[t1,reshuffle,uniform]": ("rsvrb", {"block_batch": 3, **RESHUFFLE, "estimator_init": "uniform"}),
    "rsvrb[t1]": ("rsvrb", {"block_batch": 3}),
}
CASES: dict[str, tuple[str, dict[str, Any]]] = {**{n: (n, {}) for n in NAMES}, **VARIANTS, **BLOCKWISE, **T1_CASES}


@functools.cache
def t1_problem(block_batch: int) -> MultiBlockProblem:
    spec = get_task("hyperparam")
    problem, _ = spec.build(spec.make_settings({**T1, "data_dir": str(SHARED_DATA / "libsvm")}),
                            block_batch=block_batch)
    return problem


def trajectory(case: str, restarted: bool) -> list[torch.Tensor]:
    """[x_1, y_1, ..., x_STEPS, y_STEPS] (y: `lower_variables()`, flattened), float64."""
    name, options = CASES[case]
    if case in T1_CASES:
        problem, hyper = t1_problem(options["block_batch"]), dict(options)
    else:
        problem = fitting_problem(name)
        hyper = {**small_hyper(name, problem), **options}
    assert problem.x0.dtype == torch.float64
    if restarted:
        hyper["stage_length"] = 2
    algorithm = make_algorithm(("re_" if restarted else "") + name, problem, seed=7, **hyper)
    out = []
    for _ in range(STEPS):
        algorithm.step()
        x, y = algorithm.x.flatten().clone(), algorithm.lower_variables().flatten().clone()
        out += [digest(x), digest(y)] if case in T1_CASES else [x, y]
    return out


def digest(x: torch.Tensor) -> torch.Tensor:
    """A long x or y (T1: x has one entry per data row) as stored: its first 32 entries, its sum and 16 fixed random
    projections (a changed entry changes them; the file stays small)."""
    directions = torch.randn(16, x.numel(), generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    return torch.cat([x[:32], x.sum().reshape(1), directions @ x])


def stored(values: list[torch.Tensor]) -> torch.Tensor:
    """A trajectory as stored: one (2 STEPS, max length) tensor, rows padded with NaN (one tensor per case keeps
    the file small)."""
    width = max(v.numel() for v in values)
    out = torch.full((len(values), width), torch.nan, dtype=torch.float64)
    for i, v in enumerate(values):
        out[i, :v.numel()] = v
    return out


def _key(case: str, restarted: bool) -> str:
    return ("re_" if restarted else "") + case


def _restartable(case: str) -> bool:
    """Whether the algorithm has a `re_` variant (the constrained methods have none)."""
    return restartable(ALGORITHMS[CASES[case][0]])


KEYS = [(c, r) for c in sorted(CASES) for r in (False, True) if not r or _restartable(c)]


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize(("case", "restarted"), KEYS, ids=[_key(c, r) for c, r in KEYS])
def test_trajectory_matches_golden(case: str, restarted: bool, golden: dict[str, torch.Tensor]) -> None:
    if case in T1_CASES and not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    expected = golden[_key(case, restarted)]
    got = trajectory(case, restarted)
    assert len(got) == len(expected)
    for i, (a, row) in enumerate(zip(got, expected, strict=True)):
        what = f"{_key(case, restarted)}: {'x' if i % 2 == 0 else 'y'} after step {i // 2 + 1}"
        b = row[:a.numel()]
        assert a.dtype == b.dtype and bool(row[a.numel():].isnan().all()), what
        if not torch.equal(a, b):
            torch.testing.assert_close(a, b, rtol=0.0, atol=TOLERANCE, msg=what)


def test_golden_covers_every_case(golden: dict[str, torch.Tensor]) -> None:
    assert set(golden) == {_key(c, r) for c, r in KEYS}


def regenerate() -> None:
    torch.set_num_threads(1)
    data = {_key(c, r): stored(trajectory(c, r)) for c, r in KEYS}
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(data, GOLDEN)
    print(f"wrote {len(data)} trajectories to {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    regenerate()
