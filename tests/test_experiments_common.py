"""Aggregation and baseline helpers of the experiment scripts (`experiments/common.py`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mbbo.metrics_log import MetricsLog
from module_loading import load_module

COMMON_PATH = Path(__file__).resolve().parents[1] / "experiments" / "common.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def common():
    """`experiments/common.py` as a module (the folder is not a package)."""
    return load_module("experiments_common", COMMON_PATH)


# --- mean/std over seeds on a common grid -----------------------------------------------------------------


def test_mean_std_shared_grid_is_exact(common):
    x = np.array([0.0, 1.0, 2.0])
    curves = [(x, np.array([1.0, 2.0, 3.0])), (x, np.array([3.0, 2.0, 5.0]))]
    grid, mean, std = common.mean_std_on_grid(curves)
    np.testing.assert_array_equal(grid, x)
    np.testing.assert_allclose(mean, [2.0, 2.0, 4.0])
    np.testing.assert_allclose(std, [1.0, 0.0, 1.0])  # population std (ddof 0)


def test_mean_std_interpolates_onto_first_curve_inside_common_range(common):
    a = (np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, 3.0]))
    b = (np.array([0.5, 2.5]), np.array([10.0, 30.0]))  # y = 10 x + 5 on [0.5, 2.5]
    grid, mean, std = common.mean_std_on_grid([a, b])
    np.testing.assert_array_equal(grid, [1.0, 2.0])
    np.testing.assert_allclose(mean, [(1.0 + 15.0) / 2, (2.0 + 25.0) / 2])
    np.testing.assert_allclose(std, [7.0, 11.5])


def test_mean_std_int_grid_spans_common_range(common):
    a = (np.array([0.0, 4.0]), np.array([0.0, 4.0]))
    b = (np.array([1.0, 3.0]), np.array([1.0, 3.0]))
    grid, mean, std = common.mean_std_on_grid([a, b], 5)
    np.testing.assert_allclose(grid, np.linspace(1.0, 3.0, 5))
    np.testing.assert_allclose(mean, grid)
    np.testing.assert_allclose(std, 0.0, atol=1e-15)
    explicit, _, _ = common.mean_std_on_grid([a, b], np.array([0.0, 2.0, 3.5]))
    np.testing.assert_array_equal(explicit, [2.0])  # points outside the common range are dropped


def test_mean_std_single_curve_and_errors(common):
    x, y = np.array([0.0, 1.0]), np.array([5.0, 6.0])
    grid, mean, std = common.mean_std_on_grid([(x, y)])
    np.testing.assert_array_equal(grid, x)
    np.testing.assert_array_equal(mean, y)
    np.testing.assert_array_equal(std, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        common.mean_std_on_grid([])
    with pytest.raises(ValueError, match="overlap"):
        common.mean_std_on_grid([(np.array([0.0, 1.0]), y), (np.array([2.0, 3.0]), y)])
    with pytest.raises(ValueError, match="grid"):
        common.mean_std_on_grid([(x, y)], np.array([7.0]))


def test_mean_std_helper(common):
    assert common.mean_std([1.0, 3.0]) == (2.0, 1.0)


# --- reading run folders ------------------------------------------------------------------------------


def test_read_curve_from_records_and_folder(common, tmp_path: Path):
    records = [{"iteration": i, "epoch": i / 2, "time": 0.1 * i, "val_loss": 1.0 / (i + 1)} for i in (2, 0, 1)]
    records.append({"iteration": 3, "epoch": 1.5, "time": 0.3, "val_loss": None})
    xs, ys = common.read_curve(records, "epoch", "val_loss")
    np.testing.assert_array_equal(xs, [0.0, 0.5, 1.0])  # sorted, record without a value skipped
    np.testing.assert_allclose(ys, [1.0, 0.5, 1 / 3])
    run = tmp_path / "run"
    run.mkdir()
    MetricsLog(run / "metrics.jsonl", records)
    for source in (run, run / "metrics.jsonl", str(run)):
        xs2, ys2 = common.read_curve(source, "epoch", "val_loss")
        np.testing.assert_array_equal(xs2, xs)
        np.testing.assert_array_equal(ys2, ys)
    with pytest.raises(ValueError, match="test_loss"):
        common.read_curve(records, "epoch", "test_loss")


# --- CSV / JSON writing ----------------------------------------------------------------------------------


def test_curve_rows_and_csv_round_trip(common, tmp_path: Path):
    b1 = common.band("A", [(np.array([0.0, 1.0]), np.array([1.0, 0.5])), (np.array([0.0, 1.0]), np.array([3.0, 0.5]))])
    b2 = common.Band("B", np.array([0.0]), np.array([0.25]), np.array([0.0]), 1)
    rows = common.curve_rows([b1, b2], dataset="a8a", axis="epoch")
    assert [r["label"] for r in rows] == ["A", "A", "B"]
    assert rows[0] == {"dataset": "a8a", "axis": "epoch", "label": "A", "x": 0.0, "mean": 2.0, "std": 1.0,
                       "n_seeds": 2}
    path = common.write_csv(tmp_path / "sub" / "curves.csv", rows)
    assert path.is_file()
    back = common.read_csv(path)
    assert list(back[0]) == ["dataset", "axis", "label", "x", "mean", "std", "n_seeds"]
    assert back[1] == {"dataset": "a8a", "axis": "epoch", "label": "A", "x": "1", "mean": "0.5", "std": "0",
                       "n_seeds": "2"}
    assert [p.name for p in path.parent.iterdir()] == ["curves.csv"]  # no temporary file left behind


def test_write_csv_columns_union_and_float_format(common, tmp_path: Path):
    rows = [{"a": 1, "b": 1 / 3}, {"a": 2, "c": np.float64(2e-7)}]
    path = common.write_csv(tmp_path / "t.csv", rows)
    lines = path.read_text().splitlines()
    assert lines == ["a,b,c", "1,0.333333,", "2,,2e-07"]
    common.write_csv(path, rows[:1], columns=["b", "a"])  # overwrite, explicit column order
    assert path.read_text().splitlines() == ["b,a", "0.333333,1"]
    with pytest.raises(ValueError):
        common.write_csv(tmp_path / "bad.csv", rows, columns=["a"])  # an unexpected key is an error


def test_write_json(common, tmp_path: Path):
    path = common.write_json(tmp_path / "x.json", {"a": [1, 2], "p": Path("z")})
    assert json.loads(path.read_text()) == {"a": [1, 2], "p": "z"}


def test_mbbo_command_quotes(common):
    assert common.mbbo_command(["run", "--out", "a b", "--set", "x=1"]) == "mbbo run --out 'a b' --set x=1"


# --- plots -------------------------------------------------------------------------------------------------


def test_plots_write_png(common, tmp_path: Path):
    b = common.band("A", [(np.array([0.0, 1.0]), np.array([1.0, 0.5])), (np.array([0.0, 1.0]), np.array([2.0, 1.0]))])
    curves = common.plot_bands([("epoch", [b]), ("time", [b])], tmp_path / "c.png", ylabel="loss", title="t")
    bars = common.bar_chart(["0", "0.1"], {"m": ([0.8, 0.7], [0.01, 0.02])}, tmp_path / "b.png", ylabel="acc",
                            xlabel="p", ylim=(0.5, None), reference=("majority", 0.76))
    for path in (curves, bars):
        assert path.read_bytes()[:8] == PNG_MAGIC


# --- the logistic-regression baseline --------------------------------------------------------------------


def separable_data(seed: int = 0, n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian clouds with a bias column; labels +-1."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
    centre = torch.tensor([2.0, 1.0], dtype=torch.float64)
    features = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 0.3 + y[:, None] * centre
    return torch.cat([torch.ones(n, 1, dtype=torch.float64), features], dim=1), y


def test_gradient_step_matches_autograd(common):
    X, y = separable_data()
    lam, lr = 0.1, 0.5
    w1 = common.train_logistic_regression(X, y, lr, 1, lam)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    loss = common.logistic_loss(w, X, y) + 0.5 * lam * (w * w).sum()
    (grad,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(w1, -lr * grad)
    assert torch.equal(common.train_logistic_regression(X, y, lr, 0), torch.zeros(3, dtype=torch.float64))


def test_logistic_regression_separates_tiny_data(common):
    X, y = separable_data()
    w = common.train_logistic_regression(X, y, 1.0, 200)
    assert common.accuracy(w, X, y) == 1.0
    assert float(common.logistic_loss(w, X, y)) < 0.05
    assert common.accuracy(torch.zeros(3, dtype=torch.float64), X, y) == 0.0  # zero margins count as errors
    with pytest.raises(ValueError):
        common.train_logistic_regression(X, y, 0.0, 10)


def test_tuning_picks_lowest_validation_loss_and_skips_divergence(common):
    X, y = separable_data(0)
    Xv, yv = separable_data(1, 40)
    tuned = common.tune_logistic_regression(X, y, Xv, yv, [math.inf, 1e-4, 1.0], 100)
    assert tuned.lr == 1.0
    assert tuned.scores[math.inf] == math.inf
    assert tuned.scores[1e-4] > tuned.scores[1.0] == tuned.val_loss
    assert common.accuracy(tuned.w, Xv, yv) == 1.0
    with pytest.raises(ValueError, match="diverged"):
        common.tune_logistic_regression(X, y, Xv, yv, [math.inf], 5)
    with pytest.raises(ValueError, match="at least one"):
        common.tune_logistic_regression(X, y, Xv, yv, [], 5)


def test_zoom_limits_cut_off_the_start(common):
    x = np.array([0.0, 1.0, 2.0, 3.0])
    a = common.Band("a", x, np.array([10.0, 2.0, 1.5, 1.0]), np.array([0.0, 0.1, 0.1, 0.0]), 2)
    b = common.Band("b", x, np.array([9.0, 3.0, 1.2, 1.1]), np.zeros(4), 1)
    low, high = common.zoom_limits([a, b], after=1.0, margin=0.0)
    assert (low, high) == (1.0, 3.0)
    low2, high2 = common.zoom_limits([a, b], after=1.0)
    assert low2 < 1.0 and high2 > 3.0


def test_completed_needs_marker_with_same_arguments(common, tmp_path: Path):
    out = tmp_path / "run"
    args = ["--task", "quadratic", "--iterations", "3"]
    assert not common.completed(args, out)
    out.mkdir()
    MetricsLog(out / "metrics.jsonl", [{"iteration": 0}])
    argv = ["run", *args, "--out", str(out), "--no-progress", "--overwrite"]
    common.write_json(out / common.DONE_FILE, {"argv": argv, "keep_checkpoint": False})
    assert common.completed(args, out)
    assert not common.completed([*args[:-1], "4"], out)
    assert not common.completed(args, out, keep_checkpoint=True)
    assert common.run_mbbo(args, out) == [{"iteration": 0}]  # reused, not run again
