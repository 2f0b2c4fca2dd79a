"""Shared helpers of the T1/T2 experiment scripts (`hyperparam_curves.py`, `hyperparam_speedup.py`,
`noisy_labels.py`).

- Running: :func:`run_mbbo` runs `mbbo run ...` in this process (the CLI's own `main`, so a run is exactly
  what the printed command would do, without paying the torch import per run) and skips runs already
  completed with the same arguments (a `DONE.json` marker), so a script can be restarted after an interruption.
- Aggregation: :func:`read_curve`, :func:`mean_std_on_grid` (mean and population std of several seeds'
  curves on a common x grid), :func:`curve_rows` / :func:`write_csv` / :func:`write_json` (atomic writes).
- Plotting: :func:`plot_bands` (mean lines with ±std bands, one or more panels), :func:`bar_chart`.
- Baseline: :func:`train_logistic_regression` (full-batch gradient descent on the L2-regularised logistic
  loss) and :func:`tune_logistic_regression` (step size chosen on the validation split).

All outputs are written atomically (`mbbo.checkpoint.atomic_write_bytes`), so a crash never leaves a
half-written CSV, JSON or PNG behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mbbo.checkpoint import atomic_write_bytes, atomic_write_text
from mbbo.metrics_log import read_metrics

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "experiments" / "results"
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "libsvm"
DEFAULT_SCRATCH = PROJECT_ROOT / "runs" / "experiments"  # git-ignored
DONE_FILE = "DONE.json"


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------


def mbbo_command(args: Sequence[str]) -> str:
    """The shell command equivalent to `args` (the `mbbo` argument list)."""
    return "mbbo " + shlex.join([str(a) for a in args])


def _run_argv(args: Sequence[str], out: Path) -> list[str]:
    return ["run", *[str(a) for a in args], "--out", str(out), "--no-progress", "--overwrite"]


def completed(args: Sequence[str], out_dir: str | os.PathLike[str], *, keep_checkpoint: bool = False) -> bool:
    """Whether `out_dir` holds a run that :func:`run_mbbo` completed with these arguments."""
    out = Path(out_dir)
    marker = out / DONE_FILE
    if not marker.is_file() or not (out / "metrics.jsonl").is_file():
        return False
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return done.get("argv") == _run_argv(args, out) and done.get("keep_checkpoint") == keep_checkpoint


def run_mbbo(args: Sequence[str], out_dir: str | os.PathLike[str], *, reuse: bool = True,
             keep_checkpoint: bool = False) -> list[dict[str, Any]]:
    """Run `mbbo run <args> --out out_dir` in this process and return its metrics records.

    `args` must not contain `--out`, `--overwrite` or `--no-progress` (added here). When `reuse` is true and
    the run was already completed with the same arguments (:func:`completed`), it is not run again and its log
    is read back. The (large) `checkpoint.pt` is deleted unless `keep_checkpoint`.

    Raises:
        RuntimeError: the command exited with a non-zero status (input error or divergence).
    """
    from mbbo import cli  # imported lazily: the aggregation helpers do not need the CLI

    out = Path(out_dir)
    argv = _run_argv(args, out)
    if reuse and completed(args, out, keep_checkpoint=keep_checkpoint):
        return read_metrics(out / "metrics.jsonl")
    marker = out / DONE_FILE
    marker.unlink(missing_ok=True)
    started = time.perf_counter()
    status = cli.main(argv)
    if status != 0:
        raise RuntimeError(f"`{mbbo_command(argv)}` exited with status {status}")
    if not keep_checkpoint:
        (out / "checkpoint.pt").unlink(missing_ok=True)
    write_json(marker, {"argv": argv, "keep_checkpoint": keep_checkpoint,
                        "wall_seconds": time.perf_counter() - started, "load_average": load_average()})
    return read_metrics(out / "metrics.jsonl")


def run_wall_seconds(out_dir: str | os.PathLike[str]) -> float | None:
    """Wall seconds of a completed :func:`run_mbbo` run (data loading and evaluation included)."""
    marker = Path(out_dir) / DONE_FILE
    if not marker.is_file():
        return None
    value = json.loads(marker.read_text(encoding="utf-8")).get("wall_seconds")
    return None if value is None else float(value)


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (empty where unavailable)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": str(torch.__version__),
            "python": platform.python_version(), "load_average": load_average()}


# ---------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------


def read_curve(records: Sequence[Mapping[str, Any]] | str | os.PathLike[str], x: str, y: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) points of a run (records, a run folder or a `metrics.jsonl`), sorted by x.

    Records without `y` (or with `y` None) are skipped.
    """
    if not isinstance(records, Sequence) or isinstance(records, str):
        path = Path(records)
        records = read_metrics(path / "metrics.jsonl" if path.is_dir() else path)
    points = sorted((float(r[x]), float(r[y])) for r in records if r.get(y) is not None)
    if not points:
        raise ValueError(f"no record holds both {x!r} and {y!r}")
    data = np.asarray(points, dtype=float)
    return data[:, 0], data[:, 1]


