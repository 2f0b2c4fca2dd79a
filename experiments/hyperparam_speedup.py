"""T1 (b): parallel speed-up of BSVRB_v2 on a8a: more sampled blocks B (b = 32) and larger mini-batches b (B = 10).

B in {1, 5, 10, 20} with b = 32 and b in {8, 16, 32, 64} with B = 10 (the run B = 10, b = 32 is shared), every
other setting at the authors' defaults (m = 100, eta = 1e-3, tau = tau_v = 1, alpha = 0.9, gamma = 1,
beta = 0.9), float64, one thread, data_seed 0, algorithm seeds 0, 1, 2.

Every configuration runs the SAME number of iterations (default 1120 = 20 epochs of the default B b = 320), and
the main x-axis is iterations: the claim under test is the paper's parallel speed-up, i.e. that one iteration
processing more (block, sample) pairs -- work that parallel hardware does in the time of one -- makes more
progress. The same runs are also shown against epochs (equal numbers of sampled (block, sample) pairs, i.e.
sample efficiency; the configurations then cover different epoch ranges) and against single-thread stepping
time (no parallelism here, so this is the sequential cost of a larger batch).

Extra (on by default, `--no-scaled-tau` skips them): B = 1 and 5 with the lower steps scaled as
tau = tau_v = B / 10, the scaling of the seed paper's all-block step (tau_t = tau B / m). A block's estimate is
refreshed once per m / B iterations (exactly, under the task's default reshuffled block sampling), so the lower
variables move by about tau m / B along one estimate between refreshes: m / B steps of tau (eager rule) or one
step of dc tau with dc about m / B (the authors' delayed rule, the task's default for v2). The B figure has a log
y axis.

    .venv/bin/python experiments/hyperparam_speedup.py
    .venv/bin/python experiments/hyperparam_speedup.py --iterations 112 --seeds 0

Scratch runs: runs/experiments/hyperparam_speedup/B<B>-b<b>[-tau<tau>]-s<seed>. Outputs in experiments/results/:
hyperparam_speedup_B.png, hyperparam_speedup_b.png (panels: iterations, epochs, seconds),
hyperparam_speedup.csv (mean/std curves), hyperparam_speedup_summary.csv, hyperparam_speedup.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DEFAULT_DATA_DIR,
    DEFAULT_SCRATCH,
    PROJECT_ROOT,
    RESULTS_DIR,
    band,
    completed,
    curve_rows,
    load_average,
    machine_info,
    mbbo_command,
    mean_std,
    plot_bands,
    read_curve,
    run_mbbo,
    run_wall_seconds,
    write_csv,
    write_json,
)

from mbbo.metrics_log import read_metrics

BLOCK_BATCHES = (1, 5, 10, 20)
SAMPLE_BATCHES = (8, 16, 32, 64)
DEFAULT_B, DEFAULT_b = 10, 32
SCALED_TAU_BLOCK_BATCHES = (1, 5)
CHECKPOINT_ITERATIONS = (140, 280, 560, 1120)  # where the summary reads the validation loss
TIME_GRID_POINTS = 100


Config = tuple[int, int, float | None]  # (B, b, tau = tau_v or None for the default 1.0)


def configurations(scaled_tau: bool = True) -> list[Config]:
    """The B sweep at b = 32, the b sweep at B = 10 (the shared (10, 32) once), then (extra) B = 1 and 5 with
    the lower steps scaled as tau = tau_v = B / 10 (every block's y_i and v_i move at every iteration along
    an estimate refreshed only when the block is sampled, about every m / B iterations)."""
    pairs: list[Config] = [(B, DEFAULT_b, None) for B in BLOCK_BATCHES]
    pairs += [(DEFAULT_B, b, None) for b in SAMPLE_BATCHES if (DEFAULT_B, b, None) not in pairs]
    if scaled_tau:
        pairs += [(B, DEFAULT_b, B / DEFAULT_B) for B in SCALED_TAU_BLOCK_BATCHES]
    return pairs


def label_of(config: Config) -> str:
    B, b, tau = config
    return f"B={B}, b={b}" + ("" if tau is None else f", tau=tau_v={tau:g}")


def run_args(config: Config, seed: int, iterations: int, eval_every: int, data_dir: str, threads: int
             ) -> list[str]:
    B, b, tau = config
    steps = [] if tau is None else [f"lower_lr={tau:g}", f"linsys_lr={tau:g}"]
    return ["--task", "hyperparam", "--dataset", "a8a", "--data-dir", data_dir, "--algorithm", "bsvrb_v2",
            "--iterations", str(iterations), "--eval-every", str(eval_every), "--seed", str(seed),
            "--threads", str(threads), "--set", f"block_batch={B}", f"batch_size={b}", *steps]


def folder_of(config: Config, seed: int) -> str:
    B, b, tau = config
    return f"B{B}-b{b}" + ("" if tau is None else f"-tau{tau:g}") + f"-s{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1120)
    parser.add_argument("--eval-every", type=int, default=28)
    parser.add_argument("--data-dir", default=os.path.relpath(DEFAULT_DATA_DIR, PROJECT_ROOT))
    parser.add_argument("--scratch", default=os.path.relpath(DEFAULT_SCRATCH / "hyperparam_speedup", PROJECT_ROOT))
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-scaled-tau", dest="scaled_tau", action="store_false",
                        help="skip the extra runs B = 1, 5 with tau = tau_v = B / 10")
    args = parser.parse_args()
    os.chdir(PROJECT_ROOT)
    results = Path(args.results)
    started, load_start = time.perf_counter(), load_average()

    runs: dict[tuple[Config, int], Path] = {}
    commands: list[str] = []
    executed = 0
    for seed in args.seeds:
        for config in configurations(args.scaled_tau):
            out = Path(args.scratch) / folder_of(config, seed)
            argv = run_args(config, seed, args.iterations, args.eval_every, args.data_dir, args.threads)
            commands.append(mbbo_command(["run", *argv, "--out", str(out)]))
            print(f"[{time.perf_counter() - started:7.0f}s] {commands[-1]}", flush=True)
            executed += not completed(argv, out)
            run_mbbo(argv, out)
            runs[config, seed] = out

    def bands_for(configs: list[Config]) -> dict[str, list[Any]]:
        panels: dict[str, list[Any]] = {"iteration": [], "epoch": [], "time_s": []}
        for config in configs:
            outs = [runs[config, s] for s in args.seeds]
            name = label_of(config)
            panels["iteration"].append(band(name, [read_curve(o, "iteration", "val_loss") for o in outs]))
            panels["epoch"].append(band(name, [read_curve(o, "epoch", "val_loss") for o in outs]))
            panels["time_s"].append(band(name, [read_curve(o, "time", "val_loss") for o in outs],
                                         TIME_GRID_POINTS))
            if config[2] is not None:  # scaled lower steps: dashed, in the colour of the same B
                for bands in panels.values():
                    bands[-1].linestyle, bands[-1].color = "--", f"C{BLOCK_BATCHES.index(config[0])}"
        return panels

    b_sweep: list[Config] = [(B, DEFAULT_b, None) for B in BLOCK_BATCHES]
    if args.scaled_tau:
        b_sweep += [(B, DEFAULT_b, B / DEFAULT_B) for B in SCALED_TAU_BLOCK_BATCHES]
    sweeps = {"B": b_sweep, "b": [(DEFAULT_B, b, None) for b in SAMPLE_BATCHES]}
    titles = {"B": "B sweep at b=32 (log y; dashed: tau=tau_v=B/10)", "b": "b sweep at B=10"}
    curve_table: list[dict[str, Any]] = []
    for sweep, configs in sweeps.items():
        panels = bands_for(configs)
        for axis, bands in panels.items():
            curve_table += curve_rows(bands, sweep=sweep, axis=axis)
        plot_bands([("iterations", panels["iteration"]), ("epochs (= n_train sampled pairs)", panels["epoch"]),
                    ("time (s, 1 thread, evaluation excluded)", panels["time_s"])],
                   results / f"hyperparam_speedup_{sweep}.png", ylabel="validation loss F(p)", logy=sweep == "B",
                   title=f"T1 a8a, BSVRB_v2, m=100: {titles[sweep]}, mean ± std over seeds {args.seeds}")

    summary: list[dict[str, Any]] = []
    for config in configurations(args.scaled_tau):
        B, b, tau = config
        outs = [runs[config, s] for s in args.seeds]
        records = [read_metrics(o / "metrics.jsonl") for o in outs]
        entry: dict[str, Any] = {"B": B, "b": b, "tau": 1.0 if tau is None else tau, "n_seeds": len(outs),
                                 "iterations": records[0][-1]["iteration"], "epochs": records[0][-1]["epoch"]}
        for it in CHECKPOINT_ITERATIONS:
            if it <= args.iterations:
                values = [float(np.interp(it, *read_curve(o, "iteration", "val_loss"))) for o in outs]
                entry[f"val_loss_it{it}_mean"], entry[f"val_loss_it{it}_std"] = mean_std(values)
        for ep in (1, 2):
            if all(r[-1]["epoch"] >= ep for r in records):
                values = [float(np.interp(ep, *read_curve(o, "epoch", "val_loss"))) for o in outs]
                entry[f"val_loss_ep{ep}_mean"], entry[f"val_loss_ep{ep}_std"] = mean_std(values)
        entry["ms_per_iteration_mean"], entry["ms_per_iteration_std"] = mean_std(
            [1000 * r[-1]["time"] / max(1, r[-1]["iteration"]) for r in records])
        summary.append(entry)

    write_csv(results / "hyperparam_speedup.csv", curve_table)
    write_csv(results / "hyperparam_speedup_summary.csv", summary)
    wall = time.perf_counter() - started
    write_json(results / "hyperparam_speedup.json", {
        "script": "experiments/hyperparam_speedup.py",
        "configurations": [dict(zip(("B", "b", "tau"), c, strict=True)) for c in configurations(args.scaled_tau)],
        "seeds": args.seeds,
        "iterations": args.iterations, "eval_every": args.eval_every, "threads": args.threads,
        "x_axis": "iterations (main), epochs and stepping seconds (secondary)",
        "wall_seconds_this_invocation": wall, "runs_executed_this_invocation": executed, "runs_total": len(runs),
        "wall_seconds_of_runs": sum(run_wall_seconds(o) or 0.0 for o in runs.values()),
        "load_average_start": load_start, "load_average_end": load_average(), "machine": machine_info(),
        "commands": commands,
    })
    print(f"done in {wall:.0f}s")


if __name__ == "__main__":
    main()
