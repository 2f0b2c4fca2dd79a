"""Top-K NDCG learning to rank on MovieLens-100K: SONG, K-SONG, BSVRB and six baseline losses.

Protocol (``shared/specs/ndcg.md`` sections 2 and 5): leave-last-out split (5 test / 5 dev per user, graded gains
``2^r - 1``), all-ranking NDCG@{5, 10, 20, 50} (train items excluded; dev items excluded for test), NeuMF warm-started
by listwise cross-entropy (once per seed, shared by the nine methods, last layer re-initialised), then each method
for ``E`` epochs (one list of 10 positives + 300 negatives per user per epoch, batches of 256 users: 4 Adam steps
per epoch), learning rate x0.25 halfway, K = 20 for K-SONG and BSVRB. Model selection: the epoch with the best dev
NDCG@5 (evaluated every epoch) is reloaded and evaluated on test.

Budget. The whole experiment is budgeted to ``--budget-minutes`` of wall time (40 by default). The script warms up
the seeds, measures one epoch of every method, and then chooses ``E`` (at most 120, even, so that halfway is an
epoch boundary) so that the rows x ``len(seeds)`` runs fit; it prints and records the choice. ``--epochs`` overrides it
(the committed results use ``--epochs 120``, see ``docs/results_ndcg.md`` for the invocations; ``--measure`` times
one epoch of each row alone, also when ``--epochs`` is given).

ML-100K scale. ML-20M has 541 Adam steps per epoch, ML-100K 4. The papers' warm-up (20 epochs at lr 1e-3) then
ranks below popularity, and the papers' lr 4e-4 hardly moves the model in the epochs we can afford (measured: SONG
and ListNet stay at dev NDCG@5 ~0.049, the popularity level, for 35 epochs). So this script uses 40 warm-up epochs
at lr 5e-3 and lr 5e-3 for every method (one value for all methods, chosen on a SONG/K-SONG/ListNet pilot on dev).
Each threshold lambda_q gets one update per epoch; with the papers' eta0 = 0.01 and tau1 = 1e-3 it stays far below
the top-20 threshold (measured: mean |lambda_q - lambda_q*| ~ 2.5 for scores of std ~1.2, 92% of the positives
"in the top 20"), so the top-K weighting is inactive. This script uses eta0 = 1 and tau1 = 0.1 for both top-K methods
(chosen on dev among (eta0, tau1, version) = (0.01, 1e-3, theo), (0.1, 0.1, theo), (1, 0.1, theo), (1, 0.1, prac)
in 20-epoch K-SONG pilots: best dev NDCG@5 0.0706, 0.0724, 0.0735, 0.0713; lambda error 0.3, 28% of positives above).
The remaining defaults of SONG, K-SONG and BSVRB were checked on dev with 120-epoch runs of seed 0
(``experiments/ndcg_ml100k_tuning.py``; ``experiments/results/ndcg_ml100k_tuning.md``): gamma0 in {0.05, 0.1, 0.3},
psi_alpha in {0.5, 1, 2, 4, 8}, 'theo' vs 'prac', BSVRB beta_v in {0.005, 1, 10} and gamma_m in {0.01, 0.1}; the
papers' values (gamma0 0.1, psi_alpha 2, 'theo', beta_v 0.005, gamma_m 0.01) were best for every method, so the
table uses them. ``--set METHOD.FIELD=VALUE`` changes one method's setting for a whole run.

Outputs (small files, written atomically) in ``experiments/results/``:

- ``ndcg_ml100k_table.csv`` / ``.md``: test NDCG@{5,10,20,50} mean and std over seeds, with the popularity and
  warm-start anchors, seconds per epoch, best epochs, the sanity checks, and the chosen budget;
- ``ndcg_ml100k_curves.png``: dev NDCG@5 against epoch (mean over seeds, band = std);
- ``ndcg_ml100k_metrics.json``: per-epoch dev metrics of every run, per-run test metrics and timings, the settings.

Per-run logs and checkpoints go to ``--work-dir`` (``runs/ndcg_ml100k``, git-ignored); a finished run is reused
when the script is started again with the same settings (so several invocations with disjoint ``--methods`` and
the same ``--work-dir`` can share the cores, and a final invocation with all methods only writes the report;
``--reuse-only`` trains nothing and reports the finished runs, listing the missing ones).

K-SONG rows (:data:`VARIANTS`). ``ksong`` is mbbo's variant (first-sample initialisation of u, lambda, v, s; a
moving-average lambda step; psi' with its factor alpha; psi = 2 sigmoid(2 t)). ``ksong_reference`` is the reference
form (``init=zero``, ``lambda_step=plain``, ``psi_derivative=reference``: LibAUC's update with the NDCG-Optimization
code's psi), and ``ksong_zero_init``, ``ksong_plain_step``, ``ksong_reference_psi`` each change one of the three
factors of mbbo's variant toward it (the ablation). ``--set ksong_reference.FIELD=VALUE`` changes one row only.

Usage::

    .venv/bin/python experiments/ndcg_ml100k.py --epochs 120 --measure   # all rows, 3 seeds
    .venv/bin/python experiments/ndcg_ml100k.py --epochs 120 --reuse-only --measure   # report what is finished
    .venv/bin/python experiments/ndcg_ml100k.py                          # budgeted to --budget-minutes (40)
    .venv/bin/python experiments/ndcg_ml100k.py --epochs 2 --seeds 0 --methods song listnet --tag smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "experiments" / "results"
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "movielens" / "ml-100k" / "u.data"
DEFAULT_WORK = PROJECT_ROOT / "runs" / "ndcg_ml100k"
KS = (5, 10, 20, 50)
#: K-SONG rows besides mbbo's variant (``ksong``: first-sample init, moving-average lambda step, exact psi'):
#: label -> (method, fixed settings). ``ksong_reference`` is the reference form; the three others change one
#: factor of mbbo's variant toward it (the ablation).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ksong_reference": ("ksong", {"init": "zero", "lambda_step": "plain", "psi_derivative": "reference"}),
    "ksong_zero_init": ("ksong", {"init": "zero"}),
    "ksong_plain_step": ("ksong", {"lambda_step": "plain"}),
    "ksong_reference_psi": ("ksong", {"psi_derivative": "reference"}),
}
METHOD_ORDER = ("neuralndcg", "bsvrb_ndcg", "ksong", "song", *VARIANTS, "lambdarank", "approxndcg", "listmle",
                "listnet", "ranknet")  # longest first, for load balancing
DISPLAY = {"song": "SONG", "ksong": "K-SONG (mbbo's variant)", "bsvrb_ndcg": "BSVRB", "ranknet": "RankNet",
           "listnet": "ListNet", "listmle": "ListMLE", "lambdarank": "LambdaRank", "approxndcg": "ApproxNDCG",
           "neuralndcg": "NeuralNDCG", "ksong_zero_init": "K-SONG, zero init",
           "ksong_plain_step": "K-SONG, plain lambda step", "ksong_reference_psi": "K-SONG, reference psi'",
           "ksong_reference": "K-SONG, reference form"}
TABLE_ORDER = ("ranknet", "listnet", "listmle", "lambdarank", "approxndcg", "neuralndcg", "song", "ksong",
               *VARIANTS, "bsvrb_ndcg")


def _setup_torch() -> None:
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------
# small atomic writers


def _write_text(path: Path, text: str) -> None:
    from mbbo.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (keeps the metrics file small), recursively."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _write_json(path: Path, value: Any, *, compact: bool = False) -> None:
    text = json.dumps(_rounded(value), indent=None if compact else 1, separators=(",", ":") if compact else None,
                      default=str)
    _write_text(path, text + "\n")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    _write_text(path, buf.getvalue())


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / n)


# ------------------------------------------------------------------------------------------------------------
# jobs (run in worker processes)


def _settings(args: dict[str, Any], seed: int, eval_test: bool = False) -> dict[str, Any]:
    return {
        "data_path": args["data"],
        "seed": seed,
        "warmup_epochs": args["warmup_epochs"],
        "warmup_lr": args["warmup_lr"],
        "warmup_cache": args.get("warmup_cache") or str(Path(args["work_dir"]) / "warmup_cache"),
        "ks": KS,
        "eval_test": eval_test,
    }


def base_method(label: str) -> str:
    """The trained method of a table row (``ksong_reference`` -> ``ksong``)."""
    return VARIANTS[label][0] if label in VARIANTS else label


def _hparams(args: dict[str, Any], label: str) -> dict[str, Any]:
    """Hyper-parameters set by the script for the row ``label`` (the others are the method's defaults): the common
    ``lr``, ``eta0``, ``tau1``, then a variant's fixed settings, then the row's ``--set`` overrides. They are the
    key of a finished run (``eta0``, ``tau1`` included for every method; :func:`_method_hparams` keeps those the
    method has)."""
    fixed = VARIANTS[label][1] if label in VARIANTS else {}
    return {"lr": args["lr"], "eta0": args["eta0"], "tau1": args["tau1"], **fixed,
            **args.get("overrides", {}).get(label, {})}


def _config_fields(method: str) -> set[str]:
    import dataclasses

    from mbbo.ranking.configs import METHOD_CONFIGS

    return {f.name for f in dataclasses.fields(METHOD_CONFIGS[method])}


def _method_hparams(args: dict[str, Any], label: str) -> dict[str, Any]:
    """:func:`_hparams` without the common settings that the row's method does not have (eta0, tau1 for SONG and
    the baselines)."""
    fields = _config_fields(base_method(label))
    return {k: v for k, v in _hparams(args, label).items() if k in fields}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["ksong.psi_alpha=1", ...]`` -> ``{"ksong": {"psi_alpha": 1}}`` (values parsed as YAML scalars).

    ``METHOD`` is a row of the table (a method or a K-SONG variant of :data:`VARIANTS`), ``FIELD`` a field of
    its method's config (:data:`mbbo.ranking.configs.METHOD_CONFIGS`).
    Raises ValueError naming the item when it is not ``METHOD.FIELD=VALUE`` with a known method and field.
    """
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        label, dot, name = target.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected METHOD.FIELD=VALUE, e.g. ksong.psi_alpha=1")
        if label not in TABLE_ORDER:
            raise ValueError(f"--set {item!r}: method {label!r} must be one of {TABLE_ORDER}")
        fields = _config_fields(base_method(label)) - {"seed", "epochs"}
        if name not in fields:
            raise ValueError(f"--set {item!r}: field {name!r} of {base_method(label)!r} must be one of "
                             f"{sorted(fields)}")
        out.setdefault(label, {})[name] = yaml.safe_load(raw)
    return out


