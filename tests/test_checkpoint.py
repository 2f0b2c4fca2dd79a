"""Atomic writes and checkpoints: round trips, failures that leave the old file intact, clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from mbbo import checkpoint
from mbbo.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)


def _payload(value: float) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {
        "algorithm": {"x": torch.full((3,), value, dtype=torch.float64), "generator": generator.get_state()},
        "runner": {"iteration": int(value), "elapsed": 0.5},
        "config": {"algorithm": "fake", "lr": 0.1, "sizes": [1, 2]},
    }


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_and_text_replace_content(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    text_target = tmp_path / "note.txt"
    atomic_write_text(text_target, "héllo\n")
    assert text_target.read_text(encoding="utf-8") == "héllo\n"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(checkpoint.os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(target, "new content that must not appear")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    payload = _payload(2.0)
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["algorithm"]["x"], payload["algorithm"]["x"])
    assert torch.equal(loaded["algorithm"]["generator"], payload["algorithm"]["generator"])
    assert loaded["runner"] == {"iteration": 2, "elapsed": 0.5}
    assert loaded["config"] == {"algorithm": "fake", "lr": 0.1, "sizes": [1, 2]}


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()
    real_write = os.fdopen

    def half_write_then_fail(fd: int, mode: str) -> object:
        handle = real_write(fd, mode)

        class Broken:
            def __enter__(self) -> Broken:
                return self

            def __exit__(self, *exc: object) -> None:
                handle.close()

            def write(self, data: bytes) -> None:
                handle.write(data[: len(data) // 2])
                raise OSError("disk full (simulated)")

        return Broken()

    monkeypatch.setattr(checkpoint.os, "fdopen", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _payload(5.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["algorithm"]["x"], torch.full((3,), 1.0, dtype=torch.float64))
    assert _leftovers(tmp_path) == []


def test_unpicklable_payload_fails_before_touching_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda raises a pickling-specific error
        save_checkpoint(path, {"bad": lambda: None})
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(path, [1, 2])  # type: ignore[arg-type]


def test_missing_checkpoint_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that catch that
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a torch file", b"PK\x03\x04truncated"])
def test_corrupt_checkpoint_names_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload(1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_non_dict_checkpoint_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask
