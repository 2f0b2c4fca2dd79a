"""Binary classification data sets: LIBSVM files (a8a, w8a, any other) and an embedded default.

* `load_libsvm_file(path, n_features)` reads one LIBSVM (1-based svmlight) file into a dense float64 matrix
  and labels in {-1, +1}, with clear `DataError`s for missing, empty or malformed files.
* `load_binary_dataset(name, ...)` returns a `BinaryDataset` (train and test parts):
  - `"breast_cancer"`: embedded, from scikit-learn (no file, no download);
  - a registered LIBSVM set (`"a8a"`, `"w8a"`): read from `data_dir` when given (checked against the
    registered sha256), else downloaded once into the cache (`$MBBO_CACHE` or `~/.cache/mbbo`) and verified;
  - any other name: read `data_dir/name` and `data_dir/name.t` without a checksum.
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mbbo.data.binary import split_indices
from mbbo.data.cache import cache_dir, fetch, lookup, sha256_file
from mbbo.data.errors import DataError

__all__ = [
    "BREAST_CANCER_SEED",
    "BREAST_CANCER_TEST_FRACTION",
    "LIBSVM_BINARY",
    "LIBSVM_SINGLE",
    "BinaryDataset",
    "LibsvmFile",
    "LibsvmSpec",
    "available_datasets",
    "available_single_datasets",
    "load_binary_dataset",
    "load_breast_cancer_dataset",
    "load_libsvm_file",
    "load_single_libsvm",
]

_LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"
_CACHE_SUBDIR = "libsvm"

#: Seed and test fraction of the embedded breast_cancer train/test split (569 rows -> 455 / 114).
BREAST_CANCER_SEED = 0
BREAST_CANCER_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class LibsvmFile:
    """One downloadable LIBSVM file: its file name, public URL and sha256 digest."""

    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class LibsvmSpec:
    """A registered LIBSVM binary data set: a training file and a test file (`name` and `name.t`)."""

    name: str
    n_features: int
    n_train: int
    n_test: int
    description: str
    train: LibsvmFile
    test: LibsvmFile


def _spec(name: str, n_features: int, rows: tuple[int, int], sha: tuple[str, str], what: str) -> LibsvmSpec:
    """Build a registry entry for the LIBSVM binary data set `name`."""
    files = [LibsvmFile(f, _LIBSVM_URL + f, s) for f, s in zip((name, f"{name}.t"), sha, strict=True)]
    description = (
        f"{what} (LIBSVM {name}): {n_features} features, {rows[0]:,} train / {rows[1]:,} test rows; "
        "downloaded once and cached"
    )
    return LibsvmSpec(name, n_features, rows[0], rows[1], description, files[0], files[1])


#: The registered LIBSVM binary data sets (sha256 as in shared/data/SHA256SUMS).
LIBSVM_BINARY: dict[str, LibsvmSpec] = {
    "a8a": _spec(
        "a8a",
        123,
        (22_696, 9_865),
        (
            "d1eb0658615cd81359c87b53c2cc08706cc8d770c0dae55e8def5ec3e4de1a2d",
            "3e3274de660ce651c459cfa312e5ea7e9e14131e1c6d817b6e729b5d446f1352",
        ),
        "UCI Adult income",
    ),
    "w8a": _spec(
        "w8a",
        300,
        (49_749, 14_951),
        (
            "a9e824dcf6ecfc6426e8bd6697eca787636c4520fb3f350a11e2cdd8707bd5e0",
            "b29a810485bb8cd22285454e6d5ecb2cd4db39f5952cec129172ad1441c39392",
        ),
        "web page classification",
    ),
}


#: Single-file LIBSVM binary sets (no separate test file: tasks split them), with their feature counts. The files
#: are LIBSVM's scaled versions (`diabetes_scale`, `fourclass_scale`); sha256 as in shared/data/SHA256SUMS.
LIBSVM_SINGLE: dict[str, tuple[LibsvmFile, int]] = {
    "diabetes": (LibsvmFile("diabetes", _LIBSVM_URL + "diabetes_scale",
                            "e4c45e3a45cfce99fbc897edb76b0c74fbece588b953f5c3b1297bf28c52d6b0"), 8),
    "fourclass": (LibsvmFile("fourclass", _LIBSVM_URL + "fourclass_scale",
                             "6f5a73e857c0f4af2ca06e81d48c1be91fa566fbafaeaf6eb6c355f29fef4618"), 2),
}
_SINGLE_DESCRIPTIONS = {
    "diabetes": "Pima Indians diabetes (LIBSVM diabetes_scale): 8 features, 768 rows in one file",
    "fourclass": "two-dimensional four-cluster classes (LIBSVM fourclass_scale): 2 features, 862 rows in one file",
}


def load_single_libsvm(name: str, data_dir: str | Path | None = None, cache: Path | None = None,
                       download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(X, y)` of a registered single-file set (`LIBSVM_SINGLE`): read `data_dir/name` (checked against its
    sha256) or the verified cached copy (downloaded once when allowed).

    Raises:
        DataError: unknown name, missing file, checksum mismatch, download failure or refused.
    """
    if name not in LIBSVM_SINGLE:
        raise DataError(f"unknown single-file data set {name!r}; available: {', '.join(LIBSVM_SINGLE)}")
    file, n_features = LIBSVM_SINGLE[name]
    if data_dir is not None:
        path = Path(data_dir) / name
        _check_file_exists(path)
        actual = sha256_file(path)
        if actual != file.sha256:
            raise DataError(f"checksum mismatch for {path}: expected sha256 {file.sha256}, got {actual}. "
                            f"Replace it with the original from {file.url}.")
    else:
        cache_name = f"{_CACHE_SUBDIR}/{file.name}"
        hint = f"You can also download {file.url} by hand, save it as {name} in DIR and pass --data-dir DIR."
        found = fetch(cache_name, file.url, file.sha256, cache, hint=hint) if download else lookup(
            cache_name, file.sha256, cache)
        if found is None:
            raise DataError(f"{name} is not in the cache and download=False. {hint}")
        path = found
    return load_libsvm_file(path, n_features)


