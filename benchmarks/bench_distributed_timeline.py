"""Where a block-sharded iteration spends its time: the phases of each of R = 2 ranks, and how they meet.

T1 (a8a, task defaults), m = 10^4, B = 100, b = 64, float32, BSVRB_v2, 1 thread per process, gloo on 127.0.0.1,
compiled (`--eager` for eager oracles). After `--warmup` iterations, both ranks run `--iterations` iterations with
`BlockShard.trace` on and `run_update` stamped; `time.perf_counter` is the same clock in both processes of one
machine, so the stamps of the two ranks compare. Per rank and iteration:

- sampling: step start -> per-block update start (block sample, row draw, data of the owned blocks);
- update: the compiled per-block part (`linear_system_terms`);
- to launch: update end -> the all_gather is launched (`gather_xgrads`, packing);
- wait: launched -> completed (`mbbo.distributed.finish`: the other rank's lateness and the transfer);
- after: completed -> step end (rows put in order, mean over blocks, upper step, bookkeeping).

Across the ranks, per iteration: the launch skew |launched_0 - launched_1| (imbalance: the ranks own different
numbers of the sampled blocks, and the two virtual cores do not run at the same speed) and the transfer
(first completion minus last launch). The report gives medians and means over iterations.

    python benchmarks/bench_distributed_timeline.py [--iterations 300] [--warmup 150] [--eager] [--block-strata 2]

Writes benchmarks/results/distributed_timeline.{json,md} (atomic writes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_distributed import DATA, RESULTS, load_lines, uptime, write_results

PHASES = ("sampling", "update", "to launch", "wait", "after", "iteration")


def _worker(rank: int, port: int, config: dict[str, Any], out: str) -> None:
    """One rank: T1 block-sharded over `config["world"]` (default 2) processes (1: the unsharded run), warm-up,
    then the stamped iterations, saved to `out`.<rank>."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config.get("world", 2), timeout=datetime.timedelta(seconds=120))
    from mbbo.algorithms.blockwise import linear_system_terms
    from mbbo.algorithms.registry import make_algorithm
    from mbbo.distributed import BlockShard, close_process_group
    from mbbo.tasks.registry import get_task

    spec = get_task("hyperparam")
    settings = spec.make_settings({"dataset": "a8a", "data_dir": str(DATA), "num_blocks": config["m"],
                                   "batch_size": config["b"]})
    problem, _ = spec.build(settings, block_batch=config["B"], dtype=torch.float32)
    problem.shard = shard = BlockShard.from_process_group(config["m"])
    hyper = spec.hyper_defaults("bsvrb_v2", ["block_sampling", "estimator_init", "lower_update"])
    alg = make_algorithm("bsvrb_v2", problem, seed=0, block_batch=config["B"], block_strata=config["strata"],
                         compile=config["compile"], **hyper)
    updates: list[tuple[float, float]] = []
    run_update = alg.run_update

    def stamped(*args: Any) -> Any:
        start = time.perf_counter()
        out = run_update(*args)
        if args[0] is linear_system_terms:  # the per-block update; the step after the gather is "after"
            updates.append((start, time.perf_counter()))
        return out

    alg.run_update = stamped  # type: ignore[method-assign]
    for _ in range(config["warmup"]):
        alg.step()
    dist.barrier()
    updates.clear()
    shard.trace = []
    steps = []
    for _ in range(config["iterations"]):
        start = time.perf_counter()
        alg.step()
        steps.append((start, time.perf_counter()))
    torch.save({"steps": steps, "updates": updates, "gathers": shard.trace}, f"{out}.{rank}")
    close_process_group()


def phases(rank: dict[str, list[tuple[float, ...]]]) -> list[dict[str, float]]:
    """Per iteration of one rank: the seconds of each of `PHASES` (module docstring)."""
    out = []
    for (s0, s1), (u0, u1), (_, launched, completed, _) in zip(rank["steps"], rank["updates"], rank["gathers"],
                                                                strict=True):
        out.append({"sampling": u0 - s0, "update": u1 - u0, "to launch": launched - u1,
                    "wait": completed - launched, "after": s1 - completed, "iteration": s1 - s0})
    return out


def meeting(ranks: list[dict[str, list[tuple[float, ...]]]]) -> list[dict[str, float]]:
    """Per iteration, across the ranks: the launch skew and the transfer (first completion - last launch)."""
    out = []
    for gathers in zip(*(r["gathers"] for r in ranks), strict=True):
        launched = [g[1] for g in gathers]
        completed = [g[2] for g in gathers]
        out.append({"launch skew": max(launched) - min(launched), "transfer": min(completed) - max(launched)})
    return out


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and mean (ms) of each key over the rows."""
    return {k: {"median_ms": 1e3 * statistics.median(r[k] for r in rows),
                "mean_ms": 1e3 * statistics.fmean(r[k] for r in rows)} for k in rows[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--eager", action="store_true", help="eager oracles instead of compile=True")
    p.add_argument("--block-strata", type=int, default=1,
                   help="block_strata of the sampling (2: each rank owns B / 2 of every sample)")
    p.add_argument("--out", type=Path, default=RESULTS / "distributed_timeline")
    args = p.parse_args(argv)
    config = {"m": 10_000, "B": 100, "b": 64, "iterations": args.iterations, "warmup": args.warmup,
              "compile": not args.eager, "strata": args.block_strata}
    from mbbo.distributed import free_port

    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "timeline")
        mp.start_processes(_worker, args=(free_port(), config, out), nprocs=2, start_method="spawn")
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    result = {"setting": {**config, "task": "hyperparam a8a (T1, task defaults)", "algorithm": "bsvrb_v2",
                          "dtype": "float32", "threads_per_process": 1, "torch": torch.__version__},
              "load_before": load_before, "load_after": uptime(),
              "ranks": [summary(phases(r)) for r in ranks], "across": summary(meeting(ranks))}
    write_results(args.out, result, report(result))
    return result


def report(r: dict[str, Any]) -> str:
    s = r["setting"]
    lines = [f"# Phases of a block-sharded iteration: T1, m = {s['m']}, B = {s['B']}, b = {s['b']}, R = 2, "
             f"{'compiled' if s['compile'] else 'eager'}, block_strata = {s.get('strata', 1)}, "
             f"{s['iterations']} iterations", "",
             *load_lines(r),
             "| phase | " + " | ".join(f"rank {q}: median (mean) ms" for q in range(len(r["ranks"]))) + " |",
             "|---|" + "---|" * len(r["ranks"])]
    for phase in PHASES:
        cells = [f"{rank[phase]['median_ms']:.2f} ({rank[phase]['mean_ms']:.2f})" for rank in r["ranks"]]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines += ["", "| across the ranks | median (mean) ms |", "|---|---|"]
    for key, v in r["across"].items():
        lines.append(f"| {key} | {v['median_ms']:.2f} ({v['mean_ms']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
