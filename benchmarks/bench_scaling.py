"""Scaling in the number of blocks m: T1 a8a (temperatures spread over [1, 11]), B = 10, b = 32, float32.

Each (algorithm, m) runs in a fresh subprocess with `torch.set_num_threads(1)`:
- ms/iteration (wall clock) and CPU ms/iteration (process time, less sensitive to other jobs on shared
  cores): medians over `--repeats` repeats of `--iterations` timed steps, after `--warmup` steps, a jump
  of the iteration counter by m / B (so that every block read has been untouched for about m / B iterations,
  as in a long run: its lazy replay has its steady-state length) and `--warmup` more steps (evaluation
  excluded);
- peak RSS of the process (`getrusage` ru_maxrss: data, problem, tables, initialisation and the steps);
- the bytes the algorithm's per-block tables hold (`table_bytes()`) and the initialisation time (O(m) once);
- the time of one evaluation with the default `eval_blocks="auto"` (informative).
Ratios are to m = 10^2. Targets (issue 10): ms/iteration at m = 10^6 at most 1.5x that at m = 10^2; peak RSS at
most the tables + 1 GB. Algorithms whose estimated tables exceed `--max-table-gb` are skipped ("where they fit").

    python benchmarks/bench_scaling.py                                  # the full table (about 15 min)
    python benchmarks/bench_scaling.py --sizes 100 10000 --algorithms bsvrb_v2 --repeats 3
    python benchmarks/bench_scaling.py --stability                      # T1 val loss over 2 m / B iterations
    python benchmarks/bench_scaling.py --profile bsvrb_v2 --profile-m 1000000

Outputs (atomic): benchmarks/results/scaling.json, scaling.md, scaling.png; --stability: scaling_stability.json
and .md; --profile: scaling_profile_<alg>_<m>.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mbbo.algorithms.registry import make_algorithm
from mbbo.checkpoint import atomic_write_bytes, atomic_write_text
from mbbo.tasks.hyperparam import load_task

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
DATA_DIR = BENCH_DIR.parent.parent / "shared" / "data" / "libsvm"
SIZES = (100, 1_000, 10_000, 100_000, 1_000_000)
ALGORITHMS = ("bsvrb_v2", "bsvrb_v1", "rsvrb")
DIM, BATCH = 124, 32  # a8a with its bias column; b


def estimated_table_bytes(name: str, m: int, element: int = 4) -> int:
    """Bytes of the per-block tables (float32 values, int64 stamps) before building anything."""
    d, b = DIM, BATCH
    moving = 2 * m * d * element + m * 8  # values, directions, stamps
    if name == "bsvrb_v2":
        return 2 * moving
    if name == "bsvrb_v1":
        return moving + m * d * d * element
    if name == "rsvrb":  # y/s, stamps, grad_f, eigenvalues, eigenvectors, sparse Jacobian rows (capacity 2)
        return moving + m * 8 + 2 * m * d * element + m * d * d * element + m * 2 * b * (d * element + 8) + m * 16
    raise ValueError(f"unknown algorithm {name!r}")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _build(name: str, m: int, args: argparse.Namespace) -> tuple[Any, Any, float]:
    task = load_task("a8a", args.data_dir, num_blocks=m, batch_size=BATCH, dtype=torch.float32)
    start = time.perf_counter()
    alg = make_algorithm(name, task.problem(), seed=0, block_batch=args.block_batch)
    return task, alg, time.perf_counter() - start


def steady_state(alg: Any, m: int, args: argparse.Namespace) -> None:
    """Warm up, then jump the iteration counter by m / B: a block is then read about m / B iterations after its
    last write (the lazy replays and projected paths of v have their typical length), which a short run from
    iteration 0 never reaches; then warm up again."""
    for _ in range(args.warmup):
        alg.step()
    alg.iteration += m // args.block_batch
    for _ in range(args.warmup):
        alg.step()


def child(name: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (algorithm, m) measurement, in this (fresh) process."""
    torch.set_num_threads(1)
    task, alg, init_s = _build(name, m, args)
    steady_state(alg, m, args)
    times, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(args.iterations):
            alg.step()
        times.append((time.perf_counter() - start) / args.iterations * 1e3)
        cpu.append((time.process_time() - start_cpu) / args.iterations * 1e3)
    finite = bool(alg.is_finite())
    start = time.perf_counter()
    with torch.no_grad():
        metrics = task.evaluate(alg)
    eval_s = time.perf_counter() - start
    return {"algorithm": name, "m": m, "ms_per_iteration": statistics.median(times), "ms_repeats": times,
            "cpu_ms_per_iteration": statistics.median(cpu), "load": os.getloadavg()[0],
            "peak_rss_mb": _rss_mb(), "table_mb": alg.table_bytes() / 2**20, "init_s": init_s, "eval_s": eval_s,
            "val_loss": metrics["val_loss"], "finite": finite}


