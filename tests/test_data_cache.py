"""Tests of the cached, checksummed download (no network: file:// URLs and a patched urlopen)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import pytest

from mbbo.data.cache import CACHE_ENV_VAR, cache_dir, cached_path, fetch, lookup, sha256_file
from mbbo.data.errors import DataError

PAYLOAD = b"-1 1:1 3:1\n+1 2:0.5\n" * 1000
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.fixture
def source(tmp_path: Path) -> tuple[str, str]:
    """A file to 'download': its file:// URL and its sha256."""
    path = tmp_path / "remote" / "data.txt"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path.as_uri(), hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty cache directory (not yet created)."""
    return tmp_path / "cache"


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("urlopen must not be called")


def _leftovers(directory: Path) -> list[str]:
    """Temporary download files left in a directory."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".part")]


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_sha256_file_known_digest(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_file(path) == ABC_SHA256
    assert sha256_file(str(path)) == ABC_SHA256


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV_VAR, "")
    assert cache_dir() == Path.home() / ".cache" / "mbbo"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert cache_dir() == Path.home() / ".cache" / "mbbo"


@pytest.mark.parametrize("name", ["", "/abs/file", "../up", "a/../../b", "a\\b"])
def test_cached_path_rejects_unsafe_names(name: str, cache: Path) -> None:
    with pytest.raises(ValueError, match="name must be a relative path"):
        cached_path(name, cache)


def test_cached_path_nested(cache: Path) -> None:
    assert cached_path("libsvm/a8a", cache) == cache / "libsvm" / "a8a"


def test_fetch_downloads_and_verifies(source: tuple[str, str], cache: Path) -> None:
    url, digest = source
    path = fetch("libsvm/data.txt", url, digest, cache)
    assert path == cache / "libsvm" / "data.txt"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(path.parent) == []


def test_fetch_uses_env_cache(source: tuple[str, str], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, digest = source
    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    path = fetch("data.txt", url, digest.upper())
    assert path == cache / "data.txt"
    assert sha256_file(path) == digest


def test_fetch_reuses_valid_cached_file(
    source: tuple[str, str], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, digest = source
    first = fetch("data.txt", url, digest, cache)
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert fetch("data.txt", url, digest, cache) == first
    assert first.stat().st_mtime_ns == stamp
    assert lookup("data.txt", digest, cache) == first


def test_fetch_bad_checksum(source: tuple[str, str], cache: Path) -> None:
    url, _ = source
    wrong = "0" * 64
    with pytest.raises(DataError) as info:
        fetch("data.txt", url, wrong, cache)
    message = str(info.value)
    assert "data.txt" in message
    assert wrong in message
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
    assert not (cache / "data.txt").exists()
    assert _leftovers(cache) == []


def test_fetch_replaces_corrupt_cached_file(source: tuple[str, str], cache: Path) -> None:
    url, digest = source
    cache.mkdir()
    (cache / "data.txt").write_bytes(b"truncated")
    assert lookup("data.txt", digest, cache) is None
    assert fetch("data.txt", url, digest, cache).read_bytes() == PAYLOAD


def test_fetch_download_failure(tmp_path: Path, cache: Path) -> None:
    url = (tmp_path / "missing.txt").as_uri()
    with pytest.raises(DataError, match=r"could not download data\.txt from .*missing\.txt.*HINT"):
        fetch("data.txt", url, ABC_SHA256, cache, hint="HINT")
    assert _leftovers(cache) == []


def test_lookup_missing_file(cache: Path) -> None:
    assert lookup("nothing", ABC_SHA256, cache) is None


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "0" * 63])
def test_fetch_rejects_malformed_digest(digest: str, source: tuple[str, str], cache: Path) -> None:
    with pytest.raises(ValueError, match="sha256 must be"):
        fetch("data.txt", source[0], digest, cache)
    assert not os.path.exists(cache)
