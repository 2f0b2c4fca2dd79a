"""Crash-safe files: atomic writes and checkpoints.

Every file the runner writes goes through :func:`atomic_write_bytes`: the data is written to a temporary
file in the destination's directory, flushed and fsynced, then moved over the destination with
:func:`os.replace`. A crash or an exception at any point leaves either the old file or the new one, never a
truncated mix of both.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "save_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (corrupt, truncated, not a checkpoint)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint exists at the given path."""


def _fsync_directory(directory: Path) -> None:
    """Persist a rename on POSIX file systems (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read by setting and restoring it: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically.

    The bytes go to a temporary file in the same directory (so the final rename never crosses file
    systems), which is flushed, fsynced and then renamed over `path` with :func:`os.replace`. On any
    failure the temporary file is removed and the previous content of `path`, if any, is untouched. The
    file gets the mode an ordinary `open` would give it (0666 less the umask), not mkstemp's 0600.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Serialise `payload` with :func:`torch.save` and write it atomically to `path`.

    The payload is serialised in memory first, so an object that cannot be pickled raises before the
    file system is touched and the previous checkpoint stays intact.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], *, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (onto the CPU).

    `weights_only=True` (torch's safe loader) accepts tensors, numbers, strings, and dicts, lists and tuples
    of them, which is everything an algorithm's `state_dict()` should hold; pass `False` only for trusted
    files that hold other Python objects.

    Raises:
        CheckpointNotFoundError: no file at `path`.
        CheckpointError: the file is corrupt or not a checkpoint; the message names the path.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointNotFoundError(f"no checkpoint at {source}")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise CheckpointError(
            f"could not read checkpoint {source} (corrupt or not written by mbbo?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(payload).__name__}, expected a dict")
    return payload
