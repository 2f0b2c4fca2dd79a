"""Cached, checksummed downloads.

A file is fetched once into the cache directory (`$MBBO_CACHE`, else `~/.cache/mbbo`), verified against a
known sha256 digest and then re-used. Downloads go to a temporary file in the target's own directory and are
renamed into place (`os.replace`) only after the digest matched, so the cache never holds a partial or
corrupt file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from mbbo.data.errors import DataError

__all__ = ["CACHE_ENV_VAR", "cache_dir", "cached_path", "fetch", "lookup", "sha256_file"]

CACHE_ENV_VAR = "MBBO_CACHE"
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache directory: `$MBBO_CACHE` if set and non-empty, else `~/.cache/mbbo` (not created here)."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mbbo"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest (lower case) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(name: str, cache: Path | None = None) -> Path:
    """Where `name` lives in the cache (`cache`, else `cache_dir()`); the file need not exist.

    `name` is a relative POSIX path such as `"a8a"` or `"libsvm/a8a"`; absolute paths, `..`, backslashes
    and empty names are refused with `ValueError`.
    """
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or PurePosixPath(name).is_absolute() or ".." in parts or not parts:
        raise ValueError(f"name must be a relative path inside the cache without '..', got {name!r}")
    return (cache if cache is not None else cache_dir()).joinpath(*parts)


def lookup(name: str, sha256: str, cache: Path | None = None) -> Path | None:
    """The cached file for `name` if it exists and its digest is `sha256`; otherwise None (no download)."""
    expected = _check_digest_arg(sha256)
    target = cached_path(name, cache)
    if target.is_file():
        if sha256_file(target) == expected:
            return target
        _log.warning("cached file %s does not match sha256 %s; downloading it again", target, expected)
    return None


def fetch(
    name: str, url: str, sha256: str, cache: Path | None = None, *, timeout: float = 60.0, hint: str = ""
) -> Path:
    """Return the path of `name` in the cache, downloading it from `url` first if needed.

    A cached file is re-used only if its sha256 equals `sha256`; otherwise the file is downloaded with
    `urllib` to a temporary file beside the target, verified and atomically renamed into place.

    Args:
        name: relative path of the file inside the cache directory.
        url: where to download it from (any scheme `urllib` understands, including `file://`).
        sha256: the expected hex digest.
        cache: the cache directory; `cache_dir()` when None. Created if missing.
        timeout: socket timeout of the download in seconds.
        hint: text appended to error messages (e.g. how to obtain the file by hand).

    Raises:
        DataError: the download failed, or the downloaded bytes do not have the expected digest (the
            message names the file, the expected and the actual digest; the bad download is deleted).
    """
    expected = _check_digest_arg(sha256)
    found = lookup(name, expected, cache)
    if found is not None:
        return found
    target = cached_path(name, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    _log.info("downloading %s to %s", url, target)
    _download_verified(url, target, expected, timeout=timeout, hint=hint)
    return target


def _check_digest_arg(sha256: str) -> str:
    """Validate a sha256 argument and return it in lower case."""
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise ValueError(f"sha256 must be a string of 64 hexadecimal digits, got {sha256!r}")
    return sha256.lower()


def _download_verified(url: str, target: Path, expected: str, *, timeout: float, hint: str) -> None:
    """Download `url` to a temporary file beside `target`, check its digest, then rename it to `target`."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy_url(url, out, timeout=timeout, target=target, hint=hint)
        if actual != expected:
            raise DataError(
                f"checksum mismatch for {target.name} downloaded from {url}: "
                f"expected sha256 {expected}, got {actual}; the download was discarded.{_suffix(hint)}"
            )
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _copy_url(url: str, out: BinaryIO, *, timeout: float, target: Path, hint: str) -> str:
    """Stream `url` into `out` and return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download {target.name} from {url}: {exc}.{_suffix(hint)}") from exc
    return digest.hexdigest()


def _suffix(hint: str) -> str:
    """A hint as the tail of an error message."""
    return f" {hint}" if hint else ""
