"""The runner, driven by small fake algorithms: records, timing, checkpoints, resume and the NaN guard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mbbo import runner as runner_module
from mbbo.checkpoint import CheckpointNotFoundError, load_checkpoint
from mbbo.metrics_log import read_metrics
from mbbo.protocols import SteppableAlgorithm
from mbbo.runner import DivergenceError, RunConfig, _postfix, run, state_is_finite

DIM = 4
A = torch.diag(torch.arange(1.0, DIM + 1, dtype=torch.float64))
B = torch.ones(DIM, dtype=torch.float64)


class NoisyQuadratic:
    """Noisy gradient descent on 0.5 x'Ax - b'x; its random stream lives in its state_dict."""

    def __init__(self, seed: int = 0, lr: float = 0.2, diverge_at: int | None = None) -> None:
        self.x = torch.zeros(DIM, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.lr = lr
        self.iteration = 0
        self.counts = {"grad": 0, "hvp": 0}
        self.diverge_at = diverge_at

    def step(self) -> None:
        noise = torch.randn(DIM, generator=self.generator, dtype=torch.float64)
        self.x = self.x - self.lr * (A @ self.x - B + 0.3 * noise)
        self.iteration += 1
        self.counts["grad"] += 1
        self.counts["hvp"] += 2
        if self.iteration == self.diverge_at:
            self.x = self.x * math.inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self.x.clone(),
            "iteration": self.iteration,
            "generator": self.generator.get_state(),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x = state["x"].clone()
        self.iteration = state["iteration"]
        self.generator.set_state(state["generator"])
        self.counts = dict(state["counts"])

    def oracle_counts(self) -> dict[str, int]:
        return dict(self.counts)


class CheckedQuadratic(NoisyQuadratic):
    """The same, with the cheap per-step finite check the runner asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finite_calls = 0

    def is_finite(self) -> bool:
        self.finite_calls += 1
        return bool(torch.isfinite(self.x).all())


