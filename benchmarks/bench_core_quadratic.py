"""ms/iteration of BSVRB_v1, BSVRB_v2 and RSVRB on a multi-block quadratic (m = 100, B = 10, d_y = 124).

Float64, `torch.set_num_threads(--threads)` (default 1). The algorithms are stepped in interleaved chunks in
one process (machine noise hits them alike); after a warm-up, each repeat times `--iterations` iterations per
algorithm, and the median over repeats is reported. Noisy oracles (per-sample gradient noise 0.1, b = 32).

    python benchmarks/bench_core_quadratic.py [--threads 1] [--iterations 200] [--repeats 3] [--compile]

Writes benchmarks/results/core_quadratic_speed.json and .md (atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mbbo.algorithms.registry import make_algorithm
from mbbo.tasks.quadratic import MultiBlockQuadratic

ALGORITHMS = ("bsvrb_v1", "bsvrb_v2", "rsvrb")
RESULTS = Path(__file__).resolve().parent / "results"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--chunk", type=int, default=20)
    p.add_argument("--dim-x", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "core_quadratic_speed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    quad = MultiBlockQuadratic.random(100, args.dim_x, 124, seed=0, mu=1.0, L=4.0)
    problem = quad.problem(noise=0.1, batch_size=32)
    steps = {"lr": 1e-2, "lower_lr": 0.05}
    algs = {name: make_algorithm(name, problem, seed=0, block_batch=10, compile=args.compile, **steps)
            for name in ALGORITHMS}
    for alg in algs.values():
        for _ in range(args.warmup):
            alg.step()
    times: dict[str, list[float]] = {name: [] for name in algs}
    for _ in range(args.repeats):
        spent = dict.fromkeys(algs, 0.0)
        for _ in range(0, args.iterations, args.chunk):
            for name, alg in algs.items():
                start = time.perf_counter()
                for _ in range(args.chunk):
                    alg.step()
                spent[name] += time.perf_counter() - start
        for name in algs:
            times[name].append(1e3 * spent[name] / args.iterations)
    report = {
        "problem": f"MultiBlockQuadratic.random(m=100, d_x={args.dim_x}, d_y=124), noise 0.1, b = 32",
        "block_batch": 10, "dtype": "float64", "threads": torch.get_num_threads(), "compile": args.compile,
        "iterations": args.iterations, "repeats": args.repeats, "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_average": os.getloadavg(),
        "ms_per_iteration": {name: statistics.median(v) for name, v in times.items()},
        "all_repeats_ms": times,
        "grad_norm_after": {name: float(quad.hypergradient(alg.x).norm()) for name, alg in algs.items()},
    }
    lines = [f"# Core engine speed: {report['problem']}", "",
             f"B = 10, float64, threads = {report['threads']}, compile = {args.compile}, "
             f"median of {args.repeats} x {args.iterations} iterations, load average {report['load_average'][0]:.1f}",
             "", "| algorithm | ms / iteration |", "|---|---|"]
    lines += [f"| {n} | {v:.2f} |" for n, v in report["ms_per_iteration"].items()]
    suffix = "_compiled" if args.compile else ""
    atomic_write(args.out.with_name(args.out.name + suffix).with_suffix(".json"), json.dumps(report, indent=2))
    atomic_write(args.out.with_name(args.out.name + suffix).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
