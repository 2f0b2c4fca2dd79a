"""`mbbo run` in a real subprocess, stopped from outside: kill -9, SIGTERM, two runs in one folder; and
`--resume` from the run's own config.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mbbo.cli import main

QUAD = ["run", "--task", "quadratic", "--algorithm", "bsvrb_v2", "--no-progress", "--set", "num_blocks=4",
        "block_batch=2"]
LONG = [*QUAD, "--iterations", "600", "--eval-every", "30"]
ENDLESS = [*QUAD, "--iterations", "1000000", "--eval-every", "30"]
TIMEOUT = 180  # seconds for any one subprocess: a failure can never hang CI


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mbbo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_records(process: subprocess.Popen[str], out: Path, count: int) -> None:
    """Wait until the run has logged `count` records (it must still be running then)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        log = out / "metrics.jsonl"
        if log.is_file() and log.read_text().count("\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("the run logged too few records in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*LONG, "--out", str(out)]) == 0
    return _records(out)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(how: str, tmp_path: Path,
                                                          uninterrupted: list[dict[str, Any]]) -> None:
    out = tmp_path / "run"
    process = _start([*LONG, "--out", str(out)])
    _wait_for_records(process, out, 3)
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=TIMEOUT)
    if how == "SIGTERM":
        assert process.returncode == 128 + signal.SIGTERM, err
        assert "stopped by SIGTERM after iteration" in err and f"mbbo run --out {out} --resume" in err
    else:
        assert process.returncode == -signal.SIGKILL
    assert (out / "checkpoint.pt").is_file()  # default checkpoints: nothing before it is lost
    stopped_at = len(_records(out))
    assert stopped_at < len(uninterrupted)
    # --resume needs only --out: everything else comes from the run's own config.json
    resumed = subprocess.run([sys.executable, "-m", "mbbo", "run", "--out", str(out), "--resume", "--no-progress"],
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    records = _records(out)
    assert [r["iteration"] for r in records] == [r["iteration"] for r in uninterrupted]  # none lost, none twice
    assert _without_time(records) == _without_time(uninterrupted)


@pytest.mark.slow
def test_two_runs_in_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _start([*ENDLESS, "--out", str(out)])
    _wait_for_records(first, out, 1)
    second = subprocess.run([sys.executable, "-m", "mbbo", *QUAD, "--iterations", "5", "--out", str(out),
                             "--overwrite"], capture_output=True, text=True, timeout=TIMEOUT)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=TIMEOUT)
    assert second.returncode == 2
    assert f"mbbo: error: {out} is in use by PID {first.pid}" in second.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["runner"]["iterations"] == 1000000  # the first run's files were not touched


def test_sigterm_before_the_run_starts_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mbbo.tasks import registry

    def terminated_while_loading(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first
        raise AssertionError("not interrupted")

    monkeypatch.setattr(registry.TaskSpec, "build", terminated_while_loading)
    assert main([*QUAD, "--iterations", "3", "--out", str(tmp_path / "r")]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.strip() == "mbbo: interrupted by SIGTERM before the run started; nothing was written"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ctrl_c_while_loading_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from mbbo.tasks import registry

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.TaskSpec, "build", interrupted)
    assert main([*QUAD, "--iterations", "3", "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err.strip() == (
        "mbbo: interrupted (Ctrl-C) before the run started; nothing was written")


def test_resume_refuses_changes_and_config_json_is_a_config(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a"
    assert main([*QUAD, "--iterations", "6", "--eval-every", "2", "--out", str(out)]) == 0
    config_before = (out / "config.json").read_bytes()
    for change, named in ((["--set", "lr=0.01"], "hyper.lr: 0.001 in the checkpoint, 0.01 now"),
                          (["--seed", "7"], "seed: 0 in the checkpoint, 7 now"),
                          (["--set", "block_batch=1"], "hyper.block_batch: 2 in the checkpoint, 1 now"),
                          (["--dtype", "float32"], "dtype: 'float64' in the checkpoint, 'float32' now")):
        assert main(["run", "--out", str(out), "--resume", "--iterations", "8", *change]) == 2
        assert named in capsys.readouterr().err
        assert (out / "config.json").read_bytes() == config_before  # nothing rewritten
    assert main(["run", "--out", str(out), "--resume", "--iterations", "8", "--no-progress"]) == 0
    assert [r["iteration"] for r in _records(out)] == [0, 2, 4, 6, 8]
    # a run's config.json starts a new run with the same configuration (and budget)
    again = tmp_path / "b"
    assert main(["run", "--config", str(out / "config.json"), "--out", str(again), "--no-progress"]) == 0
    assert _without_time(_records(again)) == _without_time(_records(out))


def test_unwritable_output_folder_fails_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from mbbo import cli
    from mbbo.tasks import registry

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("data loaded before the output folder was checked")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(registry.TaskSpec, "build", never)
    assert main([*QUAD, "--iterations", "2", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mbbo: error: cannot write in the output folder {tmp_path / 'run'}: Read-only file system; choose "
        "another --out")