class CrashingQuadratic(NoisyQuadratic):
    """Raises inside step() at a given iteration, like a killed process."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at

    def step(self) -> None:
        if self.iteration + 1 == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        super().step()


def loss_of(x: torch.Tensor) -> float:
    return float(0.5 * x @ A @ x - B @ x)


class QuadraticTask:
    """Evaluates the loss; `eval_sleep` simulates a slow evaluation."""

    def __init__(self, per_epoch: int = 4, eval_sleep: float = 0.0) -> None:
        self.per_epoch = per_epoch
        self.eval_sleep = eval_sleep

    def iterations_per_epoch(self) -> int:
        return self.per_epoch

    def evaluate(self, algorithm: Any) -> dict[str, Any]:
        time.sleep(self.eval_sleep)
        return {
            "loss": loss_of(algorithm.x),
            "x0": algorithm.x[0].clone(),  # a tensor: the runner must turn it into a float
            "grad_enabled": float(torch.is_grad_enabled()),
        }


def _config(out: Path, **kwargs: Any) -> RunConfig:
    return RunConfig(out_dir=out, progress=False, **kwargs)


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _assert_same_state(left: dict[str, Any], right: dict[str, Any]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], torch.Tensor):
            assert torch.equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key


def test_fake_algorithm_satisfies_protocol() -> None:
    assert isinstance(NoisyQuadratic(), SteppableAlgorithm)


def test_records_format_and_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    algorithm = NoisyQuadratic()
    records = run(algorithm, QuadraticTask(), _config(out, iterations=10, eval_every=4),
                  extra_config={"algorithm": "fake", "lr": 0.2, "path": tmp_path})
    assert [r["iteration"] for r in records] == [0, 4, 8, 10]
    assert [r["epoch"] for r in records] == [0.0, 1.0, 2.0, 2.5]
    assert [r["oracle_calls"] for r in records] == [{"grad": i, "hvp": 2 * i} for i in (0, 4, 8, 10)]
    assert all(r["grad_enabled"] == 0.0 for r in records)
    times = [r["time"] for r in records]
    assert times[0] == 0.0 and times == sorted(times)
    reference = NoisyQuadratic()
    for record in records:
        while reference.iteration < record["iteration"]:
            reference.step()
        assert record["loss"] == loss_of(reference.x)
        assert record["x0"] == float(reference.x[0])
        assert set(record) == {"iteration", "epoch", "time", "compile_time", "oracle_calls", "loss", "x0",
                               "grad_enabled"}
    assert read_metrics(out / "metrics.jsonl") == records
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == "fake" and config["path"] == str(tmp_path)
    assert config["runner"] == {
        "out_dir": str(out), "iterations": 10, "epochs": None, "eval_every": 4, "checkpoint_every": None,
        "checkpoint_seconds": 300.0, "divergence_factor": 1e8, "progress": False, "overwrite": False,
        "compile_auto": False,
    }
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["runner"]["iteration"] == 10
    assert saved["config"] == config
    _assert_same_state(saved["algorithm"], algorithm.state_dict())


def test_epochs_budget(tmp_path: Path) -> None:
    records = run(NoisyQuadratic(), QuadraticTask(per_epoch=4), _config(tmp_path, epochs=2.5, eval_every=3))
    assert [r["iteration"] for r in records] == [0, 3, 6, 9, 10]
    assert records[-1]["epoch"] == 2.5
    assert RunConfig(out_dir=tmp_path, epochs=0.1).total_iterations(30) == 3
    assert RunConfig(out_dir=tmp_path, epochs=0.5).total_iterations(3) == 2
    assert RunConfig(out_dir=tmp_path, epochs=0.01).total_iterations(3) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of iterations and epochs"),
        ({"iterations": 5, "epochs": 1.0}, "exactly one of iterations and epochs"),
        ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        ({"iterations": 2.5}, "iterations must be an integer"),
        ({"epochs": -1.0}, "epochs must be a positive number, got -1.0"),
        ({"iterations": 5, "eval_every": 0}, "eval_every must be an integer >= 1"),
        ({"iterations": 5, "checkpoint_every": -2}, "checkpoint_every must be an integer >= 1, got -2"),
    ],
)
def test_run_config_validation(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(out_dir=tmp_path, **kwargs)


def test_timing_excludes_evaluation(tmp_path: Path) -> None:
    class Sleepy(NoisyQuadratic):
        def step(self) -> None:
            time.sleep(0.01)
            super().step()

    records = run(Sleepy(), QuadraticTask(eval_sleep=0.05), _config(tmp_path, iterations=5, eval_every=1))
    assert len(records) == 6
    assert 0.05 <= records[-1]["time"] < 0.05 + 0.2  # six 0.05 s evaluations would add 0.3 s


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    extra = {"algorithm": "fake", "seed": 0}
    straight = NoisyQuadratic()
    expected = run(
        straight,
        QuadraticTask(),
        _config(tmp_path / "a", iterations=10, eval_every=4, checkpoint_every=6),
        extra_config=extra,
    )

    first = NoisyQuadratic()
    run(first, QuadraticTask(), _config(tmp_path / "b", iterations=6, eval_every=4, checkpoint_every=6),
        extra_config=extra)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["runner"]["iteration"] == 6
    resumed = NoisyQuadratic(seed=123)  # a fresh object: everything must come from the checkpoint
    records = run(resumed, QuadraticTask(),
                  _config(tmp_path / "b", iterations=10, eval_every=4, checkpoint_every=6),
                  resume=True, extra_config=extra)

    _assert_same_state(resumed.state_dict(), straight.state_dict())
    assert _without_time(records) == _without_time(expected)
    assert _without_time(read_metrics(tmp_path / "b" / "metrics.jsonl")) == _without_time(expected)
    assert [r["iteration"] for r in records] == [0, 4, 8, 10]
    assert records[2]["time"] >= records[1]["time"]  # time continues from the saved value
    _assert_same_state(load_checkpoint(tmp_path / "b" / "checkpoint.pt")["algorithm"], straight.state_dict())


def test_resume_after_crash_drops_records_past_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path / "crash", iterations=10, eval_every=4, checkpoint_every=6)
    with pytest.raises(KeyboardInterrupt):
        run(CrashingQuadratic(crash_at=10), QuadraticTask(), config)
    assert [r["iteration"] for r in read_metrics(tmp_path / "crash" / "metrics.jsonl")] == [0, 4, 8]

    resumed = NoisyQuadratic()
    records = run(resumed, QuadraticTask(), config, resume=True)
    straight = NoisyQuadratic()
    expected = run(straight, QuadraticTask(),
                   _config(tmp_path / "straight", iterations=10, eval_every=4, checkpoint_every=6))
    _assert_same_state(resumed.state_dict(), straight.state_dict())
    assert _without_time(records) == _without_time(expected)


def test_resume_when_already_finished_does_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, iterations=5, eval_every=2)
    first = NoisyQuadratic()
    expected = run(first, QuadraticTask(), config)
    again = NoisyQuadratic()
    records = run(again, QuadraticTask(), config, resume=True)
    assert records == expected
    _assert_same_state(again.state_dict(), first.state_dict())


def test_resume_errors_and_warning(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="cannot resume: no checkpoint at"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path / "empty", iterations=3), resume=True)
    config = _config(tmp_path / "run", iterations=6)
    run(NoisyQuadratic(), QuadraticTask(), config, extra_config={"lr": 0.2})
    with pytest.raises(ValueError, match="at iteration 6, past the requested 4 iterations"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path / "run", iterations=4), resume=True)
    before = (tmp_path / "run" / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"the configuration differs from the run's \(lr: 0.2 in the checkpoint, "
                                         r"0.5 now\)"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path / "run", iterations=7), resume=True,
            extra_config={"lr": 0.5})
    assert (tmp_path / "run" / "config.json").read_bytes() == before  # refused before anything was written


def test_fresh_run_refuses_to_clobber(tmp_path: Path) -> None:
    run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=8))
    with pytest.raises(FileExistsError, match="resume=True"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=3))
    records = run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=3, overwrite=True))
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["runner"]["iteration"] == 3


def test_divergence_with_is_finite_stops_at_the_bad_iteration(tmp_path: Path) -> None:
    algorithm = CheckedQuadratic(diverge_at=7)
    config = _config(tmp_path, iterations=20, eval_every=2, checkpoint_every=3)
    with pytest.raises(DivergenceError, match="iteration 7") as info:
        run(algorithm, QuadraticTask(), config)
    assert "metrics up to iteration 6" in str(info.value)
    assert "last good checkpoint (iteration 6)" in str(info.value)
    assert info.value.iteration == 7
    assert algorithm.finite_calls == 1 + 7  # the initial state, then after every step
    assert [r["iteration"] for r in info.value.records] == [0, 2, 4, 6]
    assert read_metrics(tmp_path / "metrics.jsonl") == info.value.records
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["runner"]["iteration"] == 6
    reference = NoisyQuadratic()
    for _ in range(6):
        reference.step()
    _assert_same_state(saved["algorithm"], reference.state_dict())


def test_divergence_without_is_finite_detected_at_evaluation(tmp_path: Path) -> None:
    config = _config(tmp_path, iterations=20, eval_every=4, checkpoint_every=3)
    with pytest.raises(DivergenceError) as info:
        run(NoisyQuadratic(diverge_at=7), QuadraticTask(), config)
    assert info.value.iteration == 8
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 4]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["runner"]["iteration"] == 6


def test_divergence_never_overwrites_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, iterations=20, eval_every=100, checkpoint_every=3)
    with pytest.raises(DivergenceError) as info:
        run(NoisyQuadratic(diverge_at=5), QuadraticTask(), config)
    assert info.value.iteration == 6  # found at the checkpoint, before saving
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["runner"]["iteration"] == 3
    assert state_is_finite(saved["algorithm"])


def test_divergence_of_initial_state(tmp_path: Path) -> None:
    algorithm = NoisyQuadratic()
    algorithm.x[0] = math.nan
    with pytest.raises(DivergenceError, match=r"iteration 0.*no metrics.*no checkpoint written"):
        run(algorithm, QuadraticTask(), _config(tmp_path, iterations=3))


def test_state_is_finite() -> None:
    good = {"x": torch.ones(2), "n": torch.tensor([1, 2]), "nested": [{"y": (torch.zeros(1), 1.5)}], "s": "a"}
    assert state_is_finite(good)
    assert not state_is_finite({"nested": [{"y": (torch.tensor([1.0, math.nan]),)}]})
    assert not state_is_finite({"lr": math.inf})
    assert not state_is_finite({"z": torch.tensor([complex(math.inf, 0)])})


def test_bad_task_outputs(tmp_path: Path) -> None:
    class Clashing(QuadraticTask):
        def evaluate(self, algorithm: Any) -> dict[str, Any]:
            return {"time": 1.0}

    class NotADict(QuadraticTask):
        def evaluate(self, algorithm: Any) -> Any:
            return 3.0

    with pytest.raises(ValueError, match=r"reserved key\(s\) \['time'\]"):
        run(NoisyQuadratic(), Clashing(), _config(tmp_path / "a", iterations=2))
    with pytest.raises(TypeError, match="must return a dict, got float"):
        run(NoisyQuadratic(), NotADict(), _config(tmp_path / "b", iterations=2))
    with pytest.raises(ValueError, match="must not contain the key 'runner'"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=2), extra_config={"runner": 0})


def test_progress_bar_shows_last_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Any] = []

    class FakeBar:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self.updates = 0
            self.postfixes: list[dict[str, str]] = []
            self.closed = False
            bars.append(self)

        def update(self, n: int) -> None:
            self.updates += n

        def set_postfix(self, values: dict[str, str], refresh: bool = True) -> None:
            self.postfixes.append(values)

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(runner_module, "tqdm", FakeBar)
    config = RunConfig(out_dir=tmp_path, iterations=5, eval_every=2, progress=True)
    records = run(NoisyQuadratic(), QuadraticTask(), config)
    (bar,) = bars
    assert bar.kwargs["total"] == 5 and bar.kwargs["initial"] == 0 and bar.kwargs["disable"] is None
    assert bar.updates == 5 and bar.closed
    assert bar.postfixes[-1] == _postfix(records[-1])
    assert bar.postfixes[-1]["loss"] == f"{records[-1]['loss']:.4g}"
    assert bar.postfixes[-1]["epoch"] == "1.25"


def test_postfix_formats_scalars_only() -> None:
    record = {"iteration": 3, "epoch": 0.75, "time": 1.0, "oracle_calls": {"grad": 3}, "loss": 0.123456,
              "name": "a", "flag": True, "vec": [1, 2]}
    assert _postfix(record) == {"epoch": "0.75", "loss": "0.1235", "name": "a"}


# --- periodic checkpoints, signals, the growth guard, the lock, write errors, resume checks --------------


class Exploding(NoisyQuadratic):
    """Finite but exploding: x is multiplied by 1e3 at every step from `explode_at` on (no NaN ever)."""

    def __init__(self, explode_at: int) -> None:
        super().__init__()
        self.explode_at = explode_at

    def step(self) -> None:
        super().step()
        if self.iteration >= self.explode_at:
            self.x = self.x * 1e3 + 1.0


class Signalling(NoisyQuadratic):
    """Sends itself a signal in the middle of a given step, as `kill -TERM <pid>` would."""

    def __init__(self, at: int, signum: int) -> None:
        super().__init__()
        self.at, self.signum = at, signum

    def step(self) -> None:
        if self.iteration + 1 == self.at:
            import signal as signal_module

            signal_module.raise_signal(self.signum)
        super().step()


def test_default_checkpoints_follow_evaluations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without checkpoint_every, a crash loses at most the steps since the last evaluation (here with a budget
    that any write within an evaluation's 0.05 s meets; the 2 % rule itself is tested below)."""
    monkeypatch.setattr(runner_module, "CHECKPOINT_BUDGET", 1.0)
    config = _config(tmp_path, iterations=10, eval_every=4)
    with pytest.raises(KeyboardInterrupt):
        run(CrashingQuadratic(crash_at=10), QuadraticTask(eval_sleep=0.05), config)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["runner"]["iteration"] == 8


def test_default_checkpoints_keep_within_the_time_budget(tmp_path: Path) -> None:
    state = runner_module._Run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=1000), {}, 1000, 4)
    state.checkpoint_cost = 1.0  # a write that took 1 s is repeated only after 50 s (2 %)
    state.last_checkpoint_wall = time.perf_counter() - 40
    assert not state.checkpoint_due(4, evaluated=True)
    state.last_checkpoint_wall = time.perf_counter() - 60
    assert state.checkpoint_due(8, evaluated=True)
    assert not state.checkpoint_due(9, evaluated=False)  # not an evaluation, and < checkpoint_seconds
    state.last_checkpoint_wall = time.perf_counter() - 400
    assert state.checkpoint_due(9, evaluated=False)  # past checkpoint_seconds (300 s)
    assert state.checkpoint_due(1000, evaluated=False)  # the end


@pytest.mark.parametrize("signum_name", ["SIGTERM", "SIGINT"])
def test_signal_checkpoints_the_step_and_resume_is_identical(tmp_path: Path, signum_name: str) -> None:
    import signal

    signum = getattr(signal, signum_name)
    config = _config(tmp_path / "a", iterations=12, eval_every=4, checkpoint_every=100)
    with pytest.raises(runner_module.RunInterrupted) as info:
        run(Signalling(at=6, signum=signum), QuadraticTask(), config)
    assert info.value.exit_code == 128 + signum and info.value.iteration == 6
    assert f"stopped by {signum_name} after iteration 6" in info.value.message
    assert "mbbo run --out" in info.value.message and "--resume" in info.value.message
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["runner"]["iteration"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = NoisyQuadratic()
    records = run(resumed, QuadraticTask(), config, resume=True)
    straight = NoisyQuadratic()
    expected = run(straight, QuadraticTask(), _config(tmp_path / "b", iterations=12, eval_every=4))
    _assert_same_state(resumed.state_dict(), straight.state_dict())
    assert _without_time(records) == _without_time(expected)


def test_exploding_iterate_is_caught_keeping_the_last_good_checkpoint(tmp_path: Path) -> None:
    class Quiet(QuadraticTask):
        def evaluate(self, algorithm: Any) -> dict[str, Any]:
            return {"ok": 1.0}

    config = _config(tmp_path, iterations=40, eval_every=2, checkpoint_every=2)
    with pytest.raises(DivergenceError) as info:
        run(Exploding(explode_at=5), Quiet(), config)
    message = str(info.value)
    assert message.startswith("the run diverged at iteration 8: the norm of the iterate x reached")
    assert "divergence_factor=1e+08" in message and "step size" in message
    assert "last good checkpoint (iteration 6)" in message
    assert load_checkpoint(tmp_path / "checkpoint.pt")["runner"]["iteration"] == 6
    # with the guard off, the same run goes on (finite, but absurd)
    records = run(Exploding(explode_at=5), Quiet(),
                  RunConfig(out_dir=tmp_path / "off", iterations=12, eval_every=4, divergence_factor=None,
                            progress=False))
    assert records[-1]["iteration"] == 12


def test_exploding_metric_is_caught(tmp_path: Path) -> None:
    class Loud(QuadraticTask):
        def evaluate(self, algorithm: Any) -> dict[str, Any]:
            return {"loss": 10.0 ** (3 * algorithm.iteration)}

    with pytest.raises(DivergenceError, match=r"iteration 3: metric 'loss' reached 1e\+09"):
        run(NoisyQuadratic(), Loud(), RunConfig(out_dir=tmp_path, iterations=6, eval_every=1, progress=False))
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]

    class Counting(QuadraticTask):  # a counter that grows without bound is not a divergence
        def evaluate(self, algorithm: Any) -> dict[str, Any]:
            return {"comm_bytes": 10.0 ** (3 * algorithm.iteration), "loss": 1.0}

    records = run(NoisyQuadratic(), Counting(), RunConfig(out_dir=tmp_path / "c", iterations=6, eval_every=1,
                                                          progress=False))
    assert records[-1]["comm_bytes"] == 1e18


