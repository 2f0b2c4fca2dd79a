"""torch.compile of the oracles: the `auto` rule, compile time kept out of `time`, compiled == eager."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mbbo.cli import main
from mbbo.compilation import (
    AUTO_MIN_EAGER_SECONDS,
    TimedCompiled,
    compile_cache_dir,
    enable_persistent_cache,
    should_compile,
)
from mbbo.runner import AUTO_PROBE_ITERATIONS

QUAD = ["run", "--task", "quadratic", "--no-progress", "--set", "num_blocks=4", "block_batch=2",
        "--algorithm", "bsvrb_v2", "--seed", "1"]


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _config(out: Path) -> dict[str, Any]:
    return json.loads((out / "config.json").read_text())


def test_should_compile_when_the_eager_remainder_repays_it() -> None:
    assert AUTO_MIN_EAGER_SECONDS == 60.0
    assert should_compile(0.01, 10_000)  # 100 s of eager iterations left
    assert not should_compile(0.01, 5_000)  # 50 s
    assert not should_compile(1.0, 0)


@pytest.mark.slow
def test_timed_compiled_times_the_calls_that_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Static shapes: a shape's first call runs eagerly, its second compiles (timed), later ones reuse it;
    automatic dynamic shapes (the block-sharded oracles): compiled from the first call, and the second shape
    compiles a symbolic graph that a third shape reuses."""
    monkeypatch.setenv("MBBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    enable_persistent_cache()

    def fn(a: torch.Tensor) -> torch.Tensor:
        return (a * 3).cos().sum(0)

    static = TimedCompiled(fn)
    assert torch.allclose(static(torch.ones(3, 2)), fn(torch.ones(3, 2)))
    assert static.seconds == 0 and static.compilations == 0  # a one-off shape is not compiled
    assert torch.allclose(static(torch.zeros(3, 2)), fn(torch.zeros(3, 2)))
    first = static.seconds
    assert first > 0 and static.compilations == 1
    static(torch.ones(3, 2))
    assert static.seconds == first and static.compilations == 1
    static(torch.zeros(4, 2))
    assert static.compilations == 1  # (4, 2) seen once
    static(torch.zeros(4, 2))
    assert static.seconds > first and static.compilations == 2

    def other(a: torch.Tensor) -> torch.Tensor:  # Dynamo caches per code object: a function of its own
        return (a * 2).sin().sum(0)

    dynamic = TimedCompiled(other, dynamic=None)
    for n in (3, 4, 5, 7):
        assert torch.allclose(dynamic(torch.full((n, 2), 0.5)), other(torch.full((n, 2), 0.5)))
    assert dynamic.compilations == 2  # 3 (static), then 4 with a symbolic first dimension, reused by 5 and 7


def test_timed_compiled_replays_the_counts_of_a_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`counted`: a signature's eager first call records what it counted; compiled calls run with counting off
    (a graph cannot count) and add that record, so the counts are those of eager calls; one graph for all."""
    from collections import Counter

    monkeypatch.setenv("MBBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    enable_persistent_cache()

    class Counts:
        def __init__(self) -> None:
            self.counts: Counter[str] = Counter()
            self.counting = True

    owner = Counts()

    def fn(a: torch.Tensor) -> torch.Tensor:
        if owner.counting:
            owner.counts["rows"] += a.shape[0]
        return (a * 5).exp().sum(0)

    timed = TimedCompiled(fn, counted=owner)
    for n in (3, 3, 3, 2, 2, 3):
        torch.testing.assert_close(timed(torch.ones(n, 2)), (torch.ones(n, 2) * 5).exp().sum(0))
    assert owner.counts["rows"] == 16 and owner.counting
    assert timed.compilations == 2 and timed.graphs == 2  # (3, 2) and (2, 2), each at its second call
    # automatic dynamic shapes (a block-sharded rank): a signature's first call still runs eagerly and records
    # its counts; the compiled calls share one graph with a symbolic first dimension after the second shape
    owner.counts.clear()

    def other(a: torch.Tensor) -> torch.Tensor:  # a code object of its own: Dynamo's cache is per function
        if owner.counting:
            owner.counts["rows"] += a.shape[0]
        return (a * 3).exp().sum(0)

    dynamic = TimedCompiled(other, dynamic=None, counted=owner)
    for n in (3, 3, 4, 4, 5, 5, 3):
        torch.testing.assert_close(dynamic(torch.ones(n, 2)), (torch.ones(n, 2) * 3).exp().sum(0))
    assert owner.counts["rows"] == 27 and owner.counting
    assert dynamic.compilations == 2  # 3 static, then 4 symbolic (reused by 5 and 3)


def test_persistent_cache_lives_under_the_mbbo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBBO_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    assert enable_persistent_cache() == compile_cache_dir() == tmp_path / "torch_compile"
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    # graphs with a torch.cond (a compiled update's table reads) go to the cache too
    from torch._higher_order_ops.cond import cond_op

    assert cond_op.cacheable()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert enable_persistent_cache() == tmp_path / "mine"  # the user's choice wins


def test_compile_auto_is_the_default_and_records_its_choice(tmp_path: Path) -> None:
    """A short run: eager, with the measured inputs of the rule in config.json; a run shorter than the probe
    decides at its end."""
    out, short = tmp_path / "auto", tmp_path / "short"
    assert main([*QUAD, "--iterations", str(AUTO_PROBE_ITERATIONS + 4), "--out", str(out)]) == 0
    config = _config(out)
    assert config["compile"] == "auto" and config["runner"]["compile_auto"] is True
    choice = config["compile_choice"]
    assert choice["compiled"] is False and choice["compilable"] is True
    assert choice["decided_at_iteration"] == AUTO_PROBE_ITERATIONS + 1 and choice["remaining_iterations"] == 3
    assert choice["eager_ms_per_iteration"] > 0 and "should_compile" in choice["rule"]
    assert all(r["compile_time"] == 0.0 for r in _records(out))
    assert main([*QUAD, "--iterations", "3", "--out", str(short)]) == 0
    assert _config(short)["compile_choice"]["decided_at_iteration"] == 3
    no = tmp_path / "no"
    assert main([*QUAD, "--iterations", "3", "--out", str(no), "--compile", "no"]) == 0
    assert _config(no)["compile"] == "no" and "compile_choice" not in _config(no)


def test_compile_option_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUAD, "--iterations", "2", "--out", str(tmp_path / "x"), "--set", "compile=sometimes"]) == 2
    assert "compile must be one of 'auto', 'yes', 'no', got 'sometimes'" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_run_equals_eager_and_keeps_compile_time_out_of_time(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, 6 iterations of BSVRB_v2 on a 4-block quadratic: the compiled trajectory equals the eager one
    to 1e-10; compilation (seconds) is reported apart and the step time stays far below it."""
    monkeypatch.setenv("MBBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main([*QUAD, "--iterations", "6", "--out", str(eager), "--compile", "no"]) == 0
    assert main([*QUAD, "--iterations", "6", "--out", str(compiled), "--compile"]) == 0
    assert _config(compiled)["compile"] == "yes"
    x_eager = torch.load(eager / "checkpoint.pt", weights_only=False)["algorithm"]["state"]["x"]
    x_compiled = torch.load(compiled / "checkpoint.pt", weights_only=False)["algorithm"]["state"]["x"]
    assert x_eager.dtype == torch.float64
    assert torch.allclose(x_eager, x_compiled, atol=1e-10, rtol=0)
    last = _records(compiled)[-1]
    assert last["compile_time"] > 0.5 and last["time"] < 0.2 * last["compile_time"]
    assert (tmp_path / "cache" / "torch_compile").is_dir()


def _quadratic(num_blocks: int = 4, block_batch: int = 2) -> Any:
    from mbbo.tasks.registry import get_task

    spec = get_task("quadratic")
    problem, _ = spec.build(spec.make_settings({"num_blocks": num_blocks, "dim_x": 3, "dim_y": 2, "batch_size": 2}),
                            block_batch=block_batch)
    return problem


@pytest.mark.slow
def test_compiled_oracles_skip_the_initialisation_and_one_off_shapes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """BSVRB_v1 (compiled oracle by oracle) with first-batch estimators: the initialisation runs eagerly
    (`Oracles.eager`), the one-point first iteration is a shape seen once, so the first compilation happens at
    the third step, the second one at two points; later steps compile nothing."""
    monkeypatch.setenv("MBBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    from mbbo.algorithms.registry import make_algorithm

    algorithm = make_algorithm("bsvrb_v1", _quadratic(), seed=0, block_batch=2, compile=True)
    oracles = algorithm.oracles
    assert oracles.compiled and algorithm.compiled and algorithm.compile_seconds == 0.0
    assert algorithm.compiled_updates is None  # no whole update: each oracle is compiled
    algorithm.step()  # one point
    algorithm.step()  # two points, first time
    assert algorithm.compile_seconds == 0.0
    algorithm.step()
    compiled = algorithm.compile_seconds
    assert compiled > 0 and compiled == oracles.compile_seconds
    with oracles.eager():
        assert oracles._vmapped is oracles._eager
    assert oracles._vmapped is not oracles._eager
    algorithm.step()
    assert algorithm.compile_seconds == compiled


def _t1(name: str, **hyper: Any) -> tuple[Any, Any]:
    """The same T1 run (6 blocks of breast_cancer), eager and compiled."""
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.tasks.hyperparam import load_task

    problem = load_task("breast_cancer", num_blocks=6, dtype=torch.float64, row_sampling="replacement").problem()
    return (make_algorithm(name, problem, seed=1, block_batch=3, **hyper),
            make_algorithm(name, problem, seed=1, block_batch=3, compile=True, **hyper))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "hyper"), [
    ("bsvrb_v2", {}),
    ("bsvrb_v2", {"v_radius": 0.3, "estimator_init": "uniform"}),  # projected replays of v; a two-point start
    ("ma_v2", {}),
])
def test_whole_update_is_one_graph_and_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                   hyper: dict[str, Any]) -> None:
    """BSVRB_v2 and ma_v2 on T1 (sparse x, per-block constants), float64: under compile=True the whole update of
    an iteration (table reads and writes, oracles, trackers, hypergradient, upper step) is one graph, compiled
    once (no graph break, no recompilation), and the trajectory and the oracle counts equal the eager ones (to
    1e-10; counts exactly), with or without projected paths of v (a small ball: replayed inside the graph by the
    opaque `replay_ball_paths`)."""
    from mbbo.compilation import graphs_compiled

    monkeypatch.setenv("MBBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    eager, compiled = _t1(name, **hyper)
    assert compiled.compiled and not compiled.oracles.compiled  # the update is compiled, not each oracle
    graphs = graphs_compiled()
    for it in range(12):
        eager.step()
        compiled.step()
        for got, want in ((compiled.x, eager.x), (compiled.z, eager.z),
                          (compiled.lower_variables(), eager.lower_variables()),
                          (compiled.linear_system_variables(), eager.linear_system_variables())):
            assert float((got - want).abs().max()) <= 1e-10, f"iteration {it}"
        assert dict(compiled.oracles.counts) == dict(eager.oracles.counts), f"iteration {it}"
    (update,) = compiled.compiled_updates.values()
    assert update.compilations == 1 and update.graphs == 1 == graphs_compiled() - graphs  # one graph
    assert compiled.compile_seconds == update.seconds > 0
    if "v_radius" in hyper:  # paths were projected
        assert float(compiled.linear_system_variables().norm(dim=1).max()) >= 0.3 * (1 - 1e-12)


def test_use_compiled_chooses_the_whole_update_or_each_oracle() -> None:
    """`use_compiled` mid-run: the whole update for BSVRB_v2 (in one process, and on a block-sharded rank, where
    `linear_system_step` compiles the part before the collective), each oracle for BSVRB_v1; twice is once."""
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.distributed import BlockShard

    problem = _quadratic()
    v2 = make_algorithm("bsvrb_v2", problem, seed=0, block_batch=2)
    assert not v2.compiled and v2.compile_seconds == 0.0
    v2.step()
    v2.use_compiled()
    updates = v2.compiled_updates
    v2.use_compiled()
    assert v2.compiled_updates is updates == {} and not v2.oracles.compiled
    v1 = make_algorithm("bsvrb_v1", problem, seed=0, block_batch=2)
    v1.use_compiled()
    assert v1.oracles.compiled and v1.compiled_updates is None
    problem.shard = BlockShard(problem.num_blocks, rank=0, world_size=2)  # rank 0 of 2 (nothing communicated yet)
    sharded = make_algorithm("bsvrb_v2", problem, seed=0, block_batch=2)
    sharded.use_compiled()
    assert sharded.compiled_updates == {} and not sharded.oracles.compiled


def test_signature_walks_dataclass_arguments() -> None:
    """A compiled update's arguments may hold dataclasses (e.g. `XGrad`): their type and fields' shapes are part of
    the signature, so that a dataclass argument is hashable and a new shape inside it is a new signature."""
    from mbbo.compilation import _signature
    from mbbo.oracles import XGrad

    sparse = _signature((XGrad(torch.zeros(2, 3, 4), torch.zeros(3, 4, dtype=torch.long)), 0.5))
    assert hash(sparse) == hash(_signature((XGrad(torch.ones(2, 3, 4), torch.ones(3, 4, dtype=torch.long)), 0.5)))
    assert sparse != _signature((XGrad(torch.zeros(2, 5, 4), torch.zeros(5, 4, dtype=torch.long)), 0.5))
    assert sparse != _signature((XGrad(torch.zeros(2, 3, 4)), 0.5))  # dense: index None
    assert XGrad in sparse
