"""The single-block zoo tasks (T3 benchopt_quadratic, T4 cleaning, T5 regularization) through the registry and
the command line: they build, run with several zoo algorithms, report finite metrics, and fail clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mbbo.algorithms.registry import ALGORITHMS, make_algorithm
from mbbo.cli import main
from mbbo.tasks import cleaning_data as cd
from mbbo.tasks import regularization_data as rd
from mbbo.tasks.benchopt_quadratic import make_benchopt_quadratic, quadratic_loss
from mbbo.tasks.registry import TASKS, IncompatibleAlgorithmError, get_task
from mbbo.tasks.zoo_tasks import (
    BenchoptQuadraticSettings,
    CleaningSettings,
    RegularizationSettings,
    build_benchopt_quadratic,
    pack_level,
    packed_quadratic_loss,
    paper_instance,
)

PREFERRED = ("soba", "saba", "srba", "stocbio", "amigo", "mrbo", "f2sa", "aid_bio")
SMALL_QUAD = ["n_inner=256", "n_outer=128", "d_in=8", "d_out=4", "settings.batch_size=16"]


def zoo(k: int = 2) -> list[str]:
    """The first k registered algorithms of PREFERRED (the zoo is written by several hands)."""
    found = [name for name in PREFERRED if name in ALGORITHMS]
    if len(found) < k:
        pytest.skip(f"fewer than {k} zoo algorithms registered: {found}")
    return found[:k]


def run_cli(tmp_path: Path, task: str, algorithm: str, *args: str, sets: list[str] = (), iterations: int = 6
            ) -> list[dict]:
    out = tmp_path / f"{task}-{algorithm}-{len(list(tmp_path.iterdir()))}"
    argv = ["run", "--task", task, "--algorithm", algorithm, "--iterations", str(iterations), "--eval-every", "3",
            "--no-progress", "--out", str(out), *args]
    if sets:
        argv += ["--set", *sets]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_metrics(records: list[dict], keys: tuple[str, ...]) -> None:
    assert len(records) >= 2
    for record in records:
        for key in keys:
            assert key in record, (key, record)
            assert math.isfinite(record[key]), (key, record)


def test_registered_with_metrics() -> None:
    for name in ("benchopt_quadratic", "cleaning", "regularization"):
        spec = get_task(name)
        assert spec is TASKS[name] and spec.metrics
        assert "soba" not in ALGORITHMS or "soba" in spec.compatible_algorithms()
    assert "grad_norm_sq" in get_task("benchopt_quadratic").metrics


# --- T3 -----------------------------------------------------------------------------------------------------


def test_packed_loss_is_quadratic_loss() -> None:
    inst = make_benchopt_quadratic(40, 30, 6, 3, random_state=1)
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    rows = pack_level(inst.inner)[5:17]
    assert torch.allclose(packed_quadratic_loss(x, y, rows), quadratic_loss(x, y, inst.inner_batch(slice(5, 17))))


def test_paper_instance_settings() -> None:
    s = paper_instance()
    assert (s.n_inner, s.n_outer, s.d_in, s.d_out, s.mu, s.L_cross_inner, s.batch_size) == (32768, 1024, 100, 10,
                                                                                           0.1, 0.1, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_benchopt_quadratic_builds_and_metrics_are_exact(dtype: torch.dtype) -> None:
    spec = get_task("benchopt_quadratic")
    settings = spec.make_settings({"n_inner": 256, "n_outer": 128, "d_in": 8, "d_out": 4, "batch_size": 16})
    problem, evaluator = spec.build(settings, dtype=dtype)
    assert problem.x0.dtype == dtype and problem.num_blocks == 1
    assert evaluator.iterations_per_epoch() == 16
    inst = make_benchopt_quadratic(256, 128, 8, 4, random_state=2442)
    x = torch.linspace(-1, 1, 4, dtype=torch.float64)
    metrics = evaluator.task.metrics(x.to(dtype), torch.zeros(8, dtype=dtype))
    assert metrics["grad_norm_sq"] == pytest.approx(float(inst.grad_norm_sq(x)), rel=1e-6 if dtype == torch.float32
                                                    else 1e-12)
    assert metrics["value"] == pytest.approx(float(inst.value(x)), rel=1e-5)
    # the full-batch gradient of the problem's lower loss is the closed form's
    rows = problem.lower_sampler.data["rows"]
    y = torch.randn(8, dtype=dtype, requires_grad=True)
    (gy,) = torch.autograd.grad(problem.lower_loss(x.to(dtype), y, {"rows": rows}, torch.tensor(0)), y)
    expected = inst.inner_means.grad_y(x, y.detach().double())
    assert torch.allclose(gy.double(), expected, atol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_benchopt_quadratic_cli(tmp_path: Path, dtype: str) -> None:
    for algorithm in zoo(2):
        records = run_cli(tmp_path, "benchopt_quadratic", algorithm, "--dtype", dtype, sets=SMALL_QUAD)
        assert_metrics(records, ("grad_norm_sq", "value", "inner_distance"))


def test_benchopt_quadratic_saba_converges() -> None:
    if "saba" not in ALGORITHMS:
        pytest.skip("saba not registered")
    settings = BenchoptQuadraticSettings(n_inner=512, n_outer=256, d_in=20, d_out=5, batch_size=32)
    problem, evaluator = build_benchopt_quadratic(settings)
    algorithm = make_algorithm("saba", problem, seed=0, lr=0.5)
    start = evaluator.evaluate(algorithm)["grad_norm_sq"]
    for _ in range(600):
        algorithm.step()
    assert evaluator.evaluate(algorithm)["grad_norm_sq"] < 1e-5 * start


def test_multi_block_algorithm_with_block_batch_one(tmp_path: Path) -> None:
    if "bsvrb_v2" not in ALGORITHMS:
        pytest.skip("bsvrb_v2 not registered")
    steps = ["lower_lr=0.1", "linsys_lr=0.1", "lr=0.1"]  # its T1 defaults (lower_lr=1) diverge on T3
    records = run_cli(tmp_path, "benchopt_quadratic", "bsvrb_v2", sets=[*SMALL_QUAD, "block_batch=1", *steps])
    assert_metrics(records, ("grad_norm_sq",))


def test_benchopt_quadratic_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--task", "benchopt_quadratic", "--algorithm", zoo(1)[0], "--set", "mu=-1"]) == 2
    assert "mu must be" in capsys.readouterr().err


# --- T4 -----------------------------------------------------------------------------------------------------


def test_cleaning_digits_cli(tmp_path: Path) -> None:
    for algorithm in zoo(2):
        records = run_cli(tmp_path, "cleaning", algorithm, sets=["noise=0.3"])
        assert_metrics(records, ("test_accuracy", "test_error", "val_loss", "weight_clean", "weight_corrupted",
                                 "grad_norm_sq", "value", "lower_error"))
        assert records[-1]["test_error"] == pytest.approx(1 - records[-1]["test_accuracy"])


def test_cleaning_is_sparse_and_exact_metric_matches(tmp_path: Path) -> None:
    spec = get_task("cleaning")
    problem, evaluator = spec.build(spec.make_settings({"noise": 0.2}), dtype=torch.float32)
    data = evaluator.task.data
    assert problem.sparse_x and problem.dim_x == data.n_train and not problem.upper_depends_on_x
    x = torch.linspace(-2, 2, data.n_train, dtype=torch.float64)
    W = torch.zeros(data.n_features, data.n_classes, dtype=torch.float64)
    metrics = evaluator.task.metrics(x, W)
    assert metrics["grad_norm_sq"] == pytest.approx(float(cd.hypergradient(x, data).pow(2).sum()), rel=1e-8)


def test_cleaning_npz_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 2, 3))  # flattened to 6 features
    y = np.array(["a", "b", "c"])[rng.integers(0, 3, size=150)]
    path = tmp_path / "toy.npz"
    np.savez(path, X=X, y=y)
    records = run_cli(tmp_path, "cleaning", zoo(1)[0], "--dataset", str(path), sets=["settings.batch_size=8"])
    assert_metrics(records, ("test_accuracy", "val_loss", "grad_norm_sq"))


def test_cleaning_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    algorithm = zoo(1)[0]
    base = ["run", "--task", "cleaning", "--algorithm", algorithm, "--iterations", "1", "--no-progress"]
    missing = tmp_path / "missing.npz"
    assert main([*base, "--out", str(tmp_path / "a"), "--set", f"data_path={missing}"]) == 2
    assert "not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, features=np.zeros((10, 2)), labels=np.zeros(10))
    assert main([*base, "--out", str(tmp_path / "b"), "--set", f"data_path={wrong}"]) == 2
    err = capsys.readouterr().err
    assert "missing array" in err and "'X'" in err
    assert main([*base, "--out", str(tmp_path / "c"), "--set", "data_path=data.csv"]) == 2
    assert ".npz" in capsys.readouterr().err
    if "fo_itd_bio" in ALGORITHMS:
        assert main([*base, "--out", str(tmp_path / "d"), "--algorithm", "fo_itd_bio"]) == 2
        err = capsys.readouterr().err
        assert "does not fit task 'cleaning'" in err and "does not depend on x" in err
        with pytest.raises(IncompatibleAlgorithmError, match="does not depend on x"):
            get_task("cleaning").check_algorithm("fo_itd_bio")


# --- T5 -----------------------------------------------------------------------------------------------------

T5_KEYS = ("val_loss", "test_loss", "test_accuracy", "grad_norm_sq", "value", "lower_error")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_regularization_embedded_cli(tmp_path: Path, dtype: str) -> None:
    for algorithm in zoo(2):
        records = run_cli(tmp_path, "regularization", algorithm, "--dataset", "breast_cancer", "--dtype", dtype,
                          sets=["settings.batch_size=32"])
        assert_metrics(records, T5_KEYS)


def test_regularization_a8a(tmp_path: Path, shared_data: Path) -> None:
    records = run_cli(tmp_path, "regularization", zoo(1)[0], "--data-dir", str(shared_data / "libsvm"))
    assert_metrics(records, T5_KEYS)
    spec = get_task("regularization")
    problem, evaluator = spec.build(spec.make_settings({"data_dir": str(shared_data / "libsvm")}))
    data = evaluator.task.data
    assert (data.n_train, data.X_val.shape[0], problem.dim_x) == (18156, 4540, 123)
    x = torch.full((123,), -1.0, dtype=torch.float64)
    metrics = evaluator.task.metrics(x, torch.zeros(123, dtype=torch.float64))
    assert metrics["grad_norm_sq"] == pytest.approx(float(rd.hypergradient(x, data).pow(2).sum()), rel=1e-8)


def test_regularization_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--task", "regularization", "--algorithm", zoo(1)[0], "--iterations", "1", "--no-progress"]
    assert main([*base, "--dataset", "nope", "--data-dir", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([*base, "--dataset", "breast_cancer", "--set", "parametrization=log", "--out",
                 str(tmp_path / "b")]) == 2
    assert "parametrization must be" in capsys.readouterr().err


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RegularizationSettings(batch_size=0).validate()
    with pytest.raises(ValueError, match="noise"):
        CleaningSettings(noise=1.5).validate()
    with pytest.raises(ValueError, match="n_inner"):
        BenchoptQuadraticSettings(n_inner=0).validate()
