"""T1 (a): BSVRB_v1, BSVRB_v2 and RSVRB on a8a and w8a; validation loss F(p) against epochs and wall time.

The authors' defaults throughout (m = 100, B = 10, b = 32, eta = 1e-3, tau = 0.5 / 1.0, alpha = 0.9, gamma = 1,
beta = 0.9; the library's defaults), float64, one thread. Two combinations of the sampling/update options
(`--combinations`): "authors" = the hyperparam task's defaults (reshuffled blocks and rows, U[0, 1) estimators,
delayed lower step for v2: the authors' code), and "previous" = mbbo's combination before issue 9 (i.i.d.
blocks, rows with replacement, estimators from a first mini-batch, eager v2), as a second (dashed) line.
Seeds 0, 1, 2 are the algorithm's seed (block and sample draws); the data split, the temperatures and the
U[0, 1) initialisation use data_seed = 0 in every run,
so the bands show the spread due to sampling only. Runs are made one at a time, in the order
data set > seed > algorithm, so that changes of the (shared) machine's load hit the algorithms alike.

    .venv/bin/python experiments/hyperparam_curves.py                      # a8a 20 epochs, w8a 10 epochs
    .venv/bin/python experiments/hyperparam_curves.py --datasets a8a --epochs a8a=2 --seeds 0

Scratch runs: runs/experiments/hyperparam_curves/<dataset>-<algorithm>[-previous]-s<seed> (git-ignored; a
completed run is reused when the script is run again with the same arguments). Outputs (small, atomic) in
experiments/results/:
hyperparam_curves_<dataset>.png (two panels: epochs, seconds), hyperparam_curves.csv (mean/std curves),
hyperparam_curves_runs.csv (one row per run), hyperparam_curves_summary.csv, hyperparam_curves.json (commands,
budget, machine, wall time).
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
    Band,
    band,
    completed,
    curve_rows,
    load_average,
    machine_info,
    mbbo_command,
    mean_std,
    plot_bands,
    read_csv,
    read_curve,
    run_mbbo,
    run_wall_seconds,
    write_csv,
    write_json,
    zoom_limits,
)

from mbbo.metrics_log import read_metrics

ALGORITHMS = ("bsvrb_v1", "bsvrb_v2", "rsvrb")
LABELS = {"bsvrb_v1": "BSVRB_v1", "bsvrb_v2": "BSVRB_v2", "rsvrb": "RSVRB"}
ITERATIONS_PER_EPOCH = {"a8a": 56, "w8a": 124}  # n_train // (B b) at B = 10, b = 32
DEFAULT_EPOCHS = {"a8a": 20, "w8a": 10}
EVALS_PER_EPOCH = 4
TIME_GRID_POINTS = 100
TARGET_FACTOR = 1.1
ZOOM_AFTER = 0.15  # fraction of the epochs after which the plotted y range starts


COMBINATIONS: dict[str, dict[str, list[str]]] = {
    "authors": {"*": []},
    "previous": {"*": ["block_sampling=uniform", "row_sampling=replacement", "estimator_init=first_batch"],
                 "bsvrb_v2": ["lower_update=eager"]},
}


def combination_set(combination: str, algorithm: str) -> list[str]:
    """The `--set` values of a combination for one algorithm."""
    values = COMBINATIONS[combination]
    return [*values["*"], *values.get(algorithm, [])]


def label_of(algorithm: str, combination: str) -> str:
    return LABELS[algorithm] + ("" if combination == "authors" else f" ({combination})")


def stored_bands(path: str, dataset: str, algorithms: list[str]) -> list[Band]:
    """Dashed epoch bands of an earlier run's `hyperparam_curves.csv` (labels LABELS[algorithm])."""
    rows = [r for r in read_csv(path) if r["dataset"] == dataset and r["axis"] == "epoch"]
    out = []
    for algorithm in algorithms:
        mine = [r for r in rows if r["label"] == LABELS[algorithm]]
        if mine:
            x, mean, std = (np.array([float(r[k]) for r in mine]) for k in ("x", "mean", "std"))
            out.append(Band(f"{LABELS[algorithm]} (previous, stored run)", x, mean, std, int(mine[0]["n_seeds"]),
                            color=f"C{algorithms.index(algorithm)}", linestyle="--"))
    return out