def mean_std_on_grid(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray | int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and population std (ddof 0) of several curves on a common x grid.

    Only the x range covered by every curve is used (no extrapolation). `grid` may be None (the first
    curve's x values inside that range: the identity when the seeds share their evaluation points, as with
    epochs), an int (that many evenly spaced points over the common range, e.g. for wall time, which differs
    between seeds), or an array (its points inside the common range). Curves are interpolated linearly.

    Returns:
        (grid, mean, std), three arrays of equal length.

    Raises:
        ValueError: no curve, or the curves (or the grid) do not overlap.
    """
    if not curves:
        raise ValueError("mean_std_on_grid needs at least one curve")
    low = max(float(np.min(xs)) for xs, _ in curves)
    high = min(float(np.max(xs)) for xs, _ in curves)
    if low > high:
        raise ValueError("the curves do not overlap on x")
    if grid is None:
        first = np.asarray(curves[0][0], dtype=float)
        points = first[(first >= low) & (first <= high)]
    elif isinstance(grid, int | np.integer) and not isinstance(grid, bool):
        if grid < 1:
            raise ValueError(f"grid must have at least one point, got {grid}")
        points = np.linspace(low, high, int(grid)) if grid > 1 else np.array([low])
    else:
        given = np.asarray(grid, dtype=float)
        points = given[(given >= low) & (given <= high)]
    if points.size == 0:
        raise ValueError("the grid has no point inside the range covered by every curve")
    stacked = np.stack([np.interp(points, np.asarray(xs, float), np.asarray(ys, float)) for xs, ys in curves])
    return points, stacked.mean(axis=0), stacked.std(axis=0)


@dataclass
class Band:
    """One aggregated curve: label, grid, mean, std, the number of seeds and (optionally) its line style."""

    label: str
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n: int
    color: str | None = None
    linestyle: str = "-"


def band(label: str, curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray | int | None = None
         ) -> Band:
    """:func:`mean_std_on_grid` as a :class:`Band`."""
    x, mean, std = mean_std_on_grid(curves, grid)
    return Band(label, x, mean, std, len(curves))


def curve_rows(bands: Iterable[Band], **fixed: Any) -> list[dict[str, Any]]:
    """Long-format CSV rows (`fixed` columns, label, x, mean, std, n_seeds), one per grid point."""
    rows = []
    for b in bands:
        for x, mean, std in zip(b.x, b.mean, b.std, strict=True):
            rows.append({**fixed, "label": b.label, "x": float(x), "mean": float(mean), "std": float(std),
                         "n_seeds": b.n})
    return rows


def _format_cell(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return value


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Write rows (dicts) as CSV atomically; columns default to the keys in order of first appearance.

    Floats are written with 6 significant digits; missing cells are empty.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format_cell(value) for key, value in row.items()})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, buffer.getvalue())
    return target


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts of strings."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """Write a JSON document atomically (indented, keys in insertion order)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(value, indent=2, default=str) + "\n")
    return target


def zoom_limits(bands: Sequence[Band], after: float, margin: float = 0.03) -> tuple[float, float]:
    """y limits that show every band from x >= `after` on (the steep start is cut off): from below the lowest
    mean - std to above the highest mean at or after `after`."""
    lows, highs = [], []
    for b in bands:
        keep = b.x >= after
        if not keep.any():
            keep = np.ones_like(b.x, dtype=bool)
        lows.append(float(np.min((b.mean - b.std)[keep])))
        highs.append(float(np.max((b.mean + b.std)[keep])))
    low, high = min(lows), max(highs)
    pad = margin * (high - low if high > low else max(abs(high), 1.0))
    return low - pad, high + pad


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std of a list of numbers."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std())


