"""Federated hyper-representation on digits: FedNest (4 variants), FedMBO [template], DSBO [template].

    PYTHONPATH=src python experiments/federated_digits.py --jobs 2      # runs (resumable) + report
    PYTHONPATH=src python experiments/federated_digits.py --report-only # aggregate what has been run

Every run is `mbbo run --task fed_hyperrep ...` (run in this process by `common.run_mbbo`; finished runs are
skipped, so the script can be restarted), with torch.set_num_threads(1) (`--threads 1`). Runs:

- main grid: every method, iid and label-shard non-iid, seeds 0-2, ITERATIONS outer iterations, evaluated
  every EVAL_EVERY; FedNest family and FedMBO on M = 100 clients with n / M = 0.1; DSBO on a ring of 8 agents
  (all active: a decentralised network has no server sampling);
- tau: FedNest with tau = 1 local outer step against the grid's tau = 5 (both splits, 3 seeds);
- sweeps (non-iid, seed 0, FedNest and FedMBO): n / M in {0.05, 0.1, 0.2} and M in {50, 100, 200};
- DSBO on 2 real processes (`--nproc 2`, gloo on 127.0.0.1) against the simulated run of the same seed.

Step sizes were tuned coarsely on non-iid, seed 0, 60-80 iterations (see docs/results_federated.md); the
FedNest variants share one set, as in the FedNest paper. Outputs: experiments/results/federated_digits_*.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_SCRATCH,
    RESULTS_DIR,
    band,
    load_average,
    machine_info,
    mbbo_command,
    mean_std,
    plot_bands,
    read_curve,
    run_mbbo,
    run_wall_seconds,
    save_figure,
    write_csv,
    write_json,
)

ITERATIONS = 60
EVAL_EVERY = 5
SEEDS = (0, 1, 2)
SPLITS = ("iid", "noniid")
FEDNEST_FAMILY = ("fednest", "fednest_sgd", "lfednest", "lfednest_svrg")
METHODS = (*FEDNEST_FAMILY, "fedmbo", "dsbo")
HYPER: dict[str, dict[str, Any]] = {
    **{name: {"inner_lr": 0.05, "outer_lr": 0.02, "neumann_lr": 0.01} for name in FEDNEST_FAMILY},
    "fedmbo": {"lower_lr": 0.2, "lr": 0.2, "neumann_lr": 0.05},
    "dsbo": {"lower_lr": 0.1, "lr": 0.1, "neumann_lr": 0.05},
}
DSBO_SETTINGS = {"num_clients": 8, "participation": 1.0}
PARTICIPATIONS = (0.05, 0.1, 0.2)
CLIENT_COUNTS = (50, 100, 200)
EQUAL_ROUNDS = {"lfednest": 300, "lfednest_svrg": 200}  # 2 and 3 rounds per iteration
SCRATCH = DEFAULT_SCRATCH / "federated_digits"
PREFIX = "federated_digits"


def run_args(method: str, split: str, seed: int, iterations: int = ITERATIONS, **extra: Any) -> list[str]:
    """The `mbbo run` arguments of one run (settings and hyper-parameters via --set)."""
    values: dict[str, Any] = {"split": split, **(DSBO_SETTINGS if method == "dsbo" else {}), **HYPER[method],
                              **extra}
    sets = [f"{k}={v}" for k, v in values.items()]
    return ["--task", "fed_hyperrep", "--algorithm", method, "--iterations", str(iterations), "--eval-every",
            str(EVAL_EVERY), "--seed", str(seed), "--threads", "1", "--set", *sets]


def run_id(method: str, split: str, seed: int, **extra: Any) -> str:
    tail = "".join(f"-{k}{v}" for k, v in sorted(extra.items()))
    return f"{method}-{split}-s{seed}{tail}"


def planned_runs() -> list[tuple[str, list[str]]]:
    """(run id, arguments) of every run, the main grid first."""
    runs = [(run_id(m, s, seed), run_args(m, s, seed)) for seed in SEEDS for s in SPLITS for m in METHODS]
    runs += [(run_id("fednest", s, seed, outer_steps=1), run_args("fednest", s, seed, outer_steps=1))
             for seed in SEEDS for s in SPLITS]
    for method in ("fednest", "fedmbo"):
        runs += [(run_id(method, "noniid", 0, participation=c), run_args(method, "noniid", 0, participation=c))
                 for c in PARTICIPATIONS if c != 0.1]
        runs += [(run_id(method, "noniid", 0, num_clients=m), run_args(method, "noniid", 0, num_clients=m))
                 for m in CLIENT_COUNTS if m != 100]
    runs.append(("dsbo-noniid-s0-nproc2", [*run_args("dsbo", "noniid", 0), "--nproc", "2"]))
    # the local variants run on to FedNest's 600 rounds (non-iid, seed 0): accuracy at an equal round budget
    for method, iterations in EQUAL_ROUNDS.items():
        runs.append((f"{method}-noniid-s0-rounds600", run_args(method, "noniid", 0, iterations=iterations)))
    return runs


def _execute(item: tuple[str, list[str]]) -> str:
    name, args = item
    run_mbbo(args, SCRATCH / name)
    return name


def run_all(jobs: int) -> None:
    runs = planned_runs()
    # multi-process runs spawn their own processes, which pool workers (daemons) may not: run them here
    pooled = [item for item in runs if "--nproc" not in item[1]]
    if jobs <= 1:
        for item in pooled:
            print("done", _execute(item), flush=True)
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for name in pool.imap_unordered(_execute, pooled):
                print("done", name, load_average(), flush=True)
    for item in runs:
        if item not in pooled:
            print("done", _execute(item), load_average(), flush=True)


# --- report ---------------------------------------------------------------------------------------------


def _records(name: str) -> list[dict[str, Any]] | None:
    path = SCRATCH / name / "metrics.jsonl"
    if not path.is_file():
        return None
    from mbbo.metrics_log import read_metrics

    return read_metrics(path)


def _final(records: Sequence[dict[str, Any]], key: str = "test_accuracy") -> float:
    """Mean of the last three evaluations (the curves are noisy under partial participation)."""
    return float(np.mean([r[key] for r in records[-3:]]))


def _bands(names: dict[str, list[str]], x: str, y: str) -> list[Any]:
    out = []
    for label, ids in names.items():
        curves = [read_curve(rec, x, y) for rec in (_records(i) for i in ids) if rec is not None]
        if curves:
            out.append(band(label, curves))
    return out


def _mbytes(record: dict[str, Any]) -> float:
    """Communication volume in MB (logs written before the metric was renamed hold comm_bytes)."""
    return float(record["comm_mbytes"]) if "comm_mbytes" in record else float(record["comm_bytes"]) / 1e6


def rounds_key(method: str) -> str:
    return "gossip_rounds" if method == "dsbo" else "comm_rounds"


def report() -> None:
    rows: list[dict[str, Any]] = []
    for name, args in planned_runs():
        records = _records(name)
        if records is None:
            continue
        method = args[args.index("--algorithm") + 1]
        last = records[-1]
        rows.append({"run": name, "method": method, "final_accuracy": _final(records),
                     "last_accuracy": last["test_accuracy"], "objective": last["objective"],
                     "rounds": last[rounds_key(method)], "comm_mbytes": _mbytes(last),
                     "consensus_x": last.get("consensus_x"), "wall_seconds": run_wall_seconds(SCRATCH / name),
                     "command": mbbo_command(["run", *args])})
    write_csv(RESULTS_DIR / f"{PREFIX}_runs.csv", rows)
    summary = []
    for split in SPLITS:
        for method in METHODS:
            finals = [_final(r) for r in (_records(run_id(method, split, s)) for s in SEEDS) if r is not None]
            if finals:
                mean, std = mean_std(finals)
                rec = _records(run_id(method, split, 0))
                assert rec is not None
                summary.append({"split": split, "method": method, "accuracy_mean": mean, "accuracy_std": std,
                                "seeds": len(finals), "rounds_per_iteration": rec[-1][rounds_key(method)] /
                                rec[-1]["iteration"], "round_kind": rounds_key(method)})
        for steps in (1, 5):
            ids = [run_id("fednest", split, s, outer_steps=1) if steps == 1 else run_id("fednest", split, s)
                   for s in SEEDS]
            finals = [_final(r) for r in map(_records, ids) if r is not None]
            if finals:
                mean, std = mean_std(finals)
                summary.append({"split": split, "method": f"fednest tau={steps}", "accuracy_mean": mean,
                                "accuracy_std": std, "seeds": len(finals)})
    write_csv(RESULTS_DIR / f"{PREFIX}_summary.csv", summary)
    sweeps = []
    grid_values = {"participation": (PARTICIPATIONS, 0.1), "num_clients": (CLIENT_COUNTS, 100)}
    for method in ("fednest", "fedmbo"):
        for setting, (values, in_grid) in grid_values.items():
            for value in values:
                extra = {} if value == in_grid else {setting: value}
                rec = _records(run_id(method, "noniid", 0, **extra))
                if rec is not None:
                    sweeps.append({"method": method, "sweep": setting, "value": value, "accuracy": _final(rec),
                                   "objective": rec[-1]["objective"]})
    for method in ("fednest", *EQUAL_ROUNDS):
        name = run_id(method, "noniid", 0) if method == "fednest" else f"{method}-noniid-s0-rounds600"
        rec = _records(name)
        if rec is not None:
            sweeps.append({"method": method, "sweep": "rounds", "value": rec[-1]["comm_rounds"],
                           "accuracy": _final(rec), "objective": rec[-1]["objective"]})
    write_csv(RESULTS_DIR / f"{PREFIX}_sweeps.csv", sweeps)
    _plots()
    _dsbo_real()
    write_json(RESULTS_DIR / f"{PREFIX}_machine.json", {**machine_info(), "threads": 1})


def _plots() -> None:
    for x, xlabel, name in (("iteration", "outer iteration", "iterations"),
                            ("comm_rounds", "communication rounds", "rounds")):
        panels = []
        for split in SPLITS:
            methods = METHODS if x == "iteration" else METHODS[:-1]
            ids = {m: [run_id(m, split, s) for s in SEEDS] for m in methods}
            panels.append((f"{xlabel} ({split})", _bands(ids, x, "test_accuracy")))
        if x != "iteration":  # DSBO counts gossip rounds between neighbours, not server rounds
            for panel, split in zip(panels, SPLITS, strict=True):
                panel[1].extend(_bands({"dsbo (gossip rounds)": [run_id("dsbo", split, s) for s in SEEDS]},
                                       "gossip_rounds", "test_accuracy"))
        plot_bands(panels, RESULTS_DIR / f"{PREFIX}_{name}.png", ylabel="test accuracy", ylim=(0.0, 1.0))
    panels = []
    for split in SPLITS:
        ids = {"tau=5": [run_id("fednest", split, s) for s in SEEDS],
               "tau=1": [run_id("fednest", split, s, outer_steps=1) for s in SEEDS]}
        panels.append((f"outer iteration ({split})", _bands(ids, "iteration", "test_accuracy")))
    plot_bands(panels, RESULTS_DIR / f"{PREFIX}_tau.png", ylabel="test accuracy", title="FedNest", ylim=(0, 1))
    _dsbo_figure()


def _dsbo_figure() -> None:
    """Consensus error of x (log, from the first evaluation after the start, where it is 0) and objective."""
    runs = {"simulated": _records(run_id("dsbo", "noniid", 0)), "2 processes": _records("dsbo-noniid-s0-nproc2")}
    fig = Figure(figsize=(10.4, 4.0))
    left, right = fig.subplots(1, 2)
    for index, (label, records) in enumerate(runs.items()):
        if records is None:
            continue
        style = {"color": f"C{index}", "linestyle": "-" if index == 0 else "--", "label": label}
        later = [r for r in records if r["iteration"] > 0]
        left.plot([r["iteration"] for r in later], [r["consensus_x"] for r in later], **style)
        right.plot([r["iteration"] for r in records], [r["objective"] for r in records], **style)
    left.set_yscale("log")
    left.set_ylabel("consensus error (1/n) sum ||x_i - x_bar||^2")
    right.set_ylabel("objective F(x_bar, y_bar)")
    for ax in (left, right):
        ax.set_xlabel("outer iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DSBO, ring of 8 agents, non-iid, seed 0")
    save_figure(fig, RESULTS_DIR / f"{PREFIX}_dsbo.png")


def _dsbo_real() -> None:
    sim, real = _records(run_id("dsbo", "noniid", 0)), _records("dsbo-noniid-s0-nproc2")
    if sim is None or real is None:
        return
    keys = ("test_accuracy", "objective", "consensus_x", "consensus_y", "gossip_rounds")
    diff = max(max(abs(float(a[k]) - float(b[k])) for k in keys) for a, b in zip(sim, real, strict=True))
    diff = max(diff, max(abs(_mbytes(a) - _mbytes(b)) for a, b in zip(sim, real, strict=True)))
    write_json(RESULTS_DIR / f"{PREFIX}_dsbo_real.json", {
        "max_abs_difference_simulated_vs_2_processes": diff, "records": len(sim),
        "final": {k: {"simulated": sim[-1][k], "2 processes": real[-1][k]} for k in keys},
        "step_seconds": {"simulated": sim[-1]["time"], "2 processes": real[-1]["time"]},
    })


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (spawned processes)")
    parser.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    args = parser.parse_args(argv)
    if not args.report_only:
        run_all(args.jobs)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
