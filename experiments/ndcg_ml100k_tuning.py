"""Dev-set tuning of SONG, K-SONG and BSVRB on MovieLens-100K (the settings of ``experiments/ndcg_ml100k.py``).

Each candidate is a method with config overrides (``METHOD.FIELD=VALUE``, as ``--set`` of the main
script), trained for ``--epochs`` epochs on each of ``--seeds`` with the main script's ``run_job`` (same warm-up,
learning-rate decay halfway, dev NDCG@5 every epoch). Candidates are ranked by their best dev NDCG@5 (mean over
seeds); the test NDCG@10 at that epoch is recorded but never used for the choice.

Outputs (written atomically) in ``experiments/results/``: ``{tag}.md`` (the ranked table per method) and
``{tag}.json`` (every run's best dev NDCG@5, best epoch and test NDCG@10). Run folders go to
``--work-dir/<method>_<hash of the overrides>/`` and are reused when the script is started again.

Usage::

    .venv/bin/python experiments/ndcg_ml100k_tuning.py --seeds 0 1 --epochs 120 \\
        --candidate ksong --candidate ksong.psi_alpha=1 --candidate song.gamma0=0.5

``--candidate`` takes a method name optionally followed by comma-separated overrides
(``ksong.psi_alpha=1,topk_version=prac``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ndcg_ml100k as main_script  # the sibling script

DEFAULT_WORK = main_script.PROJECT_ROOT / "runs" / "ndcg_ml100k_tuning"


def parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    """``"ksong.psi_alpha=1,topk_version=prac"`` -> ``("ksong", {"psi_alpha": 1, "topk_version": "prac"})``;
    a bare method name has no overrides. Raises ValueError naming the bad part."""
    method, dot, rest = text.partition(".")
    if not dot:
        from mbbo.ranking.configs import METHODS

        if method not in METHODS:
            raise ValueError(f"--candidate {method!r}: method must be one of {METHODS}")
        return method, {}
    items = [f"{method}.{part}" for part in rest.split(",") if part]
    if not items:
        raise ValueError(f"--candidate {text!r}: nothing after '{method}.'")
    return method, main_script.parse_overrides(items)[method]


def candidate_label(method: str, overrides: dict[str, Any]) -> str:
    """``ksong(psi_alpha=1, topk_version=prac)``, or the bare method name."""
    if not overrides:
        return method
    return f"{method}(" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"


def candidate_dir(work_dir: Path, method: str, overrides: dict[str, Any]) -> Path:
    """A work folder per candidate: the method and a short hash of its overrides."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    return work_dir / f"{method}_{digest}"


def _job(args: dict[str, Any], method: str, overrides: dict[str, Any], seed: int, epochs: int) -> dict[str, Any]:
    job_args = {**args, "work_dir": str(candidate_dir(Path(args["work_dir"]), method, overrides)),
                "overrides": {method: overrides}}
    result = main_script.run_job(job_args, method, seed, epochs)
    return {"method": method, "overrides": overrides, "seed": seed, "best_dev_ndcg@5": result["best_dev_ndcg@5"],
            "best_epoch": result["best_epoch"], "test_ndcg@10": result["test"]["ndcg@10"],
            "seconds_per_epoch": result["seconds_per_epoch"]}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per candidate (mean over its seeds), sorted by method, then best dev NDCG@5 (descending)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], candidate_label(r["method"], r["overrides"])), []).append(r)
    rows = []
    for (method, label), rs in groups.items():
        dev = main_script._mean_std([r["best_dev_ndcg@5"] for r in rs])
        test = main_script._mean_std([r["test_ndcg@10"] for r in rs])
        rows.append({"method": method, "candidate": label, "seeds": sorted(r["seed"] for r in rs),
                     "dev_ndcg@5_mean": dev[0], "dev_ndcg@5_std": dev[1], "test_ndcg@10_mean": test[0],
                     "test_ndcg@10_std": test[1],
                     "best_epoch_mean": sum(r["best_epoch"] for r in rs) / len(rs)})
    rows.sort(key=lambda r: (r["method"], -r["dev_ndcg@5_mean"]))
    return rows


def _cell(row: dict[str, Any], name: str) -> str:
    """``mean ± std`` over seeds, or the single value."""
    if len(row["seeds"]) == 1:
        return f"{row[name + '_mean']:.4f}"
    return f"{row[name + '_mean']:.4f} ± {row[name + '_std']:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidate", action="append", required=True, metavar="METHOD[.FIELD=VALUE,...]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--data", default=str(main_script.DEFAULT_DATA))
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eta0", type=float, default=1.0)
    p.add_argument("--tau1", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=int, default=40)
    p.add_argument("--warmup-lr", type=float, default=5e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default=str(DEFAULT_WORK))
    p.add_argument("--warmup-cache", default=str(main_script.DEFAULT_WORK / "warmup_cache"),
                   help="warm-up checkpoints (keyed by their settings; shared with the main script)")
    p.add_argument("--out", default=str(main_script.RESULTS_DIR))
    p.add_argument("--tag", default="ndcg_ml100k_tuning")
    a = p.parse_args(argv)
    try:
        candidates = [parse_candidate(c) for c in a.candidate]
    except ValueError as exc:
        p.error(str(exc))
    if a.epochs < 2:
        p.error(f"--epochs={a.epochs} must be >= 2")
    args = {"data": a.data, "seeds": a.seeds, "lr": a.lr, "eta0": a.eta0, "tau1": a.tau1,
            "warmup_epochs": a.warmup_epochs, "warmup_lr": a.warmup_lr, "work_dir": a.work_dir,
            "warmup_cache": a.warmup_cache}
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(m, o, s) for m, o in candidates for s in a.seeds]
    runs: list[dict[str, Any]] = []
    with main_script._pool(a.workers) as pool:
        futures = {pool.submit(_job, args, m, o, s, a.epochs): (m, o, s) for m, o, s in jobs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            runs.append(r)
            main_script._log(f"{candidate_label(r['method'], r['overrides'])} seed {r['seed']}: best dev NDCG@5 "
                             f"{r['best_dev_ndcg@5']:.4f} (epoch {r['best_epoch']}), test NDCG@10 "
                             f"{r['test_ndcg@10']:.4f}")
    rows = summarise(runs)
    out = Path(a.out)
    md = [f"# Dev-set tuning on ML-100K ({a.epochs} epochs, seeds {a.seeds})", "",
          "Ranked by best dev NDCG@5 (mean over seeds; the choice uses dev only). Test NDCG@10 at the best dev "
          f"epoch is shown for information. Common settings: lr {a.lr}, eta0 {a.eta0}, tau1 {a.tau1}, warm-up "
          f"{a.warmup_epochs} epochs at {a.warmup_lr}, K = 20 for the top-K methods; the rest are the "
          "defaults of `mbbo.ranking.configs`.", "",
          "| candidate | dev NDCG@5 | test NDCG@10 | best epoch |", "|---|---|---|---|"]
    md += [f"| {r['candidate']} | {_cell(r, 'dev_ndcg@5')} | {_cell(r, 'test_ndcg@10')} | {r['best_epoch_mean']:.1f} |"
           for r in rows]
    main_script._write_text(out / f"{a.tag}.md", "\n".join(md) + "\n")
    main_script._write_json(out / f"{a.tag}.json", {"settings": {**args, "epochs": a.epochs}, "rows": rows,
                                                    "runs": runs})
    for line in md[5:]:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
