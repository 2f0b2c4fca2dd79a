"""The model and the configurations of benchmarks/bench_distributed.py (the measurement itself is the
benchmark's; here its pure parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from module_loading import load_module

bench = load_module("bench_distributed", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py")


def test_configurations_time_one_and_two_processes_and_the_ceiling() -> None:
    """One cycle: R = 1 at B / 4, B / 2, B on rank 0 alone; R = 2 sharded, through shared memory and gloo; two
    concurrent unsharded runs at B / 2; R = 1 and R = 2 with block_strata=2 (balanced ranks); two unsharded runs at
    B / 2 in lock-step."""
    runs = bench.configurations(100)
    strata = bench.STRATA
    assert [(label, bb, sharded, who, s) for label, bb, sharded, who, _, s in runs] == [
        ("R=1,B=25", 25, False, "rank0", 1), ("R=1,B=50", 50, False, "rank0", 1),
        ("R=1,B=100", 100, False, "rank0", 1), ("R=2,B=100", 100, True, "both", 1),
        (f"R=2 {bench.GLOO},B=100", 100, True, "both", 1), (f"{bench.CONCURRENT},B=50", 50, False, "both", 1),
        (f"R=1 {strata},B=100", 100, False, "rank0", 2), (f"R=2 {strata},B=100", 100, True, "both", 2),
        (f"{bench.LOCKSTEP} (gloo),B=50", 50, False, "both", 1),
        (f"{bench.LOCKSTEP} (shared memory),B=50", 50, False, "both", 1)]
    assert [run[4].get("MBBO_DIST_WAIT") for run in runs] == [None, None, None, "poll", "poll", None, None, "poll",
                                                              "poll", "poll"]
    # R = 2 gathers through shared memory (the default on one machine), and through gloo for comparison
    assert [run[4].get("MBBO_DIST_TRANSPORT") for run in runs] == [None] * 4 + ["backend"] + [None] * 5
    # the lock-step runs meet after every iteration, through gloo or shared memory; the others do not
    assert [bench.meeting(run[0]) for run in runs] == [None] * 8 + ["gloo", "shared memory"]


def test_expected_max_owned_and_the_model() -> None:
    """E[max_r n_r]: B at R = 1, about B / 2 + 4 at R = 2, B = 100 (binomial spread), at least B / R; the model
    T(R, B) = c0 + c1 E[max] + (R - 1) alpha + (R - 1) / R B bytes / bandwidth."""
    assert bench.expected_max_owned(100, 1) == 100.0
    e2 = bench.expected_max_owned(100, 2)
    assert 53.0 < e2 < 55.5
    assert bench.expected_max_owned(1000, 8) >= 125.0
    c0, c1, per_block = 1e-3, 1e-4, 1000.0
    assert bench.model_time(100, 1, c0, c1, per_block) == pytest.approx(c0 + c1 * 100)
    alpha, bandwidth = bench.NETWORKS["intra-node (R <= 8)"]
    assert bench.model_time(100, 2, c0, c1, per_block) == pytest.approx(
        c0 + c1 * e2 + alpha + 0.5 * 100 * per_block / bandwidth)
    # balanced ranks (block_strata a multiple of R): the busiest rank has B / R blocks
    assert bench.model_time(100, 2, c0, c1, per_block, balanced=True) == pytest.approx(
        c0 + c1 * 50 + alpha + 0.5 * 100 * per_block / bandwidth)
    assert bench.model_time(1000, 64, c0, c1, per_block, balanced=True) < bench.model_time(1000, 64, c0, c1,
                                                                                           per_block)


def test_fit_recovers_a_linear_cost() -> None:
    """`fit_mode` recovers c0 and c1 from exact R = 1 times and reports the R = 2 excess over the model."""
    c0_ms, c1_ms = 2.0, 0.1
    cpu = {f"R=1,B={b}": c0_ms + c1_ms * b for b in (25, 50, 100)}
    e2 = bench.expected_max_owned(100, 2)
    wall = {"R=2,B=100": c0_ms + c1_ms * e2 + 3.0}
    fit = bench.fit_mode(cpu, wall, [25, 50, 100], 100, gathered=1000.0 * e2)
    assert fit["c0_ms"] == pytest.approx(c0_ms) and fit["c1_ms_per_block"] == pytest.approx(c1_ms)
    assert fit["bytes_per_block"] == pytest.approx(1000.0)
    assert fit["wall_minus_cpu_model_ms_R2"] == pytest.approx(3.0)
    assert fit["model"]["B=100"]["R=1"]["speedup"] == pytest.approx(1.0)
    assert fit["model"]["B=100"]["R=2"]["speedup_balanced"] > fit["model"]["B=100"]["R=2"]["speedup"]


def test_fit_keeps_the_fixed_cost_non_negative() -> None:
    """R = 1 times that grow faster than linearly (the batch outgrows the cache): the unconstrained line has
    c0 < 0; the fit holds c0 at 0 with the least-squares c1 through the origin, keeps the unconstrained c0, every
    predicted time stays positive, and the report says so. A linear cost gives no such note."""
    cpu = {"R=1,B=100": 5.5, "R=1,B=200": 10.8, "R=1,B=400": 23.7}  # ms, measured on this host at B = 400
    e2 = bench.expected_max_owned(400, 2)
    fit = bench.fit_mode(cpu, {"R=2,B=400": 15.2}, [100, 200, 400], 400, gathered=511.0 * e2)
    xs, ys = [100.0, 200.0, 400.0], [5.5, 10.8, 23.7]
    assert fit["unconstrained_c0_ms"] < -0.5
    assert fit["c0_ms"] == pytest.approx(0.0, abs=1e-9)
    through_origin = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    assert fit["c1_ms_per_block"] == pytest.approx(through_origin)
    times = [r["ms_per_iteration"] for row in fit["model"].values() for r in row.values()]
    assert min(times) > 0
    assert "c0 held at 0" in bench.clamped_note(fit) and "-0." in bench.clamped_note(fit)
    linear = bench.fit_mode({f"R=1,B={b}": 1.0 + 0.1 * b for b in (25, 50, 100)}, {"R=2,B=100": 9.0},
                            [25, 50, 100], 100, gathered=1000.0)
    assert linear["unconstrained_c0_ms"] == pytest.approx(1.0) and bench.clamped_note(linear) == ""


timeline = load_module("bench_distributed_timeline",
                       Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed_timeline.py")


def test_timeline_phases_and_how_the_ranks_meet() -> None:
    """Two ranks, two iterations of synthetic stamps (seconds): the phases of each rank, the launch skew and the
    transfer across them, their medians and means in ms, and the report's rows."""
    ranks = [{"steps": [(0.0, 0.010), (0.010, 0.020)], "updates": [(0.002, 0.006), (0.012, 0.016)],
              "gathers": [(0.0065, 0.007, 0.0085, 0.0088), (0.0165, 0.017, 0.018, 0.0182)]},
             {"steps": [(0.0, 0.010), (0.010, 0.020)], "updates": [(0.001, 0.007), (0.011, 0.015)],
              "gathers": [(0.0072, 0.008, 0.0085, 0.0087), (0.0152, 0.016, 0.018, 0.0181)]}]
    first = timeline.phases(ranks[0])[0]
    assert first == pytest.approx({"sampling": 0.002, "update": 0.004, "to launch": 0.001, "wait": 0.0015,
                                   "after": 0.0015, "iteration": 0.010})
    assert sum(v for k, v in first.items() if k != "iteration") == pytest.approx(first["iteration"])
    across = timeline.meeting(ranks)
    assert across == [pytest.approx({"launch skew": 0.001, "transfer": 0.0005}),
                      pytest.approx({"launch skew": 0.001, "transfer": 0.001})]
    summary = timeline.summary(across)
    assert summary["transfer"] == pytest.approx({"median_ms": 0.75, "mean_ms": 0.75})
    result = {"setting": {"m": 10, "B": 4, "b": 2, "compile": True, "iterations": 2}, "load_before": "a",
              "load_after": "b", "ranks": [timeline.summary(timeline.phases(r)) for r in ranks], "across": summary}
    text = timeline.report(result)
    assert "| update | 4.00 (4.00) | 5.00 (5.00) |" in text and "| launch skew | 1.00 (1.00) |" in text


