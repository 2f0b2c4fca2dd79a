"""Convergence plots from run directories (`config.json` + `metrics.jsonl`, as written by the runner).

Matplotlib is used through `Figure` objects with the Agg canvas, never through `pyplot`, so plotting works
headless and leaves the global backend alone.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mbbo.checkpoint import atomic_write_bytes
from mbbo.metrics_log import read_metrics

__all__ = ["X_AXES", "RunData", "available_metrics", "average_curves", "load_run", "plot_runs"]

X_AXES = ("epoch", "time", "oracle_calls")
# Config keys that do not make two runs different experiments.
_IGNORED_KEYS = frozenset({"seed", "out_dir", "progress", "overwrite"})


@dataclass(frozen=True)
class RunData:
    """One run directory: its label, its config (may be empty) and its metrics records."""

    path: Path
    label: str
    config: dict[str, Any]
    records: list[dict[str, Any]]


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    """`config[key]`, where a dotted key walks nested dicts; None if absent."""
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def load_run(run_dir: str | os.PathLike[str], label_from: str | None = None) -> RunData:
    """Read a run directory; the label is `config[label_from]` (dotted keys allowed). Without `label_from`
    it is `config["algorithm"]`, or the folder name when the config has none.

    Raises:
        FileNotFoundError: the folder or its `metrics.jsonl` is missing.
        ValueError: the log is empty or `config.json` is not a JSON object.
    """
    path = Path(run_dir)
    if path.is_file():
        raise ValueError(f"{path} is a file, not a run folder: give the folder that holds metrics.jsonl "
                         f"(here perhaps {path.parent})")
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    records = read_metrics(path / "metrics.jsonl")
    if not records:
        raise ValueError(f"metrics log {path / 'metrics.jsonl'} is empty")
    config: dict[str, Any] = {}
    config_path = path / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
    label = _lookup(config, label_from or "algorithm")
    if label is None and label_from is not None:
        keys = ", ".join(sorted(k for k, v in config.items() if not isinstance(v, Mapping)))
        where = config_path if config else f"{path} (it has no config.json)"
        raise ValueError(f"--label-from {label_from!r}: no such key in {where}; top-level keys: "
                         f"{keys or 'none'} (dotted keys reach nested ones)")
    name = str(label) if label is not None else path.name
    return RunData(path=path, label=name, config=config, records=records)


def available_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the numeric (non-bool) scalar metrics present in at least one record, sorted."""
    names = {
        key
        for record in records
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    if any(isinstance(record.get("oracle_calls"), Mapping) for record in records):
        names.add("oracle_calls")
    return sorted(names)


def _x_value(record: Mapping[str, Any], x: str, path: Path) -> float:
    """The x coordinate of a record; `oracle_calls` is the sum over oracle kinds."""
    if x not in record:
        raise ValueError(f"{path}: a record has no {x!r} field")
    value = record[x]
    if x == "oracle_calls":
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: 'oracle_calls' must be a dict of counts, got {value!r}")
        return float(sum(value.values()))
    return float(value)


def _curve(run: RunData, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) points of one run, skipping records without `y`, sorted by x."""
    metrics = available_metrics(run.records)
    if y not in metrics:
        raise ValueError(f"unknown metric {y!r} in {run.path}; available: {', '.join(metrics)}")
    points = [
        (_x_value(record, x, run.path), _x_value(record, y, run.path))
        for record in run.records
        if record.get(y) is not None
    ]
    points.sort(key=lambda point: point[0])
    data = np.asarray(points, dtype=float).reshape(-1, 2)
    if not np.isfinite(data[:, 1]).any():
        raise ValueError(f"metric {y!r} in {run.path / 'metrics.jsonl'} has no finite value "
                         f"({len(data)} records, all NaN or inf): nothing to plot")
    return data[:, 0], data[:, 1]


def average_curves(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of several curves on a common x grid.

    The grid is the first curve's x values inside the range covered by every curve; each curve is
    linearly interpolated onto it (an identity when all curves share their x values).

    Returns:
        (grid, mean, std), three arrays of the grid's length.
    """
    if not curves:
        raise ValueError("average_curves needs at least one curve")
    low = max(float(xs.min()) for xs, _ in curves)
    high = min(float(xs.max()) for xs, _ in curves)
    grid = curves[0][0][(curves[0][0] >= low) & (curves[0][0] <= high)]
    if grid.size == 0:
        raise ValueError("the curves do not overlap on x; cannot average them")
    stacked = np.stack([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, stacked.mean(axis=0), stacked.std(axis=0)


def _strip_ignored(value: Any) -> Any:
    """A config without the keys that do not define an experiment (seeds, output folder, ...)."""
    if isinstance(value, Mapping):
        return {
            key: _strip_ignored(item)
            for key, item in value.items()
            if key not in _IGNORED_KEYS and not str(key).endswith("_seed")
        }
    return value


def _group_runs(runs: Sequence[RunData]) -> list[list[RunData]]:
    """Group runs with the same label whose configs differ only by seed keys (order of first appearance)."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        signature = json.dumps([run.label, _strip_ignored(run.config)], sort_keys=True, default=str)
        # Runs without a config.json cannot be matched: each stays on its own.
        key = signature if run.config else f"{signature}|{run.path.resolve()}"
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _legend_labels(groups: Sequence[list[RunData]]) -> list[str]:
    """Group labels; groups sharing a label are told apart by their first folder's name."""
    labels = [group[0].label for group in groups]
    counts = {label: labels.count(label) for label in labels}
    return [
        f"{label} ({group[0].path.name})" if counts[label] > 1 else label
        for label, group in zip(labels, groups, strict=True)
    ]


def _draw_group(ax: Any, group: list[RunData], label: str, color: str, x: str, y: str) -> None:
    """One group: a mean line with a ±std band (several seeds, x = epoch) or one line per run."""
    curves = [_curve(run, x, y) for run in group]
    if len(curves) > 1 and x == "epoch":
        grid, mean, std = average_curves(curves)
        ax.plot(grid, mean, color=color, label=f"{label} (n={len(curves)})")
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        return
    for index, (xs, ys) in enumerate(curves):
        alpha = 1.0 if len(curves) == 1 else 0.7
        ax.plot(xs, ys, color=color, label=label if index == 0 else None, alpha=alpha)


def _image_format(output: Path) -> str:
    """The image format named by the output's suffix, checked against what matplotlib can write."""
    fmt = output.suffix.lstrip(".").lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot write {output}: unsupported format {fmt!r} (one of {sorted(supported)})")
    return fmt


def _render(fig: Figure, fmt: str) -> bytes:
    """Render the figure to bytes in format `fmt`."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, bbox_inches="tight")
    return buffer.getvalue()


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    x: str,
    y: str,
    output: str | os.PathLike[str],
    *,
    label_from: str | None = None,
    logy: bool = False,
) -> Path:
    """Plot metric `y` against `x` for several runs and write the figure atomically to `output`.

    Args:
        run_dirs: run folders, each with `metrics.jsonl` and (optionally) `config.json`.
        x: `"epoch"`, `"time"` (stepping seconds) or `"oracle_calls"` (the sum over oracle kinds).
        y: a metric name from the records (e.g. `"val_loss"`).
        output: image path; the format comes from the suffix (`.png`, `.pdf`, `.svg`, ...).
        label_from: config key (dotted for nested keys) giving the legend label; default `algorithm`, else the
            folder name. A key that the config lacks is an error.
        logy: logarithmic y axis.

    Runs with the same label whose configs differ only by seed are one group: with `x="epoch"` the group
    is drawn as its mean with a shaded mean ± std band, otherwise as one line per run in the group's colour.

    Returns:
        The output path.

    Raises:
        ValueError: no run, unknown `x`, unknown metric `y` (the message lists the available ones), an
            empty log, or an unsupported output format.
        FileNotFoundError: a missing run folder or log.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    target = Path(output)
    fmt = _image_format(target)
    groups = _group_runs([load_run(run_dir, label_from) for run_dir in run_dirs])
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    colors = [f"C{index % 10}" for index in range(len(groups))]
    for group, label, color in zip(groups, _legend_labels(groups), colors, strict=True):
        _draw_group(ax, group, label, color, x, y)
    ax.set_xlabel({"time": "time (s)", "oracle_calls": "oracle calls"}.get(x, x))
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    data = _render(fig, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    return target