@pytest.mark.parametrize("bad", [0.5, 1.0, -3.0, math.nan])
def test_divergence_factor_is_validated(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="divergence_factor"):
        RunConfig(out_dir=tmp_path, iterations=1, divergence_factor=bad)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    import os

    with runner_module.run_lock(tmp_path), pytest.raises(runner_module.RunLockedError,
                                                         match=f"is in use by PID {os.getpid()}"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=2, overwrite=True))
    assert not (tmp_path / "metrics.jsonl").exists()
    run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=2))  # released: free again


def test_a_full_disk_names_the_file_and_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = runner_module.save_checkpoint

    def fill_up(path: Path, payload: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        original(path, payload)

    monkeypatch.setattr(runner_module, "save_checkpoint", fill_up)
    with pytest.raises(runner_module.RunWriteError) as info:
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=10, eval_every=2, checkpoint_every=2))
    message = str(info.value)
    assert f"could not write {tmp_path / 'checkpoint.pt'}: No space left on device" in message
    assert "last good checkpoint (iteration 2)" in message
    assert load_checkpoint(tmp_path / "checkpoint.pt")["runner"]["iteration"] == 2


def test_resume_with_a_checkpoint_of_another_structure(tmp_path: Path) -> None:
    from mbbo.checkpoint import CheckpointError, save_checkpoint

    config = _config(tmp_path, iterations=4)
    run(NoisyQuadratic(), QuadraticTask(), config)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    payload["algorithm"] = {"name": "other"}
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"does not fit this algorithm \(KeyError: 'x'\)"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=8), resume=True)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_a_log_that_lost_records(tmp_path: Path) -> None:
    from mbbo.checkpoint import CheckpointError

    run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=8, eval_every=2))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:2]))  # records 0 and 2 of 0, 2, 4, 6, 8
    with pytest.raises(CheckpointError, match=r"ends at iteration 2, but the checkpoint was written after its "
                                              r"record of iteration 8"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=12, eval_every=2), resume=True)


def test_resume_names_every_changed_nested_key(tmp_path: Path) -> None:
    extra = {"task": "t", "settings": {"dataset": "a8a", "num_blocks": 100}, "hyper": {"lr": 0.1}, "threads": 1}
    run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=4), extra_config=extra)
    changed = {**extra, "settings": {"dataset": "w8a", "num_blocks": 100}, "hyper": {"lr": 0.2}}
    with pytest.raises(ValueError, match=r"hyper\.lr: 0\.1 in the checkpoint, 0\.2 now; settings\.dataset: 'a8a' "
                                         r"in the checkpoint, 'w8a' now\)"):
        run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=8), resume=True, extra_config=changed)
    # threads may change on resume
    records = run(NoisyQuadratic(), QuadraticTask(), _config(tmp_path, iterations=8), resume=True,
                  extra_config={**extra, "threads": 2})
    assert records[-1]["iteration"] == 8


def test_fractional_epochs(tmp_path: Path) -> None:
    records = run(NoisyQuadratic(), QuadraticTask(per_epoch=1.4), _config(tmp_path, epochs=2.0, eval_every=1))
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]  # ceil(2 * 1.4) = 3
    assert records[2]["epoch"] == pytest.approx(2 / 1.4)
