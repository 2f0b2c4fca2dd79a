"""The building blocks of the blockwise methods (`mbbo.algorithms.blockwise`), the restart registry
(`restartable`, `split_name`) and `Hyper.in_use`, checked directly (their trajectories: test_trajectory_golden)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mbbo.algorithms.base import Hyper
from mbbo.algorithms.blockwise import (
    blockwise_oracle_calls,
    blockwise_table_bytes,
    close_iteration,
    draw_blocks,
    linear_system_rows,
    linear_system_update,
    lower_table,
    moved_rows,
    sample_blocks,
    table_step,
    x_points,
)
from mbbo.algorithms.bsvrb import BSVRBv1, BSVRBv2, MovingAverageV1, MovingAverageV2
from mbbo.algorithms.f2sa import F2SAConfig
from mbbo.algorithms.registry import ALGORITHMS, restartable, split_name
from mbbo.blocks import DelayedBlocks, MovingBlocks
from mbbo.trackers import EMA, STORM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_algorithm_contract import assert_same, build


def test_lower_tables_follow_the_lower_update_form() -> None:
    ma, bsvrb = build("ma_v2"), build("bsvrb_v2")
    assert isinstance(ma.y, MovingBlocks) and isinstance(ma.v, MovingBlocks)
    # the eager moving-average method moves only sampled blocks, at write time: its tables move nothing
    assert table_step(ma, "lower_lr", moving_average=True) == 0.0 == ma.y.step == ma.v.step
    assert table_step(bsvrb, "lower_lr", moving_average=False) == bsvrb.hyper("lower_lr") == bsvrb.y.step > 0
    delayed = build("ma_v2", lower_update="delayed")
    assert isinstance(delayed.y, DelayedBlocks) and delayed.y.step == delayed.hyper("lower_lr") > 0
    assert delayed.accumulates_lower_steps and not ma.accumulates_lower_steps and bsvrb.accumulates_lower_steps
    rows, directions = torch.zeros(4, 2, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    table = lower_table(bsvrb, rows, directions, "linsys_lr", moving_average=False, radius=1.0)
    assert table.step == bsvrb.hyper("linsys_lr") and table.values is rows


def test_moved_rows_only_under_the_eager_moving_average_method() -> None:
    ma = build("ma_v2", linsys_lr=3.0, lower_lr_scaling="none")
    rows, direction = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    assert moved_rows(build("bsvrb_v2"), rows, direction, "lower_lr", moving_average=False) is rows
    moved = moved_rows(ma, rows, direction, "linsys_lr", moving_average=True, radius=1.0)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(2, dtype=torch.float64))  # -3 (1, 1), projected
    assert torch.equal(moved_rows(ma, rows, direction, "linsys_lr", moving_average=True), -3.0 * direction)


def test_draw_blocks_reads_one_or_two_points() -> None:
    alg = build("bsvrb_v1")
    b, d_x, d_y = alg.config.block_batch, alg.problem.dim_x, alg.problem.dim_y
    one = draw_blocks(alg, two=False)
    assert x_points(alg, two=False).shape == (1, d_x) and one.ys.shape == (1, b, d_y) and one.sampled.shape == (b,)
    assert torch.equal(one.y, alg.lower_variables()[one.blocks])
    two = draw_blocks(alg, two=True)
    assert two.ys.shape == (2, b, d_y) and torch.equal(x_points(alg, two=True), torch.stack([alg.x, alg.x_prev]))


def test_sample_blocks_attaches_the_block_constants_once() -> None:
    """The batches carry the sampled blocks' constants (the oracles then take them as they are)."""
    from mbbo.tasks.hyperparam import load_task

    problem = load_task("breast_cancer", num_blocks=6, dtype=torch.float64, row_sampling="replacement").problem()
    alg = BSVRBv2(problem, block_batch=3)
    sample = sample_blocks(alg)
    for batch in (sample.lower, sample.upper):
        assert torch.equal(batch["temperature"], problem.block_data["temperature"][sample.sampled])
    assert alg.oracles._has_block_data(sample.lower)


