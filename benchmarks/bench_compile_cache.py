"""Compile time on a fresh and on a warm persistent cache (issue 11 targets: <= 30 s and <= 5 s).

Two fresh interpreters, one after the other, each builds the T1 task (a8a, m = 100, B = 10, b = 32, float64,
one thread), makes the algorithm with `compile=True` and steps it `--steps` times; the first uses an empty
`MBBO_CACHE` folder (so an empty `<cache>/torch_compile`, see `mbbo.compilation`), the second the same folder,
now filled by the first. Reported per process: `BilevelAlgorithm.compile_seconds` (the calls that compiled:
BSVRB_v2's whole update, one graph per input signature, what the runner reports as `compile_time`), the wall time
of the first three steps (iteration 0 evaluates at one point and iteration 1 at two, both shapes seen for the first
time and run eagerly; iteration 2 compiles the two-point shape), the CPU seconds of the process and of its finished
children (Inductor's compile workers) up to there (less sensitive to the machine's load than wall time), the
FX graph cache hits and misses, the steady ms/iteration after them, and where the compile time goes (Dynamo's
own per-phase timers, the profile of a miss).

    python benchmarks/bench_compile_cache.py                       # bsvrb_v2
    python benchmarks/bench_compile_cache.py --algorithm bsvrb_v1

Outputs (atomic writes): benchmarks/results/compile_cache_<algorithm>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = BENCH_DIR.parent.parent / "shared" / "data" / "libsvm"
TARGET_FRESH_S, TARGET_WARM_S = 30.0, 5.0
RESULT_TAG = "COMPILE_RESULT "
FIRST_STEPS = 3  # the steps until the run's repeated shapes are compiled


def child(algorithm: str, data_dir: str, steps: int) -> dict[str, Any]:
    """In a fresh interpreter: compile seconds and step times of one compiled algorithm."""
    import torch

    from mbbo.algorithms.registry import make_algorithm
    from mbbo.tasks.hyperparam import load_task

    torch.set_num_threads(1)
    problem = load_task("a8a", data_dir, num_blocks=100, batch_size=32).problem()
    cpu_start = _cpu_seconds()
    alg = make_algorithm(algorithm, problem, seed=0, compile=True)  # the initialisation runs eagerly
    firsts = []
    for _ in range(FIRST_STEPS):
        start = time.perf_counter()
        alg.step()
        firsts.append(time.perf_counter() - start)
    cpu_until_steady = _cpu_seconds() - cpu_start
    start = time.perf_counter()
    for _ in range(steps):
        alg.step()
    steady = (time.perf_counter() - start) / steps
    from torch._dynamo.utils import compile_times, counters

    hits = {key: int(counters["inductor"][key]) for key in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    hits |= {key: int(counters["aot_autograd"][key]) for key in ("autograd_cache_hit", "autograd_cache_miss")}
    return {"compile_seconds": alg.compile_seconds, "first_steps_s": firsts,
            "cpu_seconds_until_steady": cpu_until_steady,
            "steady_ms_per_iteration": 1e3 * steady, "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "cache_counters": hits, "compile_phases": compile_times(repr="str", aggregate=True)}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (Inductor's compile workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_child(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "MBBO_CACHE": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    cmd = [sys.executable, __file__, "--child", "--algorithm", args.algorithm, "--data-dir", str(args.data_dir),
           "--steps", str(args.steps)]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=True)
    wall = time.perf_counter() - start
    line = next(x for x in out.stdout.splitlines() if x.startswith(RESULT_TAG))
    return {**json.loads(line[len(RESULT_TAG):]), "process_wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithm", default="bsvrb_v2")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(child(args.algorithm, str(args.data_dir), args.steps)), flush=True)
        return 0
    from mbbo.checkpoint import atomic_write_text

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mbbo-compile-cache-") as tmp:
        fresh = run_child(args, Path(tmp))
        warm = run_child(args, Path(tmp))
    report = {"command": shlex.join(["python", *sys.argv]), "algorithm": args.algorithm,
              "load_start": load_start, "load_end": os.getloadavg(), "fresh": fresh, "warm": warm,
              "targets_s": {"fresh": TARGET_FRESH_S, "warm": TARGET_WARM_S}}
    lines = [f"# Compile time of `{args.algorithm}`'s oracles, fresh vs warm persistent cache (T1 a8a, 1 thread)", "",
             f"- command: `{report['command']}`",
             f"- load average (1/5/15 min) at start {[round(v, 2) for v in load_start]}, "
             f"at end {[round(v, 2) for v in report['load_end']]} (2 logical CPUs)", "",
             "| process | compile_seconds (wall) | CPU s, construction + 3 steps | first three steps (s) | "
             "steady ms/it | process wall (s) | FX graph cache hits / misses | target | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res, target in (("fresh cache", fresh, TARGET_FRESH_S), ("warm cache", warm, TARGET_WARM_S)):
        verdict = "met" if res["compile_seconds"] <= target else "MISSED"
        counts = res["cache_counters"]
        lines.append(f"| {name} | {res['compile_seconds']:.1f} | {res['cpu_seconds_until_steady']:.1f} | "
                     f"{' / '.join(f'{s:.1f}' for s in res['first_steps_s'])} | "
                     f"{res['steady_ms_per_iteration']:.2f} | {res['process_wall_s']:.1f} | "
                     f"{counts['fxgraph_cache_hit']} / {counts['fxgraph_cache_miss']} | <= {target:g} s | "
                     f"{verdict} |")
    for name, res in (("fresh cache", fresh), ("warm cache", warm)):
        lines += ["", f"Where the compile time goes ({name}; `torch._dynamo.utils.compile_times`, seconds):", "",
                  "```", res["compile_phases"].strip(), "```"]
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"compile_cache_{args.algorithm}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / f"compile_cache_{args.algorithm}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
