"""MovieLens ratings: loaders, the leave-last-out ranking split, and per-user CSR storage.

Formats read by :func:`read_ratings` (all four columns are ``user, item, rating, timestamp``):

=============  ==========================  ========  ==========================================
``fmt``        file                        header    ratings
=============  ==========================  ========  ==========================================
``"ml-100k"``  ``u.data`` (tab-separated)  none      integers 1..5
``"recbole"``  ``ml-100k.inter`` (tab)     1 line    integers 1..5 (same body as ``u.data``)
``"ml-1m"``    ``ratings.dat`` (``::``)    none      integers 1..5
``"ml-20m"``   ``ratings.csv`` (comma)     1 line    half stars 0.5, 1.0, ..., 5.0
=============  ==========================  ========  ==========================================

Users and items are re-indexed to ``0..n-1`` in increasing order of their raw ids; the raw ids are kept
(``Ratings.user_ids[u]`` is the raw id of user ``u``).

The split (:func:`split_leave_last`) is the protocol of the top-K NDCG experiments (SONG/K-SONG, Qiu et al.,
ICML 2022; BSVRB, Hu et al., ICML 2023), as implemented by LibAUC's ``preprocess_movielens`` and the ReChorus
pre-processing the authors used: see ``shared/specs/ndcg.md`` section 2.

Storage choice. Per-user item lists are :class:`UserItemCSR` tensors (``offsets``, sorted ``items``,
``ratings``): memory is O(#ratings), so ML-20M (20M ratings, 138K x 27K users x items) costs ~240 MB instead
of the 15 GB of a dense float table. Evaluation builds dense masks only for a chunk of users at a time.
Entry ``j`` of the training CSR is the *pair id* of (user, item) pair ``j``: per-pair estimator tables
(SONG's ``u_{q,i}``, the warm-up's moving average) are 1-D tensors indexed by it.

MovieLens may not be redistributed (GroupLens terms): the loaders read a user's copy, a copy inside an
installed ``recbole`` wheel (:func:`recbole_ml100k_path`), or a download into the cache directory
(:func:`download_movielens`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

try:  # the project-wide data error, when available: MovieLensError is then also a DataError
    from mbbo.data.errors import DataError as _ErrorBase
except ImportError:  # pragma: no cover - depends on which modules exist yet
    _ErrorBase = ValueError  # type: ignore[misc,assignment]

__all__ = [
    "MOVIELENS_SOURCES",
    "MovieLensError",
    "MovieLensFileNotFoundError",
    "RankingSplit",
    "Ratings",
    "UserItemCSR",
    "download_movielens",
    "gains",
    "load_movielens",
    "read_ratings",
    "recbole_ml100k_path",
    "split_leave_last",
]

Format = Literal["ml-100k", "recbole", "ml-1m", "ml-20m"]


class MovieLensError(_ErrorBase):  # type: ignore[misc,valid-type]
    """A MovieLens file is malformed (the message names the file and the 1-based line) or unusable."""


class MovieLensFileNotFoundError(MovieLensError, FileNotFoundError):
    """The ratings file does not exist (catchable both as ``ValueError`` and ``FileNotFoundError``)."""


def gains(ratings: Tensor) -> Tensor:
    """Graded relevance gain ``G = 2^r - 1`` (Järvelin & Kekäläinen, 2002) of star ratings ``r``."""
    return torch.exp2(ratings) - 1


# ------------------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class _FormatSpec:
    sep: bytes
    header: int  # number of header lines
    half_stars: bool  # ratings in {0.5, 1, ..., 5} instead of {1, ..., 5}
    header_prefix: bytes = b""  # what the header must start with (checked, case-insensitive)


_FORMATS: dict[str, _FormatSpec] = {
    "ml-100k": _FormatSpec(b"\t", 0, False),
    "recbole": _FormatSpec(b"\t", 1, False, b"user_id"),
    "ml-1m": _FormatSpec(b"::", 0, False),
    "ml-20m": _FormatSpec(b",", 1, True, b"userid"),
}

_CHUNK_BYTES = 1 << 23  # 8 MB of text per vectorised parsing chunk


def _infer_format(path: Path) -> Format:
    name = path.name.lower()
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith(".dat"):
        return "ml-1m"
    if name.endswith(".csv"):
        return "ml-20m"
    if name == "u.data" or name.endswith((".data", ".base", ".test")):
        return "ml-100k"
    raise MovieLensError(
        f"{path}: cannot infer the MovieLens format from the file name; pass fmt= one of {sorted(_FORMATS)}"
    )


def _parse_line_slow(path: Path, line_no: int, line: bytes, sep: bytes) -> list[float] | None:
    """Parse one line; ``None`` for a blank line; raise with file and line number otherwise."""
    text = line.strip()
    if not text:
        return None
    fields = text.split(sep)
    shown = text[:80].decode("utf-8", errors="replace")
    if len(fields) != 4:
        raise MovieLensError(
            f"{path}:{line_no}: expected 4 fields (user, item, rating, timestamp) separated by "
            f"{sep.decode()!r}, got {len(fields)}: {shown!r}"
        )
    try:
        return [float(f.strip()) for f in fields]
    except ValueError:
        raise MovieLensError(f"{path}:{line_no}: non-numeric field in {shown!r}") from None


def _parse_chunk(path: Path, chunk: bytes, first_line: int, sep: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse complete lines: returns ``(values (n, 4) float64, line numbers (n,) int64)``.

    Fast path: every line has exactly 3 separators (checked per line with numpy) and splits into 4 numeric
    tokens. Otherwise the chunk is parsed line by line, which skips blank lines and raises at the first bad
    line with its number.
    """
    n_lines = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
    if n_lines == 0 or not chunk:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    buf = np.frombuffer(chunk, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    if not chunk.endswith(b"\n"):
        newlines = np.append(newlines, len(buf))
    cum_sep = np.concatenate([[0], np.cumsum(buf == sep[0])])  # ":" of "::" counts twice
    seps_per_line = np.diff(cum_sep[newlines], prepend=0)
    nonblank = np.diff(newlines, prepend=-1) > 1  # blank lines go to the slow path, which skips them
    ok = bool(np.all(seps_per_line == 3 * len(sep))) and bool(np.all(nonblank))
    if ok:
        tokens = chunk.replace(sep, b" ").split()
        if len(tokens) == 4 * n_lines:
            try:
                values = np.array(tokens).astype(np.float64).reshape(n_lines, 4)
            except ValueError:
                pass
            else:
                return values, np.arange(first_line, first_line + n_lines, dtype=np.int64)
    rows: list[list[float]] = []
    numbers: list[int] = []
    for offset, line in enumerate(chunk.split(b"\n")[:n_lines]):
        parsed = _parse_line_slow(path, first_line + offset, line, sep)
        if parsed is not None:
            rows.append(parsed)
            numbers.append(first_line + offset)
    return np.array(rows, dtype=np.float64).reshape(-1, 4), np.array(numbers, dtype=np.int64)


def _validate(path: Path, values: np.ndarray, lines: np.ndarray, spec: _FormatSpec) -> None:
    """Check ids (positive integers), timestamps (finite) and ratings (1..5, half stars for ML-20M)."""
    if len(values) == 0:
        return
    user, item, rating, stamp = values.T

    def fail(mask: np.ndarray, what: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            u, it, r, t = values[i]
            raise MovieLensError(
                f"{path}:{int(lines[i])}: {what} (user={u:g}, item={it:g}, rating={r:g}, timestamp={t:g})"
            )

    for col, name in ((user, "user id"), (item, "item id")):
        fail(~np.isfinite(col) | (col != np.round(col)) | (col < 0), f"{name} is not a non-negative integer")
    fail(~np.isfinite(stamp), "timestamp is not finite")
    if spec.half_stars:
        twice = 2 * rating
        fail(
            ~np.isfinite(rating) | (twice != np.round(twice)) | (rating < 0.5) | (rating > 5),
            ("rating outside {0.5, 1.0, ..., 5.0}"),
        )
    else:
        fail(
            ~np.isfinite(rating) | (rating != np.round(rating)) | (rating < 1) | (rating > 5),
            ("rating outside {1, 2, 3, 4, 5}"),
        )


def _read_values(path: Path, spec: _FormatSpec) -> tuple[np.ndarray, np.ndarray]:
    parts: list[np.ndarray] = []
    line_parts: list[np.ndarray] = []
    with path.open("rb") as fh:
        line_no = 1
        for _ in range(spec.header):
            header = fh.readline()
            if spec.header_prefix and not header.strip().lower().startswith(spec.header_prefix):
                shown = header[:80].decode("utf-8", errors="replace")
                raise MovieLensError(
                    f"{path}:{line_no}: expected a header starting with {spec.header_prefix.decode()!r}, got {shown!r}"
                )
            line_no += 1
        rest = b""
        while True:
            block = fh.read(_CHUNK_BYTES)
            if not block:
                break
            data = rest + block
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            chunk, rest = data[: cut + 1], data[cut + 1 :]
            values, lines = _parse_chunk(path, chunk, line_no, spec.sep)
            _validate(path, values, lines, spec)
            parts.append(values)
            line_parts.append(lines)
            line_no += chunk.count(b"\n")
        if rest.strip():
            values, lines = _parse_chunk(path, rest, line_no, spec.sep)
            _validate(path, values, lines, spec)
            parts.append(values)
            line_parts.append(lines)
    if not parts or sum(len(p) for p in parts) == 0:
        raise MovieLensError(f"{path}: no ratings found")
    return np.concatenate(parts), np.concatenate(line_parts)


@dataclass(frozen=True)
class Ratings:
    """Raw ratings with users and items re-indexed to ``0..n-1`` (numpy arrays, one entry per rating).

    ``user_ids[u]`` / ``item_ids[i]`` give the raw ids of re-indexed user ``u`` / item ``i``; ``lines`` holds
    the 1-based line number of each rating in ``source``, in file order.
    """

    users: np.ndarray  # int64
    items: np.ndarray  # int64
    ratings: np.ndarray  # float32
    timestamps: np.ndarray  # float64 (integers for MovieLens)
    user_ids: np.ndarray  # int64, raw id of each re-indexed user
    item_ids: np.ndarray  # int64, raw id of each re-indexed item
    source: str = ""
    lines: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_arrays(
        cls,
        users: Sequence[int] | np.ndarray,
        items: Sequence[int] | np.ndarray,
        ratings: Sequence[float] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
        *,
        source: str = "",
        lines: np.ndarray | None = None,
    ) -> Ratings:
        """Build from raw (arbitrary non-negative integer) ids, re-indexing users and items to ``0..n-1``."""
        raw_u = np.asarray(users, dtype=np.int64)
        raw_i = np.asarray(items, dtype=np.int64)
        r = np.asarray(ratings, dtype=np.float32)
        t = np.asarray(timestamps, dtype=np.float64)
        if not (raw_u.ndim == raw_i.ndim == r.ndim == t.ndim == 1 and len(raw_u) == len(raw_i) == len(r) == len(t)):
            raise MovieLensError("users, items, ratings and timestamps must be 1-D arrays of the same length")
        user_ids, u = np.unique(raw_u, return_inverse=True)
        item_ids, i = np.unique(raw_i, return_inverse=True)
        return cls(u.astype(np.int64), i.astype(np.int64), r, t, user_ids, item_ids, source, lines)


def read_ratings(path: str | os.PathLike[str], fmt: Format | None = None) -> Ratings:
    """Read a MovieLens ratings file (``u.data``, ``ml-100k.inter``, ``ratings.dat`` or ``ratings.csv``).

    Args:
        path: the file.
        fmt: ``"ml-100k"``, ``"recbole"``, ``"ml-1m"`` or ``"ml-20m"``; inferred from the file name if omitted
            (``*.inter`` -> recbole, ``*.dat`` -> ml-1m, ``*.csv`` -> ml-20m, ``u.data`` -> ml-100k).

    Raises:
        MovieLensFileNotFoundError: the file does not exist.
        MovieLensError: a line is malformed (wrong field count, non-numeric field, non-integer id, rating
            outside 1..5 or, for ML-20M, outside the half stars 0.5..5); the message is ``file:line: why``.
    """
    p = Path(path)
    if not p.is_file():
        raise MovieLensFileNotFoundError(
            f"{p}: MovieLens ratings file not found (MovieLens cannot be redistributed: point to your own "
            "copy, use recbole_ml100k_path() or download_movielens())"
        )
    fmt = fmt if fmt is not None else _infer_format(p)
    if fmt not in _FORMATS:
        raise MovieLensError(f"fmt={fmt!r} is not one of {sorted(_FORMATS)}")
    values, lines = _read_values(p, _FORMATS[fmt])
    return Ratings.from_arrays(values[:, 0], values[:, 1], values[:, 2], values[:, 3], source=str(p), lines=lines)


# ------------------------------------------------------------------------------------------------------------
# Locating and downloading the data


def recbole_ml100k_path() -> Path | None:
    """Path of ``recbole/dataset_example/ml-100k/ml-100k.inter`` in an installed ``recbole`` package, if any.

    The ``recbole==1.2.1`` wheel ships ML-100K with a header line and a body byte-identical to ``u.data``.
    The package is located without importing it.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "dataset_example" / "ml-100k" / "ml-100k.inter"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class _Source:
    url: str
    member: str  # ratings file inside the zip
    fmt: Format
    member_sha256: str | None  # checksum of the extracted ratings file, when known
    archive_sha256: str | None = None  # checksum of the zip, when known (then mbbo.data.cache.fetch is used)


MOVIELENS_SOURCES: dict[str, _Source] = {
    "ml-100k": _Source(
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "ml-100k/u.data",
        "ml-100k",
        "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    ),
    "ml-1m": _Source("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ml-1m/ratings.dat", "ml-1m", None),
    "ml-20m": _Source(
        "https://files.grouplens.org/datasets/movielens/ml-20m.zip", "ml-20m/ratings.csv", "ml-20m", None
    ),
}


def _cache_dir(cache: str | os.PathLike[str] | None) -> Path:
    if cache is not None:
        return Path(cache)
    try:
        from mbbo.data.cache import cache_dir
    except ImportError:
        env = os.environ.get("MBBO_CACHE")
        return Path(env) if env else Path.home() / ".cache" / "mbbo"
    return Path(cache_dir())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file + rename); errors become MovieLensError."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as err:
        raise MovieLensError(
            f"{dest}: could not download {url} ({err}); download the archive by hand and pass its ratings file as path="
        ) from err
    finally:
        Path(tmp).unlink(missing_ok=True)


def download_movielens(name: str = "ml-100k", cache: str | os.PathLike[str] | None = None) -> Path:
    """Download a MovieLens archive from GroupLens into the cache and return the extracted ratings file.

    The cache directory is ``cache``, else ``mbbo.data.cache.cache_dir()`` (``$MBBO_CACHE`` or
    ``~/.cache/mbbo``); files go to ``<cache>/movielens/``. A present, valid ratings file is reused without
    network access. The archive is downloaded through ``mbbo.data.cache.fetch`` when its SHA-256 is known
    (none is recorded yet: GroupLens publishes MD5s only), else directly. The extracted ratings file is
    checked against its SHA-256 where known (ML-100K's ``u.data``); a mismatch deletes it and raises
    :class:`MovieLensError`.
    """
    if name not in MOVIELENS_SOURCES:
        raise MovieLensError(f"name={name!r} is not one of {sorted(MOVIELENS_SOURCES)}")
    src = MOVIELENS_SOURCES[name]
    root = _cache_dir(cache) / "movielens"
    target = root / src.member
    if target.is_file() and (src.member_sha256 is None or _sha256(target) == src.member_sha256):
        return target
    archive = root / Path(src.url).name
    if src.archive_sha256 is not None:  # checksummed, cached download of the shared data layer
        from mbbo.data.cache import fetch

        archive = fetch(f"movielens/{archive.name}", src.url, src.archive_sha256, root.parent)
    elif not archive.is_file():
        _download(src.url, archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(src.member) as member, target.open("wb") as out:
                shutil.copyfileobj(member, out)
    except (zipfile.BadZipFile, KeyError) as err:
        archive.unlink(missing_ok=True)
        raise MovieLensError(f"{archive}: not a MovieLens archive with {src.member} ({err}); deleted") from err
    if src.member_sha256 is not None and (got := _sha256(target)) != src.member_sha256:
        target.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        raise MovieLensError(f"{target}: sha256 {got} != expected {src.member_sha256}; deleted")
    return target


def load_movielens(
    name: str = "ml-100k",
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache: str | os.PathLike[str] | None = None,
) -> Ratings:
    """Load MovieLens ratings from ``path``; else (ML-100K only) from an installed ``recbole`` wheel; else
    from the cache, downloading it there if ``download=True``.

    ``path`` may be the ratings file or the directory holding it (``u.data``/``ratings.dat``/``ratings.csv``).
    """
    if name not in MOVIELENS_SOURCES:
        raise MovieLensError(f"name={name!r} is not one of {sorted(MOVIELENS_SOURCES)}")
    src = MOVIELENS_SOURCES[name]
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / Path(src.member).name
        return read_ratings(p, src.fmt if p.suffix != ".inter" else "recbole")
    if name == "ml-100k" and (rb := recbole_ml100k_path()) is not None:
        return read_ratings(rb, "recbole")
    cached = _cache_dir(cache) / "movielens" / src.member
    if cached.is_file() or download:
        return read_ratings(download_movielens(name, cache) if download else cached, src.fmt)
    raise MovieLensFileNotFoundError(
        f"{name}: no path given, no recbole wheel and nothing at {cached}; pass path= or download=True"
    )


# ------------------------------------------------------------------------------------------------------------
# CSR storage


@dataclass(frozen=True)
class UserItemCSR:
    """Per-user item lists in compressed sparse row form (items sorted within each user).

    Entries ``offsets[u]:offsets[u+1]`` of ``items``/``ratings`` belong to user ``u``. For the training set,
    the entry index is the (user, item) *pair id*. ``gains`` = ``2^ratings - 1``.
    """

    offsets: Tensor  # (n_users + 1,) int64
    items: Tensor  # (nnz,) int64
    ratings: Tensor  # (nnz,) float
    n_items: int

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError("offsets must be a 1-D tensor starting at 0")
        if int(self.offsets[-1]) != self.items.numel() or self.items.shape != self.ratings.shape:
            raise ValueError("offsets[-1], len(items) and len(ratings) must agree")

    @classmethod
    def from_coo(
        cls,
        users: Tensor | np.ndarray,
        items: Tensor | np.ndarray,
        ratings: Tensor | np.ndarray,
        n_users: int,
        n_items: int,
        *,
        device: torch.device | str | None = None,
    ) -> UserItemCSR:
        """Build from (user, item, rating) triples; (user, item) pairs must be unique."""
        u = torch.as_tensor(np.asarray(users), dtype=torch.int64)
        i = torch.as_tensor(np.asarray(items), dtype=torch.int64)
        r = torch.as_tensor(np.asarray(ratings), dtype=torch.float32)
        if u.numel() and (int(u.min()) < 0 or int(u.max()) >= n_users or int(i.min()) < 0 or int(i.max()) >= n_items):
            raise ValueError("user or item index out of range")
        order = torch.argsort(u * n_items + i)
        u, i, r = u[order], i[order], r[order]
        key = u * n_items + i
        if key.numel() > 1 and bool((key[1:] == key[:-1]).any()):
            raise ValueError("duplicate (user, item) pairs")
        offsets = torch.zeros(n_users + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.bincount(u, minlength=n_users), 0)
        return cls(offsets, i, r, n_items).to(device) if device is not None else cls(offsets, i, r, n_items)

    @property
    def n_users(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.items.numel()

    @property
    def device(self) -> torch.device:
        return self.items.device

    @property
    def gains(self) -> Tensor:
        """``2^r - 1`` per entry."""
        return gains(self.ratings)

    def counts(self) -> Tensor:
        """Number of items of every user, ``(n_users,)`` int64."""
        return self.offsets[1:] - self.offsets[:-1]

    def row_of_entry(self) -> Tensor:
        """User of every entry, ``(nnz,)`` int64."""
        return torch.repeat_interleave(torch.arange(self.n_users, device=self.device), self.counts())

    def row(self, user: int) -> tuple[Tensor, Tensor]:
        """Items and ratings of one user."""
        lo, hi = int(self.offsets[user]), int(self.offsets[user + 1])
        return self.items[lo:hi], self.ratings[lo:hi]

    def to(self, device: torch.device | str | None) -> UserItemCSR:
        return UserItemCSR(self.offsets.to(device), self.items.to(device), self.ratings.to(device), self.n_items)

    def entries(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """Entries of the given users: ``(position in users, entry index)``, both ``(total,)`` int64.

        ``items[entry]`` / ``ratings[entry]`` give the items and ratings; vectorised over ``users``.
        """
        users = users.to(self.device, torch.int64)
        starts = self.offsets[users]
        counts = self.offsets[users + 1] - starts
        pos = torch.repeat_interleave(torch.arange(users.numel(), device=self.device), counts)
        first = torch.cumsum(counts, 0) - counts  # exclusive prefix sum
        entry = starts[pos] + torch.arange(pos.numel(), device=self.device) - first[pos]
        return pos, entry

    def padded(self, users: Tensor, width: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Rows of ``users`` as ``(items, ratings, mask)`` of shape ``(len(users), width)``.

        ``width`` defaults to the longest row; padding has item ``0``, rating ``0`` and ``mask`` False.
        """
        pos, entry = self.entries(users)
        counts = self.offsets[users.to(self.device) + 1] - self.offsets[users.to(self.device)]
        w = int(counts.max()) if width is None and counts.numel() else (width or 0)
        first = torch.cumsum(counts, 0) - counts
        col = torch.arange(pos.numel(), device=self.device) - first[pos]
        keep = col < w
        items = torch.zeros(users.numel(), w, dtype=torch.int64, device=self.device)
        ratings = torch.zeros(users.numel(), w, dtype=self.ratings.dtype, device=self.device)
        mask = torch.zeros(users.numel(), w, dtype=torch.bool, device=self.device)
        items[pos[keep], col[keep]] = self.items[entry[keep]]
        ratings[pos[keep], col[keep]] = self.ratings[entry[keep]]
        mask[pos[keep], col[keep]] = True
        return items, ratings, mask

    def contains(self, users: Tensor, items: Tensor) -> Tensor:
        """Whether ``items[b, ...]`` is in the row of ``users[b]`` (boolean, shape of ``items``).

        Vectorised by binary search on the sorted keys ``user * n_items + item``."""
        keys = self.row_of_entry() * self.n_items + self.items
        users = users.to(self.device, torch.int64)
        query = users.reshape(users.shape + (1,) * (items.ndim - users.ndim)) * self.n_items + items.to(self.device)
        if keys.numel() == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        pos = torch.searchsorted(keys, query.reshape(-1)).clamp_max(keys.numel() - 1)
        return (keys[pos] == query.reshape(-1)).reshape(query.shape)


# ------------------------------------------------------------------------------------------------------------
# The split


@dataclass(frozen=True)
class RankingSplit:
    """Train/dev/test interactions of the leave-last-out protocol, as :class:`UserItemCSR` tensors."""

    train: UserItemCSR
    dev: UserItemCSR
    test: UserItemCSR
    user_ids: np.ndarray  # raw id of each user
    item_ids: np.ndarray  # raw id of each item

    @property
    def n_users(self) -> int:
        return self.train.n_users

    @property
    def n_items(self) -> int:
        return self.train.n_items

    @property
    def device(self) -> torch.device:
        return self.train.device

    def to(self, device: torch.device | str | None) -> RankingSplit:
        return RankingSplit(
            self.train.to(device), self.dev.to(device), self.test.to(device), self.user_ids, self.item_ids
        )

    def summary(self) -> dict[str, int]:
        """Counts: users, items, and ratings per part."""
        return {
            "users": self.n_users,
            "items": self.n_items,
            "train": self.train.nnz,
            "dev": self.dev.nnz,
            "test": self.test.nnz,
        }


def split_leave_last(
    ratings: Ratings,
    n_test: int = 5,
    n_dev: int = 5,
    *,
    keep_first: bool = True,
    device: torch.device | str | None = None,
) -> RankingSplit:
    """Leave-last-out split of the NDCG experiments (ndcg.md section 2; LibAUC ``preprocess_movielens``).

    1. Duplicates: among rows with the same (user, item, timestamp) the first in the file is kept; a
       (user, item) pair rated at several times keeps only its latest rating (MovieLens has no such pairs).
    2. Each user's ratings are ordered by timestamp; equal timestamps keep file order (the reference's stable
       ``sort_values(['time', 'user_id'], kind='mergesort')``).
    3. With ``keep_first``, a user's first rating always stays in train. Of the remaining ``n-1``, the last
       ``min(n_test, n-1)`` go to test and the ``min(n_dev, ...)`` before them to dev; the rest is train.
       So users with few ratings (n <= 1 + n_test + n_dev) get short or empty dev/test lists and 1 training
       item (every user keeps >= 1); evaluation skips users with an empty list.

    All ratings are relevant, with graded gain ``2^r - 1``.
    """
    if n_test < 0 or n_dev < 0:
        raise ValueError(f"n_test={n_test} and n_dev={n_dev} must be >= 0")
    n = len(ratings)
    row = np.arange(n)
    u, i, t = ratings.users, ratings.items, ratings.timestamps
    # (1) duplicates: sort by (u, i, t, -row); the last of each (u, i) group has the latest time and, among
    # equal latest times, the first row of the file.
    order = np.lexsort((-row, t, i, u))
    last = np.ones(n, dtype=bool)
    last[:-1] = (u[order][1:] != u[order][:-1]) | (i[order][1:] != i[order][:-1])
    kept = np.sort(order[last])
    # (2) per-user chronological order with file order as the tie-breaker
    order = kept[np.lexsort((kept, t[kept], u[kept]))]
    uo = u[order]
    counts = np.bincount(uo, minlength=ratings.n_users)
    starts = np.cumsum(counts) - counts
    pos = np.arange(len(order)) - starts[uo]  # position within the user's sequence
    cnt = counts[uo]
    rest = cnt - 1 if keep_first else cnt
    n_te = np.minimum(n_test, np.maximum(rest, 0))
    n_dv = np.minimum(n_dev, np.maximum(rest - n_te, 0))
    is_test = pos >= cnt - n_te
    is_dev = ~is_test & (pos >= cnt - n_te - n_dv)
    is_train = ~is_test & ~is_dev

    def csr(mask: np.ndarray) -> UserItemCSR:
        sel = order[mask]
        return UserItemCSR.from_coo(
            u[sel], i[sel], ratings.ratings[sel], ratings.n_users, ratings.n_items, device=device
        )

    return RankingSplit(csr(is_train), csr(is_dev), csr(is_test), ratings.user_ids, ratings.item_ids)
