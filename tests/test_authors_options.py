"""The options that reproduce the authors' BSVRB/RSVRB code: reshuffled blocks and rows, the delayed lower step,
estimator initialisation, the Frobenius-rescale Hessian guard; their state in checkpoints; the task defaults."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mbbo.algorithms.bsvrb import BSVRBv1, BSVRBv2
from mbbo.algorithms.registry import make_algorithm
from mbbo.blocks import BlockSampler, DelayedBlocks
from mbbo.problem import RowSampler
from mbbo.projections import frobenius_rescale
from mbbo.tasks.hyperparam import HyperparamSettings, HyperparamTask
from mbbo.tasks.registry import get_task
from mbbo.validation import check_choice

CPU = torch.device("cpu")


def small_task(m: int = 6, row_sampling: str = "reshuffle") -> HyperparamTask:
    gen = torch.Generator().manual_seed(1)
    X = torch.cat([torch.ones(90, 1, dtype=torch.float64), torch.randn(90, 3, generator=gen, dtype=torch.float64)], 1)
    y = torch.where(torch.rand(90, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0).to(torch.float64)
    temps = 1 + 10 * torch.rand(m, generator=gen, dtype=torch.float64)
    return HyperparamTask(X[:60], y[:60], X[60:], y[60:], X[60:], y[60:], temps,
                          HyperparamSettings(num_blocks=m, batch_size=3, row_sampling=row_sampling))


def test_block_sampler_reshuffle_windows_and_state() -> None:
    sampler = BlockSampler(10, 3, "reshuffle")
    gen = torch.Generator().manual_seed(0)
    draws = [sampler.sample(gen, CPU) for _ in range(9)]
    assert sampler.period == 3
    for k in range(0, 9, 3):  # each window of m // B = 3 draws: 9 distinct blocks of the window's permutation
        window = torch.cat(draws[k: k + 3])
        assert window.unique().numel() == 9
    twin = BlockSampler(10, 3, "reshuffle")
    twin.load_state_dict(sampler.state_dict())
    twin_gen = torch.Generator().manual_seed(0)
    twin_gen.set_state(gen.get_state())
    for _ in range(5):
        assert torch.equal(sampler.sample(gen, CPU), twin.sample(twin_gen, CPU))
    with pytest.raises(ValueError, match="block_sampling must be one of 'uniform', 'reshuffle', got 'cyclic'"):
        BlockSampler(10, 3, "cyclic")


def test_row_sampler_reshuffle_slices_epochs_and_state() -> None:
    data = {"X": torch.arange(20.0)[:, None]}
    sampler = RowSampler(data, 3, order="reshuffle")
    gen = torch.Generator().manual_seed(0)
    blocks = torch.tensor([4, 1])
    first = sampler.sample(blocks, gen)
    perm = sampler.permutation
    assert perm is not None
    # block number t of the call takes rows [t b, (t+1) b) of the call's slice of B b = 6 rows
    assert torch.equal(first["index"], perm[:6].view(2, 3))
    assert torch.equal(first["X"][..., 0], first["index"].to(torch.float32))
    # a data epoch is 20 // 6 = 3 calls of distinct rows; the 4th call draws a new permutation
    epoch = [first] + [sampler.sample(blocks, gen) for _ in range(2)]
    assert torch.cat([e["index"].reshape(-1) for e in epoch]).unique().numel() == 18
    state = sampler.state_dict()
    sampler.sample_initial(blocks, gen, 5)  # initialisation batches leave the epoch alone
    assert sampler.position == 18 and sampler.permutation is perm
    twin = RowSampler(data, 3, order="reshuffle")
    twin.load_state_dict(state)
    twin_gen = torch.Generator()
    twin_gen.set_state(gen.get_state())
    fourth = sampler.sample(blocks, gen)
    assert sampler.permutation is not perm and sampler.position == 6
    assert torch.equal(fourth["index"], twin.sample(blocks, twin_gen)["index"])
    # B b above the rows: fresh permutations back to back (see the test below), not an error
    assert sampler.sample(torch.arange(7), gen)["index"].shape == (7, sampler.batch_size)
    with pytest.raises(ValueError, match="per_block=False"):
        RowSampler({"X": torch.zeros(2, 5, 1)}, 2, per_block=True, order="reshuffle")
    with pytest.raises(ValueError, match="row_sampling must be one of"):
        RowSampler(data, 3, order="cyclic")


def test_delayed_blocks_take_the_missed_steps_along_the_fresh_direction() -> None:
    table = DelayedBlocks(torch.zeros(3, 2), torch.ones(3, 2), 0.5, start=0)
    assert table.delays(torch.tensor([0, 1, 2]), 0).tolist() == [1, 1, 1]
    blocks = torch.tensor([1])
    cur, prev = table.read(blocks, 3)  # unsampled blocks have not moved
    assert torch.equal(cur, torch.zeros(1, 2)) and torch.equal(prev, cur)
    table.write(blocks, cur, torch.tensor([[2.0, -2.0]]), 3)  # dc = 4 (iterations 0..3)
    assert torch.equal(table.values[1], torch.tensor([-4.0, 4.0]))
    cur, prev = table.read(blocks, 4)  # the previous point is the value before the update of iteration 3
    assert torch.equal(cur, torch.tensor([[-4.0, 4.0]])) and torch.equal(prev, torch.zeros(1, 2))
    assert torch.equal(table.read(blocks, 5)[1], cur)
    ball = DelayedBlocks(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, radius=1.0)
    ball.write(torch.tensor([0]), torch.zeros(1, 2), torch.tensor([[-3.0, -4.0]]), 0)
    assert torch.allclose(ball.values[0], torch.tensor([0.6, 0.8]))


def test_frobenius_rescale_is_not_a_projection() -> None:
    small = torch.diag(torch.tensor([1.0, -1.0]))  # indefinite, ||H||_F = sqrt(2)
    out = frobenius_rescale(small, 10.0)
    assert torch.allclose(torch.linalg.matrix_norm(out), torch.tensor(10.0))
    assert torch.linalg.eigvalsh(out).min() < 0  # still indefinite
    large = 20.0 * torch.eye(2)
    assert torch.equal(frobenius_rescale(large, 10.0), large)


def test_check_choice_message() -> None:
    check_choice("lower_update", "eager", ("eager", "delayed"))
    with pytest.raises(ValueError, match="lower_update must be one of 'eager', 'delayed', got 'lazy'"):
        check_choice("lower_update", "lazy", ("eager", "delayed"))


@pytest.mark.parametrize("radius", [10.0, 0.05])
def test_delayed_equals_eager_when_every_block_is_sampled(radius: float) -> None:
    """B = m: every block is updated at every iteration (dc = 1), so the two rules coincide."""
    pb = small_task(m=4, row_sampling="replacement").problem()
    runs = [BSVRBv2(pb, seed=2, block_batch=4, lower_update=rule, v_radius=radius) for rule in ("eager", "delayed")]
    for _ in range(8):
        for algo in runs:
            algo.step()
    eager, delayed = runs
    torch.testing.assert_close(delayed.x, eager.x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delayed.lower_variables(), eager.lower_variables(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delayed.linear_system_variables(), eager.linear_system_variables(), rtol=1e-12,
                               atol=1e-12)


def test_delayed_moves_only_sampled_blocks() -> None:
    algo = BSVRBv2(small_task().problem(), seed=0, block_batch=2, lower_update="delayed", block_sampling="reshuffle")
    before = algo.lower_variables()
    algo.step()
    moved = (algo.lower_variables() != before).any(dim=1)
    assert moved.sum() == 2


@pytest.mark.parametrize("how", ["uniform", "zeros"])
def test_estimator_init_fills_every_estimator(how: str) -> None:
    v1 = BSVRBv1(small_task().problem(), seed=0, block_batch=2, estimator_init=how)
    v2 = BSVRBv2(small_task().problem(), seed=0, block_batch=2, estimator_init=how)
    rsvrb = make_algorithm("rsvrb", small_task().problem(), seed=0, block_batch=2, estimator_init=how)
    filled = [v1.z, v1.y.directions, v2.z, v2.y.directions, v2.v.directions, v2.v.values, rsvrb.d, rsvrb.grad_f]
    for t in filled:
        if how == "zeros":
            assert bool((t == 0).all())
        else:
            assert bool(((t >= 0) & (t < 1)).all()) and t.std() > 0.1
    assert not v1.fresh and not v2.fresh  # the first iteration is an ordinary two-point one
    v2.step()
    assert v2.oracles.counts  # ran


def test_restart_reinitialises_from_a_batch() -> None:
    algo = make_algorithm("re_bsvrb_v2", small_task().problem(), seed=0, block_batch=2, estimator_init="uniform",
                          lower_update="delayed", stage_length=2)
    for _ in range(3):
        algo.step()
    assert algo.inner.fresh is False and algo.stage == 1


ALGORITHMS: list[tuple[str, dict[str, Any]]] = [
    ("bsvrb_v1", {"hessian_guard": "frobenius_rescale", "hessian_timing": "previous"}),
    ("bsvrb_v2", {"lower_update": "delayed"}),
    ("ma_v1", {"lower_update": "delayed"}),
    ("rsvrb", {}),
]


@pytest.mark.parametrize(("name", "hyper"), ALGORITHMS)
def test_resume_is_exact_with_reshuffling_state(name: str, hyper: dict[str, Any], resumed_twin: Any) -> None:
    """The block permutation, the row permutations and their positions are in `state_dict`: a run resumed
    across data epochs (60 // 6 = 10 and 30 // 6 = 5 iterations) and block windows continues identically."""
    task = small_task()

    def make(seed: int) -> Any:
        return make_algorithm(name, task.problem(), seed=seed, block_batch=2, block_sampling="reshuffle",
                              estimator_init="uniform", **hyper)

    reference, resumed = resumed_twin(make, 7, 9)
    assert torch.equal(reference.x, resumed.x)
    assert torch.equal(reference.lower_variables(), resumed.lower_variables())
    assert reference.state_dict()["samplers"]["lower"]["position"] == resumed.lower_sampler.position


def test_bad_option_values_raise() -> None:
    pb = small_task().problem()
    for key, value, name in (("block_sampling", "cyclic", "block_sampling"), ("lower_update", "lazy", "lower_update"),
                             ("estimator_init", "ones", "estimator_init"),
                             ("hessian_guard", "psd", "hessian_guard"), ("hessian_timing", "late", "hessian_timing")):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            cls = BSVRBv1 if key.startswith("hessian") else BSVRBv2
            cls(pb, block_batch=2, **{key: value})
    with pytest.raises(ValueError, match="row_sampling must be one of"):
        HyperparamSettings(row_sampling="cyclic").validate()


def test_task_defaults_are_the_authors_combination() -> None:
    spec = get_task("hyperparam")
    fields = ["block_sampling", "estimator_init", "lower_update", "lr"]
    assert spec.hyper_defaults("bsvrb_v2", fields) == {"block_sampling": "reshuffle", "estimator_init": "uniform",
                                                        "lower_update": "delayed"}
    assert spec.hyper_defaults("bsvrb_v1", [*fields, "hessian_timing"]) == {
        "block_sampling": "reshuffle", "estimator_init": "uniform", "hessian_timing": "previous"}
    assert spec.hyper_defaults("f2sa", ["lr"]) == {}
    assert spec.defaults()["row_sampling"] == "reshuffle"
    assert get_task("quadratic").hyper_defaults("bsvrb_v2", fields) == {}


def test_v1_refuses_a_checkpoint_of_the_old_format() -> None:
    """Checkpoints of the hand-written state format (1: `"algorithm"` dicts, `factors_before`) are refused with a
    message saying so, not misread."""
    task = small_task()
    alg = make_algorithm("bsvrb_v1", task.problem(), seed=0, block_batch=2, hessian_timing="previous")
    alg.step()
    old = {k: v for k, v in alg.state_dict().items() if k not in ("format", "state")}
    old["algorithm"] = {"factors_before": alg.hessians_before.clone()}
    with pytest.raises(ValueError, match=r"state format 1.*cannot be resumed"):
        alg.load_state_dict(old)


def test_reshuffle_with_more_rows_per_call_than_the_data_holds() -> None:
    """Small validation sets (breast_cancer: 91 rows, B b = 320): fresh permutations back to back."""


    sampler = RowSampler({"X": torch.arange(7.0)[:, None]}, batch_size=4, order="reshuffle")
    gen = torch.Generator().manual_seed(0)
    index = sampler.sample(torch.arange(5), gen)["index"]  # 20 rows from 7
    counts = torch.bincount(index.reshape(-1), minlength=7)
    assert index.shape == (5, 4) and int(counts.min()) >= 2 and int(counts.max()) <= 3
    assert torch.equal(torch.sort(index.reshape(-1)[:7]).values, torch.arange(7))  # the first 7 are a permutation
    assert sampler.state_dict()["permutation"] is None  # the next call starts a new epoch


def test_demo_defaults_run_on_breast_cancer(tmp_path) -> None:
    """`make demo`: T1 defaults (the authors' combination) on the embedded data, whose validation part has fewer
    rows than B b."""
    from mbbo.cli import main

    out = tmp_path / "demo"
    assert main(["run", "--task", "hyperparam", "--dataset", "breast_cancer", "--algorithm", "bsvrb_v2",
                 "--iterations", "6", "--eval-every", "3", "--out", str(out), "--no-progress"]) == 0
    assert (out / "checkpoint.pt").is_file()
