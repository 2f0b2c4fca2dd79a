"""The JSON-lines metrics log: round trips, resume trimming, atomicity and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mbbo import metrics_log
from mbbo.metrics_log import MetricsLog, MetricsLogError, read_metrics


def _record(iteration: int) -> dict:
    return {
        "iteration": iteration,
        "epoch": iteration / 4,
        "oracle_calls": {"grad": iteration},
        "loss": 1.0 / 3,
    }


def test_append_and_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    assert path.read_text() == ""
    for iteration in (0, 4, 8):
        log.append(_record(iteration))
    expected = [_record(i) for i in (0, 4, 8)]
    assert read_metrics(path) == expected
    assert log.records == expected
    assert len(log) == 3
    assert path.read_text().count("\n") == 3
    assert read_metrics(path)[0]["loss"] == 1.0 / 3  # floats survive exactly


def test_records_is_a_copy(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", [_record(0)])
    log.records[0]["loss"] = 99.0
    assert log.records[0]["loss"] == 1.0 / 3


def test_non_finite_values_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path, [{"iteration": 0, "loss": math.inf, "gap": math.nan}])
    (record,) = read_metrics(path)
    assert record["loss"] == math.inf
    assert math.isnan(record["gap"])


def test_resume_drops_records_past_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path, [_record(i) for i in (0, 4, 6, 8)])
    log = MetricsLog.resume(path, until=6)
    assert [r["iteration"] for r in log.records] == [0, 4, 6]
    assert [r["iteration"] for r in read_metrics(path)] == [0, 4, 6]
    log = MetricsLog.resume(path, until=6, include_until=False)
    assert [r["iteration"] for r in read_metrics(path)] == [0, 4]
    log.append(_record(8))
    assert [r["iteration"] for r in read_metrics(path)] == [0, 4, 8]


def test_resume_requires_iteration(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\n{"loss": 1.0}\n')
    with pytest.raises(MetricsLogError, match="record 2"):
        MetricsLog.resume(path, until=5)


def test_failed_append_leaves_file_and_log_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, [_record(0)])
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError(28, "simulated: no space left on device")

    monkeypatch.setattr(metrics_log.os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        log.append(_record(4))  # written, then not synced: rolled back
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert len(log) == 1
    log.append(_record(8))
    assert [r["iteration"] for r in read_metrics(path)] == [0, 8]


def test_unserialisable_record_is_rejected(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(TypeError, match="JSON"):
        log.append({"iteration": 0, "bad": object()})
    with pytest.raises(TypeError, match="mapping"):
        log.append([1, 2])  # type: ignore[arg-type]
    assert len(log) == 0


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\n\n{"iteration": 4, "loss": \n')
    with pytest.raises(MetricsLogError, match=r"metrics\.jsonl:3: malformed JSON"):
        read_metrics(path)
    path.write_text('{"iteration": 0}\n[1, 2]\n')
    with pytest.raises(MetricsLogError, match=r"metrics\.jsonl:2: expected a JSON object, got list"):
        read_metrics(path)


def test_missing_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")


def test_append_writes_only_the_new_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appends are O(record), not a rewrite of the file (which was quadratic I/O over a run)."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, [_record(i) for i in range(50)])
    written: list[int] = []
    real_write = metrics_log.os.write
    monkeypatch.setattr(metrics_log.os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    log.append(_record(50))
    assert sum(written) == len(json.dumps(_record(50))) + 1
    assert [r["iteration"] for r in read_metrics(path)] == list(range(51))


def test_a_partial_last_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path, [_record(0), _record(4)])
    with path.open("a") as handle:
        handle.write('{"iteration": 8, "lo')  # a kill -9 in the middle of an append
    with pytest.warns(RuntimeWarning, match="partial last record"):
        assert [r["iteration"] for r in read_metrics(path)] == [0, 4]
    with pytest.warns(RuntimeWarning):
        log = MetricsLog.resume(path, until=8)
    log.append(_record(8))
    assert [r["iteration"] for r in read_metrics(path)] == [0, 4, 8]