def warm_job(args: dict[str, Any], seed: int) -> dict[str, Any]:
    """Warm up one seed (cached) and evaluate the warm start after the head reset."""
    _setup_torch()
    from mbbo.tasks.ndcg import build

    start = time.perf_counter()
    trainer, task = build("song", _settings(args, seed, eval_test=True))
    after = task.evaluate(trainer)
    return {"seed": seed, "info": task.warm_info, "after_reset": after, "seconds": time.perf_counter() - start}


def measure_job(args: dict[str, Any], method: str, steps: int) -> dict[str, Any]:
    """Wall and CPU seconds of one epoch of ``method`` (after one unmeasured step) and of one dev evaluation."""
    _setup_torch()
    from mbbo.tasks.ndcg import build

    trainer, task = build(base_method(method), _settings(args, args["seeds"][0]), epochs=120,
                          **_method_hparams(args, method))
    trainer.step()
    ipe = trainer.iterations_per_epoch()
    steps = max(1, min(steps, ipe))
    w, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.step()
    train_wall = (time.perf_counter() - w) * ipe / steps
    train_cpu = (time.process_time() - c) * ipe / steps
    w = time.perf_counter()
    task.evaluate(trainer)
    return {"method": method, "train_wall": train_wall, "train_cpu": train_cpu, "eval_wall": time.perf_counter() - w,
            "load_average": os.getloadavg()[0]}


