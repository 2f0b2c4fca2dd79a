"""Plots from run folders: files written, seed groups averaged, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mbbo import checkpoint, plotting
from mbbo.metrics_log import MetricsLog
from mbbo.plotting import available_metrics, average_curves, load_run, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path, name: str, config: dict[str, Any] | None, losses: list[float], per_epoch: int = 2
) -> Path:
    """A run folder like the runner writes: evaluations every iteration."""
    folder = root / name
    folder.mkdir(parents=True)
    if config is not None:
        full = {**config, "runner": {"out_dir": str(folder), "iterations": len(losses) - 1, "eval_every": 1}}
        (folder / "config.json").write_text(json.dumps(full))
    records = [
        {
            "iteration": i,
            "epoch": i / per_epoch,
            "time": 0.1 * i,
            "oracle_calls": {"grad": i, "hvp": 2 * i},
            "val_loss": loss,
            "status": "ok",
        }
        for i, loss in enumerate(losses)
    ]
    MetricsLog(folder / "metrics.jsonl", records)
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path, "soba_s0", {"algorithm": "soba", "lr": 0.1, "seed": 0}, [4.0, 2.0, 1.0]),
        make_run(tmp_path, "soba_s1", {"algorithm": "soba", "lr": 0.1, "seed": 1}, [6.0, 4.0, 3.0]),
        make_run(tmp_path, "bsvrb", {"algorithm": "bsvrb", "lr": 0.1, "seed": 0}, [5.0, 1.0, 0.5]),
        make_run(tmp_path, "no_config", None, [3.0, 2.0, 1.5]),
    ]


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], str]]:
    """Spy on what each legend entry is drawn from."""
    calls: list[tuple[str, list[str], str]] = []
    original = plotting._draw_group

    def spy(ax: Any, group: list[Any], label: str, color: str, x: str, y: str) -> None:
        calls.append((label, [run.path.name for run in group], x))
        original(ax, group, label, color, x, y)

    monkeypatch.setattr(plotting, "_draw_group", spy)
    return calls


def _no_temp_files(directory: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in directory.iterdir())


def test_plot_writes_png_and_groups_seeds(tmp_path: Path, runs: list[Path], drawn: list) -> None:
    output = tmp_path / "plots" / "val_loss.png"
    result = plot_runs(runs, "epoch", "val_loss", output)
    assert result == output
    assert output.read_bytes().startswith(PNG_MAGIC)
    assert _no_temp_files(output.parent)
    assert drawn == [
        ("soba", ["soba_s0", "soba_s1"], "epoch"),
        ("bsvrb", ["bsvrb"], "epoch"),
        ("no_config", ["no_config"], "epoch"),
    ]


def test_band_is_mean_and_std(tmp_path: Path, runs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[Any] = []
    original = plotting.average_curves

    def spy(curves: Any) -> Any:
        result = original(curves)
        captured.append(result)
        return result

    monkeypatch.setattr(plotting, "average_curves", spy)
    plot_runs(runs, "epoch", "val_loss", tmp_path / "out.png")
    ((grid, mean, std),) = captured
    np.testing.assert_array_equal(grid, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(mean, [5.0, 3.0, 2.0])
    np.testing.assert_array_equal(std, [1.0, 1.0, 1.0])


def test_other_x_axes_draw_each_run(tmp_path: Path, runs: list[Path], drawn: list) -> None:
    plot_runs(runs[:2], "time", "val_loss", tmp_path / "t.png")
    plot_runs(runs[:2], "oracle_calls", "val_loss", tmp_path / "o.svg", logy=True)
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    assert b"<svg" in (tmp_path / "o.svg").read_bytes()
    assert [call[2] for call in drawn] == ["time", "oracle_calls"]


def test_different_configs_with_same_label_are_not_averaged(tmp_path: Path, drawn: list) -> None:
    first = make_run(tmp_path, "lr1", {"algorithm": "soba", "lr": 0.1, "seed": 0}, [1.0, 0.5])
    second = make_run(tmp_path, "lr2", {"algorithm": "soba", "lr": 0.2, "seed": 1}, [1.0, 0.4])
    plot_runs([first, second], "epoch", "val_loss", tmp_path / "p.png")
    assert [(label, names) for label, names, _ in drawn] == [("soba (lr1)", ["lr1"]), ("soba (lr2)", ["lr2"])]


def test_label_from_nested_key(tmp_path: Path) -> None:
    folder = make_run(tmp_path, "r", {"algo": {"name": "mrbo"}}, [1.0, 0.5])
    assert load_run(folder, "algo.name").label == "mrbo"
    assert load_run(folder).label == "r"  # no `algorithm` key: the folder name


def test_unknown_label_key_is_an_error(tmp_path: Path) -> None:
    folder = make_run(tmp_path, "r", {"algorithm": "soba", "lr": 0.1}, [1.0, 0.5])
    with pytest.raises(ValueError, match=r"--label-from 'lrr': no such key .*config.json.*algorithm, lr"):
        load_run(folder, "lrr")
    bare = make_run(tmp_path, "bare", None, [1.0, 0.5])
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_run(bare, "lr")


def test_a_file_given_as_run_folder_is_named(tmp_path: Path) -> None:
    folder = make_run(tmp_path, "r", {"algorithm": "soba"}, [1.0, 0.5])
    with pytest.raises(ValueError, match=r"metrics.jsonl is a file, not a run folder.*perhaps .*r"):
        load_run(folder / "metrics.jsonl")


def test_all_nan_metric_is_an_error(tmp_path: Path) -> None:
    folder = make_run(tmp_path, "r", {"algorithm": "soba"}, [float("nan"), float("nan")])
    with pytest.raises(ValueError, match=r"'val_loss' .* has no finite value"):
        plot_runs([folder], "epoch", "val_loss", tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_curve_uses_sum_of_oracle_calls(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "r", {"algorithm": "a"}, [3.0, 2.0, 1.0]))
    xs, ys = plotting._curve(run, "oracle_calls", "val_loss")
    np.testing.assert_array_equal(xs, [0.0, 3.0, 6.0])
    np.testing.assert_array_equal(ys, [3.0, 2.0, 1.0])
    assert available_metrics(run.records) == ["epoch", "iteration", "oracle_calls", "time", "val_loss"]


def test_average_curves_interpolates_on_common_grid() -> None:
    curves = [
        (np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 2.0, 4.0, 6.0])),
        (np.array([0.0, 0.5, 2.0]), np.array([2.0, 3.0, 7.0])),
    ]
    grid, mean, std = average_curves(curves)
    np.testing.assert_array_equal(grid, [0.0, 1.0, 2.0])  # first curve's grid inside the shared range
    second_at_1 = 3.0 + 0.5 * (7.0 - 3.0) / 1.5  # linear interpolation of the second curve at x = 1
    np.testing.assert_allclose(mean, [1.0, (2.0 + second_at_1) / 2, 5.5])
    np.testing.assert_allclose(std, [1.0, (second_at_1 - 2.0) / 2, 1.5])
    with pytest.raises(ValueError, match="do not overlap"):
        average_curves([(np.array([0.0, 1.0]), np.zeros(2)), (np.array([2.0, 3.0]), np.zeros(2))])
    with pytest.raises(ValueError, match="at least one curve"):
        average_curves([])


def test_errors(tmp_path: Path, runs: list[Path]) -> None:
    output = tmp_path / "out.png"
    with pytest.raises(ValueError, match=r"unknown metric 'acc'.*available: epoch, iteration, .*val_loss"):
        plot_runs(runs, "epoch", "acc", output)
    with pytest.raises(ValueError, match="unknown x axis 'iters'; choose one of epoch, time, oracle_calls"):
        plot_runs(runs, "iters", "val_loss", output)
    with pytest.raises(FileNotFoundError, match=r"run folder .*ghost does not exist"):
        plot_runs([tmp_path / "ghost"], "epoch", "val_loss", output)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"metrics\.jsonl is empty"):
        plot_runs([empty], "epoch", "val_loss", output)
    (tmp_path / "nolog").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics log"):
        plot_runs([tmp_path / "nolog"], "epoch", "val_loss", output)
    with pytest.raises(ValueError, match="unsupported format 'xyz'"):
        plot_runs(runs, "epoch", "val_loss", tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="at least one run folder"):
        plot_runs([], "epoch", "val_loss", output)
    assert not output.exists()


def test_failed_write_keeps_previous_image(
    tmp_path: Path, runs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out.png"
    plot_runs(runs, "epoch", "val_loss", output)
    before = output.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("simulated")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        plot_runs(runs, "epoch", "val_loss", output, logy=True)
    assert output.read_bytes() == before
    assert _no_temp_files(tmp_path)