# ---------------------------------------------------------------------------------------------------------
# plotting
# ---------------------------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render a matplotlib `Figure` to PNG (Agg, no pyplot) and write it atomically."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def plot_bands(panels: Sequence[tuple[str, Sequence[Band]]], path: str | os.PathLike[str], *, ylabel: str,
               title: str | None = None, logy: bool = False,
               ylim: tuple[float | None, float | None] | None = None) -> Path:
    """One row of panels (x label, bands), each band a mean line with a shaded ±std region; `ylim` applies
    to every panel (None: automatic)."""
    fig = Figure(figsize=(5.2 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xlabel, bands) in zip(axes, panels, strict=True):
        for index, b in enumerate(bands):
            color = b.color or f"C{index % 10}"
            label = f"{b.label} (n={b.n})" if b.n > 1 else b.label
            ax.plot(b.x, b.mean, color=color, linestyle=b.linestyle, label=label)
            if b.n > 1:
                ax.fill_between(b.x, b.mean - b.std, b.mean + b.std, color=color, alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def bar_chart(groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              path: str | os.PathLike[str], *, ylabel: str, xlabel: str, title: str | None = None,
              ylim: tuple[float | None, float | None] | None = None,
              reference: tuple[str, float] | None = None) -> Path:
    """Grouped bars with std error bars: `series[name] = (means per group, stds per group)`; `reference`
    (label, value) adds a dashed horizontal line."""
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    positions = np.arange(len(groups), dtype=float)
    width = 0.8 / max(1, len(series))
    for index, (name, (means, stds)) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar(positions + offset, means, width, yerr=stds, capsize=3, label=name, color=f"C{index % 10}")
    if reference is not None:
        ax.axhline(reference[1], color="0.3", linestyle="--", linewidth=1, label=reference[0])
    ax.set_xticks(positions, list(groups))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# the plain logistic-regression baseline (T2 (i))
# ---------------------------------------------------------------------------------------------------------


def logistic_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean log(1 + exp(-y w^T a)) over the rows of X (labels +-1, X already holds any bias column)."""
    return torch.nn.functional.softplus(-y * (X @ w)).mean()


def accuracy(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows with y w^T a > 0 (a zero margin counts as an error)."""
    return float(((X @ w) * y > 0).to(torch.float64).mean())


def train_logistic_regression(X: torch.Tensor, y: torch.Tensor, lr: float, iterations: int,
                              lam: float = 1e-5) -> torch.Tensor:
    """Full-batch gradient descent on mean logistic loss + (lam/2)||w||^2 from w = 0.

    Returns the final w; it may be non-finite if the step size is too large (the caller checks).
    """
    if not (lr > 0 and iterations >= 0 and lam >= 0):
        raise ValueError(f"need lr > 0, iterations >= 0, lam >= 0; got {lr!r}, {iterations!r}, {lam!r}")
    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
    n = X.shape[0]
    for _ in range(iterations):
        # d/dw softplus(-y w^T a) = -y sigma(-y w^T a) a
        coeff = -y * torch.sigmoid(-y * (X @ w))
        w = w - lr * (X.T @ coeff / n + lam * w)
    return w


@dataclass
class TunedLogistic:
    """The selected model and the validation score of every step size tried."""

    w: torch.Tensor
    lr: float
    val_loss: float
    scores: dict[float, float]


def tune_logistic_regression(X_train: torch.Tensor, y_train: torch.Tensor, X_val: torch.Tensor,
                             y_val: torch.Tensor, lrs: Sequence[float], iterations: int, lam: float = 1e-5
                             ) -> TunedLogistic:
    """Train one model per step size and keep the one with the lowest validation logistic loss.

    Step sizes that diverge (non-finite weights or loss) score +inf.

    Raises:
        ValueError: no step size given, or every one diverged.
    """
    if not lrs:
        raise ValueError("tune_logistic_regression needs at least one step size")
    best: TunedLogistic | None = None
    scores: dict[float, float] = {}
    for lr in lrs:
        w = train_logistic_regression(X_train, y_train, float(lr), iterations, lam)
        loss = float(logistic_loss(w, X_val, y_val)) if bool(torch.isfinite(w).all()) else float("inf")
        loss = loss if np.isfinite(loss) else float("inf")
        scores[float(lr)] = loss
        if np.isfinite(loss) and (best is None or loss < best.val_loss):
            best = TunedLogistic(w, float(lr), loss, scores)
    if best is None:
        raise ValueError(f"every step size in {list(lrs)} diverged")
    best.scores = scores
    return best