overhead = load_module("bench_distributed_overhead",
                       Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed_overhead.py")


def test_overhead_benchmark_local_collective_and_configurations() -> None:
    """The network-free all_gather puts this rank's buffer in every rank's slot and has completed; one cycle times
    R = 1 at B / 2, rank 0 of 2 at B, and R = 1 at B; the report names the overhead and the bound."""
    import torch

    out = torch.full((3, 4), -1, dtype=torch.uint8)
    work = overhead.local_all_gather_single(out.view(-1), torch.arange(4, dtype=torch.uint8), async_op=True)
    assert work.is_completed() and work.wait()
    assert out.tolist() == [[0, 1, 2, 3]] * 3
    assert overhead.configurations(100) == [("R=1,B=50", 50, False), (f"{overhead.NO_NETWORK},B=100", 100, True),
                                            ("R=1,B=100", 100, False)]
    text = overhead.report({"setting": {"m": 10, "B": 4, "b": 2, "cycles": 1, "iterations": 1},
                            "load_before": "x", "load_after": "y",
                            "ms_per_iteration": {"R=1,B=2": 1.0, f"{overhead.NO_NETWORK},B=4": 1.5, "R=1,B=4": 2.0},
                            "sharded_overhead_ms": 0.5, "speedup_bound_R2": 2.0 / 1.5})
    assert "**0.50 ms** per iteration" in text and "**1.33**" in text and "| R=1,B=4 | 2.00 |" in text


def test_write_results_writes_json_and_report_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`write_results`: OUT.json (the result) and OUT.md (the report), printed too; `load_lines` names the load."""
    import json

    result = {"load_before": "up 1 min, load average: 0.5", "load_after": "up 2 min, load average: 0.7", "n": 3}
    text = "\n".join(["# report", *bench.load_lines(result)])
    bench.write_results(tmp_path / "sub" / "out", result, text)
    assert json.loads((tmp_path / "sub" / "out.json").read_text()) == result
    assert (tmp_path / "sub" / "out.md").read_text() == text
    assert "load before: `up 1 min, load average: 0.5`" in capsys.readouterr().out
    assert bench.load_lines(result)[1] == "load after: `up 2 min, load average: 0.7`"


runs = load_module("bench_distributed_runs",
                   Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed_runs.py")


def test_runs_benchmark_times_the_slower_rank_and_pairs_each_round() -> None:
    """A run's time is the slower rank's median step (ms); each round's speed-up pairs R = 1 with the R = 2 run of
    the same sampling; the report lists the rounds and the median and range over them."""
    fast = {"steps": [(0.0, 0.004), (0.004, 0.009), (0.009, 0.012)]}  # medians 4 ms
    slow = {"steps": [(0.0, 0.005), (0.005, 0.010), (0.010, 0.020)]}  # 5 ms
    assert runs.run_ms([fast]) == pytest.approx(4.0) and runs.run_ms([fast, slow]) == pytest.approx(5.0)
    rounds = [{"R=1,S=1": 8.0, "R=2,S=1": 5.0, "R=1,S=2": 8.0, "R=2,S=2": 4.0},
              {"R=1,S=1": 6.0, "R=2,S=1": 5.0, "R=1,S=2": 9.0, "R=2,S=2": 5.0},
              {"R=1,S=1": 7.0, "R=2,S=1": 5.0, "R=1,S=2": 6.0, "R=2,S=2": 4.0}]
    summary = runs.summarise(rounds)
    assert summary["block_strata=1"]["speedups"] == pytest.approx([1.6, 1.2, 1.4])
    assert summary["block_strata=1"]["median"] == pytest.approx(1.4)
    strata2 = summary["block_strata=2"]
    assert strata2["speedups"] == pytest.approx([2.0, 1.8, 1.5])
    assert (strata2["median"], strata2["min"], strata2["max"]) == pytest.approx((1.8, 1.5, 2.0))
    assert summary["block_strata=1"]["fastest"] == pytest.approx(6.0 / 5.0) and strata2["fastest"] == pytest.approx(1.5)
    text = runs.report({"setting": {"m": 10, "B": 4, "b": 2, "iterations": 3, "rounds": 3}, "load_before": "x",
                        "load_after": "y", "rounds": rounds, "speedup": summary})
    assert "| 1 | 8.00 | 5.00 | 8.00 | 4.00 | 1.60 | 2.00 |" in text
    assert "block_strata=2: **1.80** (median over rounds; 1.50 - 2.00); fastest R = 1 run over fastest R = 2 run: " \
        "**1.50**" in text
