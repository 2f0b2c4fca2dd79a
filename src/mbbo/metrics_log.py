"""The metrics log: `metrics.jsonl`, one JSON object per evaluation.

Creating or resuming a log writes the whole file atomically (:func:`mbbo.checkpoint.atomic_write_bytes`).
Each later record is appended and fsynced on its own, so a run of n records costs O(n) I/O, not O(n^2). A
write that fails (a full disk) is rolled back by truncating to the previous length; a crash in the middle
of a write (kill -9, power loss) can leave at most a partial last line without its newline, which
:func:`read_metrics` drops with a warning, so the file always reads as a complete log of whole records.

On resume, :meth:`MetricsLog.resume` drops the records written after the checkpoint, so that the resumed
log equals the log of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mbbo.checkpoint import atomic_write_bytes

__all__ = ["MetricsLog", "MetricsLogError", "read_metrics"]


class MetricsLogError(ValueError):
    """A metrics log is malformed; the message names the file and the line."""


def _encode(record: Mapping[str, Any]) -> str:
    """One record as one JSON line (no trailing newline); non-finite floats are kept as NaN/Infinity."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a metrics record must be a mapping, got {type(record).__name__}")
    try:
        line = json.dumps(dict(record), allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"metrics record is not JSON-serialisable: {exc}") from exc
    return line


def _parse_lines(path: Path, lines: Iterable[str]) -> list[dict[str, Any]]:
    """Parse JSON lines (blank lines are skipped), naming file and line number on error. A last line
    without its newline that does not parse is the trace of an interrupted append: dropped, with a warning."""
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if not line.endswith("\n"):
                warnings.warn(f"{path}:{number}: dropping a partial last record (an interrupted write)",
                              RuntimeWarning, stacklevel=3)
                break
            raise MetricsLogError(f"{path}:{number}: malformed JSON line ({exc.msg})") from exc
        if not isinstance(value, dict):
            raise MetricsLogError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append(value)
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every record of a `metrics.jsonl` file, in order.

    Raises:
        FileNotFoundError: no file at `path`.
        MetricsLogError: a line is not a JSON object (the message gives `file:line`).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no metrics log at {source}")
    with source.open(encoding="utf-8") as handle:
        return _parse_lines(source, handle)


class MetricsLog:
    """An append-only JSON-lines log: written atomically when opened, then appended and fsynced per record."""

    def __init__(self, path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Start a log at `path` holding `records` and write it (atomically) right away."""
        self.path = Path(path)
        lines = [_encode(record) for record in records]
        self._records: list[dict[str, Any]] = [json.loads(line) for line in lines]
        atomic_write_bytes(self.path, "".join(f"{line}\n" for line in lines).encode("utf-8"))

    @classmethod
    def resume(cls, path: str | os.PathLike[str], *, until: int, include_until: bool = True) -> MetricsLog:
        """Reopen an existing log, keeping only records with `iteration < until`.

        The record at `iteration == until` is kept too when `include_until` is true. Records past the
        checkpoint (written after it, before a crash) are dropped and the file is rewritten atomically.
        """
        records = read_metrics(path)
        kept = []
        for index, record in enumerate(records, start=1):
            iteration = record.get("iteration")
            if not isinstance(iteration, int):
                raise MetricsLogError(f"{path}: record {index} has no integer 'iteration'")
            if iteration < until or (include_until and iteration == until):
                kept.append(record)
        return cls(path, kept)

    @property
    def records(self) -> list[dict[str, Any]]:
        """A copy of the records written so far (as read back from their JSON form)."""
        return [dict(record) for record in self._records]

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record and fsync it; on failure the file is truncated back and the log is unchanged."""
        data = f"{_encode(record)}\n".encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            end = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
        self._records.append(json.loads(data))

    def __len__(self) -> int:
        """Number of records in the log."""
        return len(self._records)