@pytest.mark.parametrize("name", ["bsvrb_v2", "ma_v2"])
def test_linear_system_iteration_is_sampling_update_and_close(name: str) -> None:
    """`sample_blocks`, `linear_system_update` (which writes the sampled rows) and `close_iteration` make one
    `step()`: a twin that steps ends in the same state; the rows the update reads are the tables' reads."""
    alg, twin = build(name, v_radius=0.05), build(name, v_radius=0.05)  # a small ball: projected paths
    for _ in range(3):
        alg.step()
        twin.step()
    sample, t = sample_blocks(alg), alg.iteration
    rows = linear_system_rows(alg, sample.blocks, torch.tensor(t))
    assert torch.equal(rows.y[0], alg.y.read(sample.blocks, t)[0])
    assert torch.equal(rows.u, alg.v.directions[sample.blocks])
    bsvrb = name == "bsvrb_v2"
    tracker = alg.config.msvr(alg.problem.num_blocks) if bsvrb else EMA(alg.config.alpha)
    z, x = linear_system_update(alg, sample, torch.tensor(t), bsvrb, tracker,
                                STORM(alg.config.beta) if bsvrb else EMA(alg.config.beta), not bsvrb)
    close_iteration(alg, sample, (alg.y, alg.v), z, x)
    twin.step()
    assert_same(alg.state_dict(), twin.state_dict())


def test_costs_of_the_four_methods() -> None:
    b = 2
    assert blockwise_oracle_calls(build("bsvrb_v1"), "hessian_yy", 2)["hessian_yy"] == 2 * b
    assert build("ma_v2").oracle_calls_per_step()["hvp"] == b
    assert build("bsvrb_v2").oracle_calls_per_step()["hvp"] == 2 * b
    v1, v1_previous = build("bsvrb_v1"), build("bsvrb_v1", hessian_timing="previous")
    assert v1_previous.table_bytes() == v1.table_bytes() + v1.hessians.numel() * 8 + v1.hessians.shape[0] * 8
    v2 = build("bsvrb_v2")
    assert v2.table_bytes() == blockwise_table_bytes((v2.y, v2.v)) == v2.y.nbytes() + v2.v.nbytes()


@pytest.mark.parametrize(("cls", "twin"), [(MovingAverageV1, BSVRBv1), (MovingAverageV2, BSVRBv2)])
def test_moving_average_methods_keep_their_names_and_state_keys(cls: type, twin: type) -> None:
    alg = build(cls.name)
    saved = alg.state_dict()
    assert alg.name == saved["name"] == cls.name and cls.State is twin.State
    assert set(saved["state"]) == set(build(twin.name).state_dict()["state"])


def test_hyper_in_use_resolves_a_default_standing_for_another_value() -> None:
    assert Hyper().in_use.__func__ is Hyper.in_use  # type: ignore[attr-defined]
    assert F2SAConfig(lr=0.3).in_use("lower_lr") == 0.3 and F2SAConfig(lr=0.3, lower_lr=0.1).in_use("lower_lr") == 0.1
    assert F2SAConfig(lr=0.3).in_use("lr") == 0.3
    assert F2SAConfig(lr=0.3).step_sizes(0)[1] == F2SAConfig(lr=0.3, lower_lr=0.3).step_sizes(0)[1]


def test_split_name_and_restartable() -> None:
    assert split_name("re_bsvrb_v2") == ("bsvrb_v2", True) and split_name("soba") == ("soba", False)
    assert restartable(ALGORITHMS["f2sa"]) and not restartable(ALGORITHMS["blocc"])
    with pytest.raises(ValueError, match=r"sflcb has no restarted variant 're_sflcb'.*restartable algorithms: .*soba"):
        split_name("re_sflcb")
    with pytest.raises(ValueError, match="unknown algorithm 're_nothing'"):
        split_name("re_nothing")