def run_child(name: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, str(m), "--iterations", str(args.iterations),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--block-batch", str(args.block_batch),
           "--data-dir", str(args.data_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if out.returncode != 0:
        return {"algorithm": name, "m": m, "error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| algorithm | m | ms/iteration (wall) | ratio to m=100 | CPU ms/iteration | ratio | load | peak RSS (MB) "
             "| tables (MB) | RSS - tables (MB) | init (s) | eval (s) |", "|---" * 12 + "|"]
    base = {r["algorithm"]: r for r in rows if r["m"] == 100 and "error" not in r}
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['algorithm']} | {r['m']:,} | {r.get('skipped') or r['error']} | | | | | | | | | |")
            continue
        b = base.get(r["algorithm"])
        ratio = "" if b is None else f"{r['ms_per_iteration'] / b['ms_per_iteration']:.2f}"
        cpu_ratio = "" if b is None else f"{r['cpu_ms_per_iteration'] / b['cpu_ms_per_iteration']:.2f}"
        lines.append(f"| {r['algorithm']} | {r['m']:,} | {r['ms_per_iteration']:.2f} | {ratio} | "
                     f"{r['cpu_ms_per_iteration']:.2f} | {cpu_ratio} | {r['load']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['table_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['table_mb']:.0f} | {r['init_s']:.1f} | {r['eval_s']:.2f} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ALGORITHMS:
        ok = [r for r in rows if r["algorithm"] == name and "ms_per_iteration" in r]
        if not ok:
            continue
        ms = [r["m"] for r in ok]
        line = ax_t.loglog(ms, [r["cpu_ms_per_iteration"] for r in ok], "o-", label=f"{name} CPU")[0]
        ax_t.loglog(ms, [r["ms_per_iteration"] for r in ok], "x:", color=line.get_color(), label=f"{name} wall")
        ax_m.loglog(ms, [r["peak_rss_mb"] for r in ok], "o-", label=f"{name} peak RSS")
        ax_m.loglog(ms, [max(r["table_mb"], 1e-1) for r in ok], "x--", label=f"{name} tables")
    ax_t.set(xlabel="m (blocks)", ylabel="ms / iteration (median)", title="per-iteration time, B=10, b=32, 1 thread")
    ax_m.set(xlabel="m (blocks)", ylabel="MB", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _stability_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| m | lower_lr_scaling | tau = tau_v | iterations (2m/B) | run | val loss: start | min | end |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["val_loss_curve"]
        if r["stopped_at"] == r["iterations"]:
            run = "all"
        elif math.isnan(c[-1]):
            run = f"state non-finite at iteration {r['stopped_at']}"
        else:
            run = f"stopped at {r['stopped_at']} (val loss > 2x start)"
        lines.append(f"| {r['m']:,} | {r['lower_lr_scaling']} | {r['tau']:.3g} | {r['iterations']} | {run} | "
                     f"{c[0]:.4f} | {min(x for x in c if not math.isnan(x)):.4f} | {c[-1]:.4f} |")
    return "\n".join(lines) + "\n"


def stability(args: argparse.Namespace) -> None:
    """T1 a8a validation loss over 2 m / B iterations for each m and lower_lr_scaling (float32, B = 10)."""
    torch.set_num_threads(1)
    rows = []
    for m in args.sizes:
        for scaling in args.scalings:
            task = load_task("a8a", args.data_dir, num_blocks=m, batch_size=BATCH, dtype=torch.float32)
            alg = make_algorithm("bsvrb_v2", task.problem(), seed=0, block_batch=args.block_batch,
                                 lower_lr_scaling=scaling)
            total = 2 * m // args.block_batch
            every = max(1, total // 10)
            curve = [task.evaluate(alg)["val_loss"]]
            start, it = time.perf_counter(), 0
            for it in range(1, total + 1):
                alg.step()
                if not alg.is_finite():
                    curve.append(float("nan"))
                    break
                if it % every == 0:
                    curve.append(task.evaluate(alg)["val_loss"])
                    if curve[-1] > 2.0 * curve[0]:  # diverged: stop early (to save time), say so
                        break
            row = {"m": m, "lower_lr_scaling": scaling, "iterations": total, "stopped_at": it,
                   "val_loss_curve": curve,
                   "tau": alg.hyper("lower_lr"), "tau_v": alg.hyper("linsys_lr"),
                   "seconds": time.perf_counter() - start}
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "scaling_stability.json", json.dumps(rows, indent=1) + "\n")
    text = _stability_table(rows)
    atomic_write_text(RESULTS / "scaling_stability.md", text)
    print(text)


def profile(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _, alg, _ = _build(args.profile, args.profile_m, args)
    steady_state(alg, args.profile_m, args)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iterations):
        alg.step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    path = RESULTS / f"scaling_profile_{args.profile}_{args.profile_m}.txt"
    atomic_write_text(path, f"# {args.iterations} steps of {args.profile} at m = {args.profile_m}, 1 thread\n"
                      + out.getvalue())
    print(out.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--block-batch", type=int, default=10)
    p.add_argument("--max-table-gb", type=float, default=4.0)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--child", nargs=2, metavar=("ALGORITHM", "M"))
    p.add_argument("--stability", action="store_true")
    p.add_argument("--scalings", nargs="+", default=["theory", "none"])
    p.add_argument("--profile", choices=ALGORITHMS)
    p.add_argument("--profile-m", type=int, default=1_000_000)
    p.add_argument("--replot", action="store_true", help="redraw scaling.png and scaling.md from scaling.json")
    args = p.parse_args()
    if args.replot:
        rows = json.loads((RESULTS / "scaling.json").read_text())["rows"]
        atomic_write_text(RESULTS / "scaling.md", _table(rows) + "\n")
        _plot(rows, RESULTS / "scaling.png")
        stable = RESULTS / "scaling_stability.json"
        if stable.exists():
            atomic_write_text(RESULTS / "scaling_stability.md", _stability_table(json.loads(stable.read_text())))
        return
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    if args.stability:
        stability(args)
        return
    if args.profile:
        profile(args)
        return
    rows = []
    for name in args.algorithms:
        for m in args.sizes:
            need = estimated_table_bytes(name, m) / 2**30
            if need > args.max_table_gb:
                row: dict[str, Any] = {"algorithm": name, "m": m,
                                       "skipped": f"skipped: tables need {need:.1f} GB > {args.max_table_gb} GB"}
            else:
                row = run_child(name, m, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"threads": 1, "dtype": "float32", "block_batch": args.block_batch, "batch_size": BATCH,
            "iterations": args.iterations, "repeats": args.repeats, "warmup": args.warmup,
            "machine": platform.platform(), "load_before": os.getloadavg(), "command": " ".join(sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "scaling.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(RESULTS / "scaling.md", _table(rows) + "\n")
    _plot(rows, RESULTS / "scaling.png")
    print(_table(rows))


if __name__ == "__main__":
    main()