@dataclass(frozen=True, eq=False)
class BinaryDataset:
    """A binary classification data set: dense float64 features, labels in {-1, +1}.

    No bias column is included (see `mbbo.data.binary.add_bias_column`).
    """

    name: str
    n_features: int
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        """Check that the four arrays have consistent shapes."""
        for part in ("train", "test"):
            X, y = getattr(self, f"X_{part}"), getattr(self, f"y_{part}")
            if X.ndim != 2 or X.shape[1] != self.n_features or y.shape != (X.shape[0],):
                raise ValueError(
                    f"{self.name} {part}: expected X of shape (n, {self.n_features}) and y of shape (n,), "
                    f"got {X.shape} and {y.shape}"
                )

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test rows."""
        return int(self.X_test.shape[0])


# ---------------------------------------------------------------------------------------------------------
# one LIBSVM file
# ---------------------------------------------------------------------------------------------------------


def load_libsvm_file(path: str | Path, n_features: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Read a LIBSVM binary classification file (1-based indices; gzip/bzip2 files and CR-only line endings
    are also read).

    Parsing is done by `sklearn.datasets.load_svmlight_file(path, n_features=n_features, zero_based=False)`.

    Args:
        path: the file.
        n_features: number of feature columns (a file may use fewer, e.g. a8a.t uses 122 of a8a's 123);
            None infers it from the largest index in the file.

    Returns:
        `(X, y)`: X a dense float64 array of shape (rows, n_features); y float64 in {-1, +1}
        (labels 0/1 are mapped to -1/+1).

    Raises:
        DataError: missing file; empty file; a malformed line, a feature index above `n_features` or a
            non-finite value (reported as `file:line` with the start of the line); non-binary labels.
        ValueError: `n_features` is neither None nor a positive integer.
    """
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    _check_n_features(n_features)
    _check_file_exists(path)
    with _open_libsvm(path) as source:
        try:
            X, y = load_svmlight_file(source, n_features=n_features, zero_based=False, dtype=np.float64)
        except (ValueError, OverflowError) as exc:
            problem = _first_problem(path, n_features)
            raise DataError(problem or f"{path}: not a valid LIBSVM file ({exc})") from exc
    if X.shape[0] == 0:
        raise DataError(f"{path}: no data rows (the file is empty or holds only comments and blank lines)")
    if not np.isfinite(X.data).all():
        raise DataError(_first_problem(path, n_features) or f"{path}: non-finite feature values")
    _check_dense_size(path, X.shape)
    try:
        dense = X.toarray()
    except MemoryError:
        _check_dense_size(path, X.shape, limit=0)
        raise
    return dense, _binary_labels(y, path)