def first_reach(b: Band, target: float) -> float | None:
    """The first grid point where the mean curve is at or below `target` (None if never)."""
    hits = np.flatnonzero(b.mean <= target)
    return float(b.x[hits[0]]) if hits.size else None


def parse_epochs(items: list[str]) -> dict[str, float]:
    """`a8a=10 w8a=8` -> {"a8a": 10.0, "w8a": 8.0} on top of the defaults."""
    epochs: dict[str, float] = dict(DEFAULT_EPOCHS)
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--epochs takes DATASET=EPOCHS, got {item!r}")
        epochs[name] = float(value)
    return epochs


def run_args(dataset: str, algorithm: str, seed: int, epochs: float, data_dir: str, threads: int,
             combination: str = "authors") -> list[str]:
    """The `mbbo run` arguments of one run (authors' combination: nothing is overridden)."""
    eval_every = max(1, ITERATIONS_PER_EPOCH.get(dataset, 56) // EVALS_PER_EPOCH)
    values = combination_set(combination, algorithm)
    return ["--task", "hyperparam", "--dataset", dataset, "--data-dir", data_dir, "--algorithm", algorithm,
            "--epochs", f"{epochs:g}", "--eval-every", str(eval_every), "--seed", str(seed),
            "--threads", str(threads), *(["--set", *values] if values else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["a8a", "w8a"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="*", default=[], metavar="DATASET=EPOCHS",
                        help=f"epochs per data set (default {DEFAULT_EPOCHS})")
    parser.add_argument("--data-dir", default=os.path.relpath(DEFAULT_DATA_DIR, PROJECT_ROOT))
    parser.add_argument("--scratch", default=os.path.relpath(DEFAULT_SCRATCH / "hyperparam_curves", PROJECT_ROOT))
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--combinations", nargs="+", default=list(COMBINATIONS), choices=list(COMBINATIONS))
    parser.add_argument("--only", nargs="*", default=[], metavar="DATASET=ALG[,ALG]",
                        help="restrict the algorithms run on a data set")
    parser.add_argument("--previous-from", default=None, metavar="CSV",
                        help="mean/std epoch curves of an earlier run (hyperparam_curves.csv format) drawn as the "
                             "dashed 'previous' lines instead of running the previous combination")
    args = parser.parse_args()
    only = {d: a.split(",") for d, _, a in (item.partition("=") for item in args.only)}
    os.chdir(PROJECT_ROOT)  # relative paths in the recorded commands are relative to the project root
    results = Path(args.results)
    epochs = parse_epochs(args.epochs)
    started, load_start = time.perf_counter(), load_average()

    runs: dict[tuple[str, str, int], Path] = {}
    commands: list[str] = []
    executed = 0
    def lines_of(dataset: str) -> list[tuple[str, str]]:
        """(algorithm, combination) pairs run on a data set."""
        algorithms = [a for a in args.algorithms if a in only.get(dataset, args.algorithms)]
        return [(a, c) for c in args.combinations for a in algorithms]

    for dataset in args.datasets:
        for seed in args.seeds:
            for algorithm, combination in lines_of(dataset):
                suffix = "" if combination == "authors" else f"-{combination}"
                out = Path(args.scratch) / f"{dataset}-{algorithm}{suffix}-s{seed}"
                argv = run_args(dataset, algorithm, seed, epochs[dataset], args.data_dir, args.threads, combination)
                commands.append(mbbo_command(["run", *argv, "--out", str(out)]))
                print(f"[{time.perf_counter() - started:7.0f}s] {commands[-1]}", flush=True)
                executed += not completed(argv, out)
                run_mbbo(argv, out)
                runs[dataset, label_of(algorithm, combination), seed] = out

    curve_table: list[dict[str, Any]] = []
    run_rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for dataset in args.datasets:
        epoch_bands, time_bands = [], []
        per_alg: dict[str, list[dict[str, Any]]] = {}
        for algorithm, combination in lines_of(dataset):
            label = label_of(algorithm, combination)
            outs = [runs[dataset, label, seed] for seed in args.seeds]
            style = {"color": f"C{args.algorithms.index(algorithm)}",
                     "linestyle": "-" if combination == "authors" else "--"}
            epoch_bands.append(band(label, [read_curve(o, "epoch", "val_loss") for o in outs]))
            time_bands.append(band(label, [read_curve(o, "time", "val_loss") for o in outs], TIME_GRID_POINTS))
            for b in (epoch_bands[-1], time_bands[-1]):
                b.color, b.linestyle = style["color"], style["linestyle"]
            rows = []
            for seed, out in zip(args.seeds, outs, strict=True):
                records = read_metrics(out / "metrics.jsonl")
                record = records[-1]
                rows.append({"dataset": dataset, "algorithm": label, "combination": combination, "seed": seed,
                             "iterations": record["iteration"], "epochs": record["epoch"],
                             "step_seconds": record["time"],
                             "ms_per_iteration": 1000 * record["time"] / max(1, record["iteration"]),
                             "wall_seconds": run_wall_seconds(out), "val_loss_start": records[0]["val_loss"],
                             "val_loss": record["val_loss"], "test_loss": record["test_loss"],
                             "test_accuracy": record["test_accuracy"], "best_block": record["best_block"]})
            per_alg[label] = rows
            run_rows.extend(rows)
        # a common time budget: the shortest total stepping time among all runs of this data set
        t_common = min(r["step_seconds"] for rows in per_alg.values() for r in rows)
        # a common target: 1.1 x the highest final mean validation loss, which every mean curve reaches
        target = TARGET_FACTOR * max(b.mean[-1] for b in epoch_bands)
        reach = {b.label: first_reach(b, target) for b in epoch_bands}
        reach_time = {b.label: first_reach(b, target) for b in time_bands}
        for label, rows in per_alg.items():
            at_time = [float(np.interp(t_common, *read_curve(runs[dataset, label, s], "time", "val_loss")))
                       for s in args.seeds]
            entry: dict[str, Any] = {"dataset": dataset, "algorithm": label, "combination": rows[0]["combination"],
                                     "n_seeds": len(rows),
                                     "epochs": rows[0]["epochs"], "iterations": rows[0]["iterations"]}
            for key in ("val_loss", "test_loss", "test_accuracy", "ms_per_iteration", "step_seconds"):
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([r[key] for r in rows])
            entry["common_time_s"] = t_common
            entry["val_loss_at_common_time_mean"], entry["val_loss_at_common_time_std"] = mean_std(at_time)
            entry["target_val_loss"] = target
            entry["epochs_to_target"] = reach[label]
            entry["seconds_to_target"] = reach_time[label]
            summary.append(entry)
        curve_table += curve_rows(epoch_bands, dataset=dataset, axis="epoch")
        curve_table += curve_rows(time_bands, dataset=dataset, axis="time_s")
        if args.previous_from:
            epoch_bands += stored_bands(args.previous_from, dataset, args.algorithms)
        # the first ZOOM_AFTER of the run (the steep drop from the initialisation) is cut off the y range
        ylim = zoom_limits(epoch_bands, ZOOM_AFTER * epochs[dataset])
        plot_bands([("epoch", epoch_bands), ("time (s, evaluation excluded)", time_bands)],
                   results / f"hyperparam_curves_{dataset}.png", ylabel="validation loss F(p)", ylim=ylim,
                   title=(f"T1 {dataset}: m=100, B=10, b=32, mean ± std over seeds {args.seeds}; solid: authors' "
                          f"combination (task default), dashed: previous"))

    write_csv(results / "hyperparam_curves.csv", curve_table)
    write_csv(results / "hyperparam_curves_runs.csv", run_rows)
    write_csv(results / "hyperparam_curves_summary.csv", summary)
    wall = time.perf_counter() - started
    write_json(results / "hyperparam_curves.json", {
        "script": "experiments/hyperparam_curves.py", "datasets": args.datasets, "algorithms": args.algorithms,
        "combinations": {c: COMBINATIONS[c] for c in args.combinations}, "only": only,
        "previous_from": args.previous_from, "seeds": args.seeds,
        "epochs": {d: epochs[d] for d in args.datasets}, "threads": args.threads,
        "evals_per_epoch": EVALS_PER_EPOCH, "wall_seconds_this_invocation": wall,
        "runs_executed_this_invocation": executed, "runs_total": len(runs),
        "wall_seconds_of_runs": sum(run_wall_seconds(o) or 0.0 for o in runs.values()),
        "load_average_start": load_start, "load_average_end": load_average(), "machine": machine_info(),
        "commands": commands,
    })
    print(f"done in {wall:.0f}s")


if __name__ == "__main__":
    main()