class _BestDev:
    """Wraps the task for the runner: dev metrics every epoch, and a copy of the best model (dev NDCG@5)."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.best = -math.inf
        self.best_epoch = 0
        self.best_state: dict[str, Any] | None = None
        self.eval_seconds = 0.0

    def iterations_per_epoch(self) -> int:
        return self.task.iterations_per_epoch()

    def evaluate(self, trainer: Any) -> dict[str, float]:
        start = time.perf_counter()
        out = self.task.evaluate(trainer)
        if out["dev_ndcg@5"] > self.best:
            self.best = out["dev_ndcg@5"]
            self.best_epoch = trainer.iteration // self.iterations_per_epoch()
            self.best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        self.eval_seconds += time.perf_counter() - start
        return out


def _run_key(args: dict[str, Any], method: str, seed: int, epochs: int) -> dict[str, Any]:
    return {"method": method, "seed": seed, "epochs": epochs, **_hparams(args, method),
            "warmup_epochs": args["warmup_epochs"], "warmup_lr": args["warmup_lr"], "data": args["data"]}


def finished_run(args: dict[str, Any], method: str, seed: int, epochs: int) -> dict[str, Any] | None:
    """The result of a finished run of ``method`` and ``seed`` with these settings in the work folder, or None."""
    done = Path(args["work_dir"]) / f"{method}_seed{seed}" / "result.json"
    if not done.is_file():
        return None
    try:
        previous = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    key = previous.get("key")
    if isinstance(key, dict) and "data" in key:  # the same file through another path (a symlink) is the same data
        key = {**key, "data": os.path.realpath(key["data"])}
    wanted = _run_key(args, method, seed, epochs)
    return previous if key == {**wanted, "data": os.path.realpath(wanted["data"])} else None


def run_job(args: dict[str, Any], method: str, seed: int, epochs: int) -> dict[str, Any]:
    """Train one method for one seed with the runner; test NDCG at the best dev epoch and at the last epoch."""
    _setup_torch()
    from mbbo.ranking.metrics import evaluate_split
    from mbbo.runner import RunConfig, run
    from mbbo.tasks.ndcg import build

    previous = finished_run(args, method, seed, epochs)
    if previous is not None:
        return previous
    out_dir = Path(args["work_dir"]) / f"{method}_seed{seed}"
    key = _run_key(args, method, seed, epochs)
    wall = time.perf_counter()
    trainer, task = build(base_method(method), _settings(args, seed), epochs=epochs, **_method_hparams(args, method))
    wrapped = _BestDev(task)
    ipe = task.iterations_per_epoch()
    records = run(trainer, wrapped, RunConfig(out_dir=out_dir, epochs=epochs, eval_every=ipe, progress=False,
                                             overwrite=True), extra_config=key)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # 3 MB; the metrics log stays
    last_test = evaluate_split(trainer.model, task.split, "test", KS)
    assert wrapped.best_state is not None
    trainer.model.load_state_dict(wrapped.best_state)
    best_test = evaluate_split(trainer.model, task.split, "test", KS)
    result = {
        "key": key,
        "method": method,
        "seed": seed,
        "epochs": epochs,
        "best_epoch": wrapped.best_epoch,
        "best_dev_ndcg@5": wrapped.best,
        "test": {f"ndcg@{k}": best_test[f"ndcg@{k}"] for k in KS},
        "test_last_epoch": {f"ndcg@{k}": last_test[f"ndcg@{k}"] for k in KS},
        "train_seconds": records[-1]["time"],
        "seconds_per_epoch": records[-1]["time"] / epochs,
        "eval_seconds": wrapped.eval_seconds,
        "wall_seconds": time.perf_counter() - wall,
        "oracle_calls": records[-1]["oracle_calls"],
        "curve": [
            {"epoch": r["epoch"], "time": r["time"],
             **{k: r[k] for k in r if k.startswith("dev_") or k == "train_loss"}}
            for r in records
        ],
    }
    _write_json(out_dir / "result.json", result)
    return result


# ------------------------------------------------------------------------------------------------------------
# the driver


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def choose_epochs(measured: list[dict[str, Any]], n_seeds: int, workers: int, remaining: float) -> tuple[int, float]:
    """Largest even E <= 120 whose predicted wall time fits ``remaining`` seconds; returns (E, seconds/epoch)."""
    per_epoch = sum(m["train_wall"] + m["eval_wall"] for m in measured) * n_seeds
    speedup = 1.0 + 0.6 * (workers - 1)  # two workers on two shared cores: not a full 2x
    per_epoch /= speedup
    epochs = int(remaining / per_epoch)
    epochs = max(2, min(120, epochs - epochs % 2))
    return epochs, per_epoch


def main(argv: list[str] | None = None) -> int:
    from mbbo.ranking.configs import KSONGConfig, TrainingConfig
    from mbbo.tasks.ndcg import NDCGSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="ML-100K u.data (or ml-100k.inter)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(TABLE_ORDER), choices=list(TABLE_ORDER))
    p.add_argument("--epochs", type=int, default=None, help="epochs per method (default: chosen from the budget)")
    p.add_argument("--budget-minutes", type=float, default=40.0)
    # the task's defaults are this experiment's settings (one source: mbbo.ranking.configs and NDCGSettings)
    p.add_argument("--lr", type=float, default=TrainingConfig.lr)
    p.add_argument("--eta0", type=float, default=KSONGConfig.eta0, help="step size of lambda_q (K-SONG, BSVRB)")
    p.add_argument("--tau1", type=float, default=KSONGConfig.tau1,
                   help="softplus temperature of the top-K lower problem")
    p.add_argument("--warmup-epochs", type=int, default=NDCGSettings.warmup_epochs)
    p.add_argument("--warmup-lr", type=float, default=NDCGSettings.warmup_lr)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default=str(DEFAULT_WORK))
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="ndcg_ml100k", help="prefix of the result files")
    p.add_argument("--reuse-only", action="store_true",
                   help="train nothing: report the finished runs in --work-dir (and list the missing ones)")
    p.add_argument("--measure", action="store_true",
                   help="time one epoch of each method, one at a time, also when --epochs is given")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="a config field for one row (repeatable), e.g. --set ksong.psi_alpha=1")
    a = p.parse_args(argv)
    try:
        overrides = parse_overrides(a.overrides)
    except ValueError as exc:
        p.error(str(exc))
    t0 = time.perf_counter()
    args = {"data": a.data, "seeds": a.seeds, "lr": a.lr, "eta0": a.eta0, "tau1": a.tau1,
            "warmup_epochs": a.warmup_epochs,
            "warmup_lr": a.warmup_lr, "work_dir": a.work_dir, "overrides": overrides}
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    _setup_torch()
    from mbbo.tasks.ndcg import NDCGSettings, load_split, popularity_ndcg

    split = load_split(NDCGSettings(data_path=a.data))
    pop = {which: popularity_ndcg(split, which, KS) for which in ("dev", "test")}
    _log(f"ML-100K: {split.summary()}; popularity test NDCG@10 = {pop['test']['ndcg@10']:.4f}")

    with _pool(a.workers) as pool:
        warm = list(pool.map(warm_job, [args] * len(a.seeds), a.seeds))
    for w in warm:
        _log(f"seed {w['seed']}: warm start test NDCG@10 {w['info']['before_reset']['test_ndcg@10']:.4f} before the "
             f"head reset, {w['after_reset']['test_ndcg@10']:.4f} after ({w['seconds']:.0f} s)")

    measured: list[dict[str, Any]] = []
    if a.epochs is None or a.measure:
        with _pool(1) as pool:  # one at a time: the measurement must not compete with itself
            measured = list(pool.map(measure_job, [args] * len(a.methods), a.methods, [4] * len(a.methods)))
        for m in measured:
            _log(f"measured {m['method']}: {m['train_wall']:.2f} s/epoch training (CPU {m['train_cpu']:.2f} s), "
                 f"{m['eval_wall']:.2f} s per dev evaluation")
    if a.epochs is None:
        elapsed = time.perf_counter() - t0
        remaining = a.budget_minutes * 60 - elapsed - 60  # one minute for the test evaluations and the report
        epochs, per_epoch = choose_epochs(measured, len(a.seeds), a.workers, remaining)
        budget_note = (f"{epochs} epochs per method: predicted {per_epoch:.0f} s of wall time per epoch of all "
                       f"{len(a.methods)} methods x {len(a.seeds)} seeds on {a.workers} workers, "
                       f"{remaining / 60:.1f} min left of the {a.budget_minutes:.0f}-minute budget after warm-up "
                       f"and measurement")
    else:
        epochs = a.epochs
        budget_note = f"{epochs} epochs per method (set by --epochs)"
    _log(budget_note)

    jobs = [(m, s) for m in METHOD_ORDER if m in a.methods for s in a.seeds]
    results: list[dict[str, Any]] = []
    missing: list[tuple[str, int]] = []
    if a.reuse_only:  # report the finished runs only
        for m, s in jobs:
            r = finished_run(args, m, s, epochs)
            if r is None:
                missing.append((m, s))
            else:
                results.append(r)
        jobs = []
        _log(f"--reuse-only: {len(results)} finished runs, {len(missing)} not run: {missing}")
    with _pool(a.workers) as pool:
        futures = {pool.submit(run_job, args, m, s, epochs): (m, s) for m, s in jobs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.append(r)
            _log(f"{r['method']} seed {r['seed']}: test NDCG@10 {r['test']['ndcg@10']:.4f} (best dev epoch "
                 f"{r['best_epoch']}), {r['seconds_per_epoch']:.2f} s/epoch, {r['wall_seconds']:.0f} s wall")
    total_minutes = (time.perf_counter() - t0) / 60
    report(a, args, split, pop, warm, measured, results, epochs, budget_note, total_minutes, missing)
    return 0


# ------------------------------------------------------------------------------------------------------------
# the report


def report(a: argparse.Namespace, args: dict[str, Any], split: Any, pop: dict[str, Any], warm: list[dict[str, Any]],
           measured: list[dict[str, Any]], results: list[dict[str, Any]], epochs: int, budget_note: str,
           total_minutes: float, missing: list[tuple[str, int]] | None = None) -> None:
    out = Path(a.out)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        by_method.setdefault(r["method"], []).append(r)
    methods = [m for m in TABLE_ORDER if m in by_method]

    rows: list[dict[str, Any]] = []
    pop_row: dict[str, Any] = {"method": "Popularity (train+dev counts)", "seeds": 0}
    for k in KS:
        pop_row[f"test_ndcg@{k}_mean"], pop_row[f"test_ndcg@{k}_std"] = pop["test"][f"ndcg@{k}"], 0.0
    rows.append(pop_row)
    for label, field in (("Warm start (before head reset)", "before"), ("Warm start (after head reset)", "after")):
        row: dict[str, Any] = {"method": label, "seeds": len(warm)}
        for k in KS:
            vals = [w["info"]["before_reset"][f"test_ndcg@{k}"] if field == "before" else
                    w["after_reset"][f"test_ndcg@{k}"] for w in warm]
            row[f"test_ndcg@{k}_mean"], row[f"test_ndcg@{k}_std"] = _mean_std(vals)
        rows.append(row)
    for m in methods:
        rs = by_method[m]
        row = {"method": DISPLAY[m], "seeds": len(rs)}
        for k in KS:
            row[f"test_ndcg@{k}_mean"], row[f"test_ndcg@{k}_std"] = _mean_std([r["test"][f"ndcg@{k}"] for r in rs])
        row["test_ndcg@10_last_epoch_mean"] = _mean_std([r["test_last_epoch"]["ndcg@10"] for r in rs])[0]
        row["best_dev_ndcg@5_mean"] = _mean_std([r["best_dev_ndcg@5"] for r in rs])[0]
        row["best_epoch_mean"] = _mean_std([float(r["best_epoch"]) for r in rs])[0]
        row["seconds_per_epoch_mean"] = _mean_std([r["seconds_per_epoch"] for r in rs])[0]
        rows.append(row)

    pop10 = pop["test"]["ndcg@10"]
    mean10 = {m: _mean_std([r["test"]["ndcg@10"] for r in by_method[m]])[0] for m in methods}
    checks = [{"check": f"{DISPLAY[m]} beats popularity (test NDCG@10 {mean10[m]:.4f} > {pop10:.4f})",
               "passed": mean10[m] > pop10} for m in methods]
    for m in ("ksong", "bsvrb_ndcg"):
        if m in mean10 and "song" in mean10:
            checks.append({"check": f"{DISPLAY[m]} at or above SONG (test NDCG@10 {mean10[m]:.4f} vs "
                                    f"{mean10['song']:.4f})", "passed": mean10[m] >= mean10["song"]})

    tag = a.tag
    _write_csv(out / f"{tag}_table.csv", rows)
    md = [f"# Top-K NDCG on MovieLens-100K (up to {len(a.seeds)} seeds, {epochs} epochs per method)", ""]
    md += [f"Test NDCG@K (all-ranking, at the best dev-NDCG@5 epoch), mean ± std over the seeds of each row. "
           f"Budget: {budget_note}. Wall time of the invocation that wrote this report {total_minutes:.1f} min; "
           f"the {len(results)} runs took {sum(r['wall_seconds'] for r in results) / 3600:.1f} h of wall time in "
           "all (finished runs in the work folder are reused, so several invocations can share the work).", ""]
    md.append("| method | seeds | NDCG@5 | NDCG@10 | NDCG@20 | NDCG@50 | best epoch | s/epoch |")
    md.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'test_ndcg@{k}_mean']:.4f} ± {r[f'test_ndcg@{k}_std']:.4f}" for k in KS]
        extra = [f"{r['best_epoch_mean']:.1f}" if "best_epoch_mean" in r else "",
                 f"{r['seconds_per_epoch_mean']:.2f}" if "seconds_per_epoch_mean" in r else ""]
        seeds = ",".join(str(x["seed"]) for x in by_method.get(_label_of(r["method"]), [])) or "-"
        md.append(f"| {r['method']} | {seeds} | " + " | ".join(cells + extra) + " |")
    if missing:
        md += ["", "Not run (`--reuse-only`): " + ", ".join(f"{DISPLAY[m]} seed {s}" for m, s in missing) + "."]
    md += ["", "Sanity checks:", ""]
    md += [f"- [{'x' if c['passed'] else ' '}] {c['check']}" for c in checks]
    md += ["", f"Settings: K = 20 (K-SONG, BSVRB; lambda step eta0 = {a.eta0}, tau1 = {a.tau1}), batch 256 users, "
           f"10 positives + 300 negatives, Adam lr {a.lr} (x0.25 at epoch {epochs // 2}), weight decay 1e-7; "
           f"warm-up {a.warmup_epochs} epochs of "
           f"listwise cross-entropy at lr {a.warmup_lr}, head re-initialised; other hyper-parameters are the "
           "defaults of the methods' configs in `mbbo.ranking.configs` (ndcg.md). Seconds per epoch are training only "
           "(no evaluation) as measured during the runs, which shared the cores with other processes, so they are "
           "contended (the load average is in the metrics file); the one-at-a-time measurement below is the "
           "cleaner figure.", ""]
    shown = [m for m in VARIANTS if m in by_method]
    if shown:
        md += ["K-SONG rows: \"K-SONG (mbbo's variant)\" is `ksong` with its defaults (first-sample initialisation of "
               "u, lambda, v and s; moving-average lambda step; psi' with the factor alpha; psi = 2 sigmoid(2 t)); "
               "the other K-SONG rows change it as follows: " + "; ".join(
                   f"{DISPLAY[m]}: " + ", ".join(f"{k} = {v}" for k, v in VARIANTS[m][1].items()) for m in shown)
               + ".", ""]
    if args["overrides"]:
        md += ["Per-method settings (`--set`, chosen on dev): " + "; ".join(
            f"{DISPLAY[m]}: " + ", ".join(f"{k} = {v}" for k, v in kv.items())
            for m, kv in args["overrides"].items()) + ".", ""]
    md += [
           "ML-100K choices (reasons and pilots in the docstring of `experiments/ndcg_ml100k.py`): warm-up "
           f"{a.warmup_epochs} epochs at lr {a.warmup_lr} instead of the papers' 20 at 1e-3 (4 Adam steps per epoch "
           f"here, 541 on ML-20M); lr {a.lr} instead of 4e-4; eta0 {a.eta0} and tau1 {a.tau1} instead of 0.01 and "
           "1e-3 (with those the thresholds lambda_q never reach the top-K level); K = 20 instead of 300 "
           "(K/N ~ 1.2% as on ML-20M)" + ("; fewer epochs than 120 (the budget above)." if epochs < 120 else "."), ""]
    if measured:
        md += ["Measured one method at a time (one epoch of 4 steps after one unmeasured step, seed 0, "
               "1 thread):", ""]
        md += [f"- {DISPLAY[m['method']]}: {m['train_wall']:.2f} s/epoch wall ({m['train_cpu']:.2f} s CPU), "
               f"dev evaluation {m['eval_wall']:.2f} s (load average {m.get('load_average', float('nan')):.1f})"
               for m in measured]
        md.append("")
    _write_text(out / f"{tag}_table.md", "\n".join(md))

    curves = {m: {str(r["seed"]): _columns(r["curve"]) for r in by_method[m]} for m in methods}
    _write_json(out / f"{tag}_metrics.json", compact=True, value={
        "settings": {**args, "epochs": epochs, "ks": KS, "topk": 20, "batch_size": 256, "num_pos": 10,
                     "num_neg": 300, "lr_decay": 0.25, "lr_decay_epoch": epochs // 2},
        "budget": budget_note,
        "total_wall_minutes": total_minutes,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "popularity": pop,
        "warm_start": warm,
        "measured": measured,
        "checks": checks,
        "missing_runs": [list(x) for x in missing or []],
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
        "curves": curves,  # per method and seed: columns over the evaluations (every epoch, from epoch 0)
    })
    _plot(out / f"{tag}_curves.png", by_method, methods, pop["dev"]["ndcg@5"])
    _log(f"wrote {out}/{tag}_table.csv, .md, _metrics.json, _curves.png")
    for c in checks:
        _log(("PASS " if c["passed"] else "FAIL ") + c["check"])


def _label_of(display: str) -> str:
    """The row label of a displayed method name (``"SONG"`` -> ``"song"``), or the name itself."""
    return next((k for k, v in DISPLAY.items() if v == display), display)


def _columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-epoch records as columns (``{"epoch": [...], "dev_ndcg@5": [...], ...}``)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return {k: [r.get(k) for r in records] for k in keys}


def _plot(path: Path, by_method: dict[str, list[dict[str, Any]]], methods: list[str], pop_dev5: float) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mbbo.checkpoint import atomic_write_bytes

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m in methods:
        curves = [np.array([[c["epoch"], c["dev_ndcg@5"]] for c in r["curve"]]) for r in by_method[m]]
        n = min(len(c) for c in curves)
        x = curves[0][:n, 0]
        ys = np.stack([c[:n, 1] for c in curves])
        mean, std = ys.mean(0), ys.std(0)
        style = "-" if m in ("song", "ksong", "bsvrb_ndcg") else ":" if m in VARIANTS else "--"
        (line,) = ax.plot(x, mean, style, label=DISPLAY[m], linewidth=2 if style != "--" else 1.2)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(pop_dev5, color="grey", linestyle=":", label="popularity")
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev NDCG@5 (all-ranking)")
    ax.set_title("ML-100K: dev NDCG@5 (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