#: Dense matrices above this many bytes are refused with a message instead of an out-of-memory crash.
MAX_DENSE_BYTES = 8 * 2**30


def _check_dense_size(path: Path, shape: tuple[int, int], limit: int = MAX_DENSE_BYTES) -> None:
    """A feature index far above the others (a typo, a hashed feature) would need a huge dense matrix."""
    need = shape[0] * shape[1] * 8
    if need <= limit:
        return
    line, index = _largest_index_line(path)
    raise DataError(
        f"{path}:{line}: feature index {index:,} makes the dense feature matrix {shape[0]:,} x {shape[1]:,} "
        f"float64 = {need / 2**30:,.1f} GiB, more than this machine can hold (limit {MAX_DENSE_BYTES / 2**30:.0f} "
        "GiB); check that line, or "
        "renumber the features to 1..d"
    )


def _largest_index_line(path: Path) -> tuple[int, int]:
    """(line number, index) of the largest feature index in the file."""
    best = (0, 0)
    with _open_libsvm(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            tokens = raw.split(b"#", 1)[0].split()[1:]
            indices = [int(t.partition(b":")[0]) for t in tokens if t.partition(b":")[0].isdigit()]
            if indices and max(indices) > best[1]:
                best = (lineno, max(indices))
    return best


def _check_n_features(n_features: int | None) -> None:
    """`n_features` must be None or an integer >= 1."""
    if n_features is not None and (
        isinstance(n_features, bool) or not isinstance(n_features, Integral) or n_features < 1
    ):
        raise ValueError(f"n_features must be None or an integer >= 1, got {n_features!r}")


def _check_file_exists(path: Path) -> None:
    """A missing data file is a DataError that says how to obtain it."""
    if not path.is_file():
        registered = ", ".join(sorted(LIBSVM_BINARY))
        raise DataError(
            f"data file not found: {path}. Pass --data-dir DIR (data_dir=DIR) with the LIBSVM files NAME and "
            f"NAME.t in DIR, or leave it out to download a registered data set ({registered}) into the "
            f"cache ({cache_dir()}, set $MBBO_CACHE to move it)."
        )


_MAGIC = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open}


def _open_libsvm(path: Path) -> BinaryIO:
    """Open a data file in binary mode: gzip and bzip2 are recognised by their magic bytes (whatever the
    name), and a file with old Mac line endings (CR only) is read with them turned into newlines."""
    with open(path, "rb") as raw:
        head = raw.read(3)
    opener = next((op for magic, op in _MAGIC.items() if head.startswith(magic)), None)
    handle: BinaryIO = opener(path, "rb") if opener is not None else open(path, "rb")  # noqa: SIM115  # type: ignore[assignment]
    sniff = handle.read(1 << 16)
    handle.seek(0)
    if b"\r" in sniff and b"\n" not in sniff:
        with handle:
            return io.BytesIO(handle.read().replace(b"\r", b"\n"))
    return handle


