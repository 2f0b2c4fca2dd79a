"""R = 1 against R = 2 as a user runs them: one configuration per spawn, the spawns alternated.

T1 (a8a, task defaults), m = 10^4, B = 100, b = 64, float32, BSVRB_v2, compiled, 1 thread per process. Each of
`--rounds` rounds spawns, for each block sampling (`block_strata` 1, the task's, and 2, balanced ranks): one process
running the unsharded run (R = 1), then two processes running it block-sharded (R = 2; on this machine the ranks
gather through shared memory, `mbbo.shm_exchange`). Every spawn is the timeline benchmark's worker
(`bench_distributed_timeline`): `--warmup` iterations (compilation from the persistent cache), then `--iterations`
iterations, each stamped. A run's time per iteration is the median over its iterations (for R = 2, of the slower
rank); a round's speed-up is the R = 1 run over the R = 2 run spawned right after it, so that the two see nearly
the same machine. The report gives each round and the median and range over rounds, with the machine's load, and
the fastest R = 1 run over the fastest R = 2 run: on a shared host whose speed drifts between spawns (R = 1 alone
has ranged over 6.0 - 10.0 ms), the runs it disturbed least.

`bench_distributed.py` instead interleaves all configurations inside one pair of processes, every 20 iterations:
robust to the machine's drift, but each configuration then starts its 20 iterations with caches full of another
configuration's tables. Here each run keeps its own caches warm, as a single run does.

    python benchmarks/bench_distributed_runs.py [--rounds 5] [--iterations 300] [--warmup 150]

Writes benchmarks/results/distributed_runs.{json,md} (atomic writes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from bench_distributed import RESULTS, load_lines, uptime, write_results
from bench_distributed_timeline import _worker

STRATA = (1, 2)


def run_ms(ranks: list[dict[str, Any]]) -> float:
    """A run's time per iteration (ms): the median over its iterations of each rank's step, the slower rank's."""
    return max(1e3 * statistics.median(end - start for start, end in rank["steps"]) for rank in ranks)


def spawn(world: int, config: dict[str, Any], tmp: Path) -> float:
    """One run of `world` processes (1: unsharded); its time per iteration (ms, `run_ms`)."""
    from mbbo.distributed import free_port

    out = str(tmp / f"run-{world}")
    mp.start_processes(_worker, args=(free_port(), {**config, "world": world}, out), nprocs=world,
                       start_method="spawn")
    return run_ms([torch.load(f"{out}.{rank}") for rank in range(world)])


def summarise(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Per sampling: the speed-up R=1 / R=2 of each round, their median, min and max; and the fastest R = 1 run over
    the fastest R = 2 run, each the run the host disturbed least (what `timeit` takes the minimum for)."""
    out: dict[str, Any] = {}
    for strata in STRATA:
        one, two = ([r[f"R={world},S={strata}"] for r in rounds] for world in (1, 2))
        ratios = [a / b for a, b in zip(one, two, strict=True)]
        out[f"block_strata={strata}"] = {"speedups": ratios, "median": statistics.median(ratios),
                                         "min": min(ratios), "max": max(ratios), "fastest": min(one) / min(two)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--out", type=Path, default=RESULTS / "distributed_runs")
    args = p.parse_args(argv)
    base = {"m": 10_000, "B": 100, "b": 64, "iterations": args.iterations, "warmup": args.warmup, "compile": True}
    load_before = uptime()
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            row = {}
            for strata in STRATA:
                for world in (1, 2):
                    row[f"R={world},S={strata}"] = spawn(world, {**base, "strata": strata}, Path(tmp))
            rounds.append(row)
            print(", ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)
    result = {"setting": {**base, "task": "hyperparam a8a (T1, task defaults)", "algorithm": "bsvrb_v2",
                          "dtype": "float32", "threads_per_process": 1, "rounds": args.rounds,
                          "torch": torch.__version__},
              "load_before": load_before, "load_after": uptime(), "rounds": rounds, "speedup": summarise(rounds)}
    write_results(args.out, result, report(result))
    return result


def report(r: dict[str, Any]) -> str:
    s = r["setting"]
    keys = list(r["rounds"][0])
    lines = [f"# R = 1 and R = 2 in alternated spawns: T1, m = {s['m']}, B = {s['B']}, b = {s['b']}, compiled, "
             f"{s['iterations']} iterations per run, {s['rounds']} rounds", "", *load_lines(r),
             "| round | " + " | ".join(f"{k} (ms)" for k in keys) + " | " + " | ".join(
                 f"speed-up S={strata}" for strata in STRATA) + " |",
             "|---|" + "---|" * (len(keys) + len(STRATA))]
    for i, row in enumerate(r["rounds"]):
        ratios = [r["speedup"][f"block_strata={strata}"]["speedups"][i] for strata in STRATA]
        lines.append(f"| {i + 1} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " | "
                     + " | ".join(f"{v:.2f}" for v in ratios) + " |")
    lines.append("")
    for name, v in r["speedup"].items():
        lines.append(f"speed-up R = 2 over R = 1, {name}: **{v['median']:.2f}** (median over rounds; "
                     f"{v['min']:.2f} - {v['max']:.2f}); fastest R = 1 run over fastest R = 2 run: "
                     f"**{v['fastest']:.2f}**")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