def _first_problem(path: Path, n_features: int | None) -> str | None:
    """Scan the file for its first bad line: `"file:line: problem; line starts '...'"`, or None."""
    with _open_libsvm(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            problem = _line_problem(raw, n_features)
            if problem is not None:
                start = raw[:60].decode("utf-8", errors="replace").rstrip("\r\n")
                return f"{path}:{lineno}: {problem}; the line starts {start!r}"
    return None


def _line_problem(raw: bytes, n_features: int | None) -> str | None:
    """What is wrong with one line of a LIBSVM file, or None if it is fine (comments and blanks are)."""
    content = raw.split(b"#", 1)[0].strip()
    if not content:
        return None
    label, *tokens = content.split()
    if _as_float(label) is None:
        return f"the label {_txt(label)!r} is not a number"
    previous = 0
    for token in tokens:
        if token.startswith(b"qid:"):
            if not token[4:].isdigit():
                return f"bad query id {_txt(token)!r}"
            continue
        problem, previous = _token_problem(token, previous, n_features)
        if problem is not None:
            return problem
    return None


def _token_problem(token: bytes, previous: int, n_features: int | None) -> tuple[str | None, int]:
    """Check one `index:value` token; returns (problem or None, this index)."""
    index_text, colon, value_text = token.partition(b":")
    if not colon:
        return f"{_txt(token)!r} is not an index:value pair", previous
    if not index_text.isdigit():
        return f"the feature index {_txt(index_text)!r} is not a positive integer", previous
    index = int(index_text)
    if index < 1:
        return "feature index 0: LIBSVM indices start at 1", index
    if n_features is not None and index > n_features:
        return f"feature index {index} is above the declared feature count (allowed 1..{n_features})", index
    if index <= previous:
        return f"feature indices must be strictly increasing, got {index} after {previous}", index
    value = _as_float(value_text)
    if value is None or not math.isfinite(value):
        return f"the value {_txt(value_text)!r} of feature {index} is not a finite number", index
    return None, index


def _as_float(text: bytes) -> float | None:
    """`float(text)`, or None if it does not parse."""
    try:
        return float(text)
    except ValueError:
        return None


def _txt(raw: bytes) -> str:
    """Bytes from a data file as text for a message."""
    return raw.decode("utf-8", errors="replace")


def _binary_labels(y: np.ndarray, path: Path) -> np.ndarray:
    """Labels as float64 in {-1, +1}: accepts {-1, +1} and {0, 1} (0 -> -1); DataError otherwise."""
    values, counts = np.unique(y, return_counts=True)
    found = set(values.tolist())
    if found <= {-1.0, 1.0}:
        return y.astype(np.float64)
    if found <= {0.0, 1.0}:
        return np.where(y == 1.0, 1.0, -1.0)
    listed = ", ".join(f"{v:g} ({c:,} rows)" for v, c in zip(values, counts, strict=True))
    raise DataError(f"{path}: labels are not binary: found {listed}; expected -1/+1 (or 0/1)")


# ---------------------------------------------------------------------------------------------------------
# the embedded data set
# ---------------------------------------------------------------------------------------------------------


def load_breast_cancer_dataset(
    *, seed: int = BREAST_CANCER_SEED, test_fraction: float = BREAST_CANCER_TEST_FRACTION
) -> BinaryDataset:
    """scikit-learn's Wisconsin breast cancer set as a `BinaryDataset` (needs no file or download).

    569 rows, 30 features. Labels: benign -> +1, malignant -> -1. Split train/test with
    `mbbo.data.binary.split_indices(569, test_fraction, seed=seed)` (defaults: 455 / 114 rows, seed 0), then
    every feature is standardised with the mean and standard deviation of the training rows.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.where(bunch.target == 1, 1.0, -1.0)
    train, test = split_indices(len(X), test_fraction, seed=seed, what="test")
    mean = X[train].mean(axis=0)
    std = X[train].std(axis=0)
    std[std == 0] = 1.0
    X = (X - mean) / std
    return BinaryDataset("breast_cancer", X.shape[1], X[train], y[train], X[test], y[test])


_EMBEDDED: dict[str, tuple[str, Callable[[], BinaryDataset]]] = {
    "breast_cancer": (
        "Wisconsin breast cancer (scikit-learn, embedded, no download): 30 standardised features, "
        "455 train / 114 test rows",
        load_breast_cancer_dataset,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# data sets by name
# ---------------------------------------------------------------------------------------------------------


def available_datasets() -> dict[str, str]:
    """Names accepted by `load_binary_dataset` (besides any LIBSVM pair in a data_dir), with a description."""
    described = {name: description for name, (description, _) in _EMBEDDED.items()}
    described.update({name: spec.description for name, spec in LIBSVM_BINARY.items()})
    return described


def available_single_datasets() -> dict[str, str]:
    """Names accepted by `load_single_libsvm` (the sets that a task splits itself, e.g. `svm_slack`), with a
    description."""
    return {name: f"{_SINGLE_DESCRIPTIONS[name]}; downloaded once and cached" for name in LIBSVM_SINGLE}


def load_binary_dataset(
    name: str,
    data_dir: str | Path | None = None,
    cache: Path | None = None,
    download: bool = True,
    *,
    n_features: int | None = None,
) -> BinaryDataset:
    """Load a binary data set by name.

    Args:
        name: `"breast_cancer"` (embedded; `data_dir`, `cache` and `download` are ignored), a registered
            LIBSVM set (see `available_datasets()`), or, with `data_dir`, any LIBSVM pair `name`/`name.t`.
        data_dir: a directory holding the files `name` (train) and `name.t` (test). Registered files are
            checked against their sha256; other files are read as they are.
        cache: cache directory for downloads (default `$MBBO_CACHE` or `~/.cache/mbbo`); used when
            `data_dir` is None.
        download: whether a registered set missing from the cache may be downloaded.
        n_features: feature count for an unregistered set (None: the largest index in either file).

    Raises:
        DataError: unknown name, missing or corrupt file, checksum mismatch, download failure or refused.
        ValueError: `n_features` disagrees with a registered set's.
    """
    if name in _EMBEDDED:
        return _EMBEDDED[name][1]()
    spec = LIBSVM_BINARY.get(name)
    if spec is not None and n_features not in (None, spec.n_features):
        raise ValueError(
            f"n_features must be {spec.n_features} for the registered data set {name}, got {n_features}"
        )
    if data_dir is not None:
        train_path, test_path = _local_files(name, Path(data_dir), spec)
    elif spec is None:
        raise DataError(
            f"unknown data set {name!r}; available: {', '.join(available_datasets())}. "
            f"For your own LIBSVM files pass data_dir=DIR (--data-dir DIR) holding {name} and {name}.t."
        )
    else:
        train_path, test_path = (_cached_file(spec, f, cache, download) for f in (spec.train, spec.test))
    d = spec.n_features if spec is not None else n_features
    X_train, y_train = load_libsvm_file(train_path, d)
    X_test, y_test = load_libsvm_file(test_path, d)
    if d is None:
        d = max(X_train.shape[1], X_test.shape[1])
        X_train, X_test = _pad_columns(X_train, d), _pad_columns(X_test, d)
    return BinaryDataset(name, d, X_train, y_train, X_test, y_test)


def _local_files(name: str, data_dir: Path, spec: LibsvmSpec | None) -> tuple[Path, Path]:
    """`data_dir/name` and `data_dir/name.t` (or their `.gz` / `.bz2` forms), verified against the registry
    when `spec` is given."""
    paths = tuple(_plain_or_compressed(data_dir / part) for part in (name, f"{name}.t"))
    if spec is not None:
        for path, registered in zip(paths, (spec.train, spec.test), strict=True):
            _check_file_exists(path)
            actual = sha256_file(path)
            if actual != registered.sha256:
                raise DataError(
                    f"checksum mismatch for {path}: expected sha256 {registered.sha256} (registered "
                    f"{registered.name}), got {actual}. Replace it with the original from {registered.url}, "
                    "or rename the pair to load it as an unregistered data set."
                )
    return paths


def _plain_or_compressed(path: Path) -> Path:
    """`path` itself when it exists, else the first of `path.gz`, `path.bz2` that does (else `path`)."""
    if path.exists():
        return path
    return next((c for c in (path.with_name(path.name + ".gz"), path.with_name(path.name + ".bz2"))
                 if c.is_file()), path)


def _cached_file(spec: LibsvmSpec, file: LibsvmFile, cache: Path | None, download: bool) -> Path:
    """The verified cached copy of a registered file, downloading it if allowed."""
    name = f"{_CACHE_SUBDIR}/{file.name}"
    hint = (
        f"You can also download {file.url} by hand and pass --data-dir DIR (data_dir=DIR) "
        f"with {spec.train.name} and {spec.test.name} in DIR."
    )
    if download:
        return fetch(name, file.url, file.sha256, cache, hint=hint)
    found = lookup(name, file.sha256, cache)
    if found is None:
        where = cache if cache is not None else cache_dir()
        raise DataError(
            f"{file.name} is not in the cache {where} (or fails its sha256 check) and download=False. {hint}"
        )
    return found


def _pad_columns(X: np.ndarray, d: int) -> np.ndarray:
    """Append zero columns up to `d` columns."""
    if X.shape[1] == d:
        return X
    return np.hstack([X, np.zeros((X.shape[0], d - X.shape[1]), dtype=X.dtype)])
