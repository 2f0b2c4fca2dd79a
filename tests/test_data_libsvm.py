"""Tests of the LIBSVM reader, the data set registry and the embedded breast_cancer set."""

from __future__ import annotations

import gzip
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from mbbo.data.errors import DataError
from mbbo.data.libsvm import (
    LIBSVM_BINARY,
    LIBSVM_SINGLE,
    BinaryDataset,
    available_datasets,
    available_single_datasets,
    load_binary_dataset,
    load_breast_cancer_dataset,
    load_libsvm_file,
)


@pytest.fixture(scope="module")
def libsvm_dir(shared_data: Path) -> Path:
    return shared_data / "libsvm"


@pytest.fixture(scope="module")
def a8a(libsvm_dir: Path) -> BinaryDataset:
    return load_binary_dataset("a8a", data_dir=libsvm_dir)


@pytest.fixture(scope="module")
def w8a(libsvm_dir: Path) -> BinaryDataset:
    return load_binary_dataset("w8a", data_dir=libsvm_dir)


def _write(tmp_path: Path, text: str, name: str = "data") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the real files -------------------------------------------------------------------------------------


def test_a8a_shapes_and_labels(a8a: BinaryDataset) -> None:
    assert (a8a.name, a8a.n_features) == ("a8a", 123)
    assert a8a.X_train.shape == (22_696, 123) and a8a.X_test.shape == (9_865, 123)
    assert (a8a.n_train, a8a.n_test) == (22_696, 9_865)
    assert a8a.X_train.dtype == np.float64 and a8a.y_train.dtype == np.float64
    assert set(np.unique(a8a.y_train)) == {-1.0, 1.0}
    assert int((a8a.y_train == 1).sum()) == 5_506
    assert int((a8a.y_test == 1).sum()) == 2_335
    assert set(np.unique(a8a.X_train)) == {0.0, 1.0}
    # a8a.t uses only 122 of the 123 columns: the last one is all zero there, not in the training file
    assert a8a.X_test[:, 122].sum() == 0 and a8a.X_train[:, 122].sum() > 0


def test_w8a_shapes_and_labels(w8a: BinaryDataset) -> None:
    assert w8a.X_train.shape == (49_749, 300) and w8a.X_test.shape == (14_951, 300)
    assert set(np.unique(w8a.y_test)) == {-1.0, 1.0}
    assert int((w8a.y_train == 1).sum()) == 1_479
    assert int((w8a.y_test == 1).sum()) == 454


def test_a8a_test_file_width(libsvm_dir: Path) -> None:
    assert load_libsvm_file(libsvm_dir / "a8a.t", None)[0].shape == (9_865, 122)
    assert load_libsvm_file(libsvm_dir / "a8a.t", 123)[0].shape == (9_865, 123)


def test_registry_matches_shared_checksums(shared_data: Path) -> None:
    sums = dict(
        (path.removeprefix("libsvm/"), digest)
        for digest, path in (line.split() for line in (shared_data / "SHA256SUMS").read_text().splitlines())
    )
    for name, spec in LIBSVM_BINARY.items():
        for file in (spec.train, spec.test):
            assert file.sha256 == sums[file.name]
            assert file.url == f"https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/{file.name}"
        assert spec.test.name == f"{name}.t"
    assert (LIBSVM_BINARY["a8a"].n_features, LIBSVM_BINARY["w8a"].n_features) == (123, 300)


# --- load_libsvm_file -----------------------------------------------------------------------------------


def test_small_file_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "# comment\n-1 1:0.5 3:2\n\n+1 2:1 # trailing comment\n")
    X, y = load_libsvm_file(path, 4)
    np.testing.assert_array_equal(X, [[0.5, 0, 2, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(y, [-1.0, 1.0])


def test_zero_one_labels_are_mapped(tmp_path: Path) -> None:
    _, y = load_libsvm_file(_write(tmp_path, "0 1:1\n1 2:1\n0 1:1\n"), 2)
    np.testing.assert_array_equal(y, [-1.0, 1.0, -1.0])


def test_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "data.gz"
    path.write_bytes(gzip.compress(b"-1 1:1\n+1 2:1\n"))
    X, y = load_libsvm_file(path, 2)
    np.testing.assert_array_equal(X, np.eye(2))
    np.testing.assert_array_equal(y, [-1.0, 1.0])
    # a malformed compressed file is still scanned for the bad line
    path.write_bytes(gzip.compress(b"-1 1:1\n+1 2:x\n"))
    with pytest.raises(DataError, match=r"data\.gz:2:"):
        load_libsvm_file(path, 2)


def test_compressed_file_is_recognised_by_its_magic_bytes(tmp_path: Path) -> None:
    """A gzip or bzip2 file without the suffix is decompressed, not parsed as text with binary 'labels'."""
    import bz2

    for name, compress in (("gzipped", gzip.compress), ("bzipped", bz2.compress)):
        path = tmp_path / name
        path.write_bytes(compress(b"-1 1:1\n+1 2:1\n"))
        X, y = load_libsvm_file(path, 2)
        np.testing.assert_array_equal(X, np.eye(2))
        np.testing.assert_array_equal(y, [-1.0, 1.0])


def test_gzipped_pair_in_data_dir(tmp_path: Path) -> None:
    (tmp_path / "toy.gz").write_bytes(gzip.compress(b"-1 1:1\n+1 2:1\n"))
    (tmp_path / "toy.t.gz").write_bytes(gzip.compress(b"-1 2:3\n"))
    ds = load_binary_dataset("toy", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.X_test, [[0, 3]])


def test_cr_only_line_endings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "mac"
    path.write_bytes(b"-1 1:0.5 3:2\r+1 2:1\r")
    X, y = load_libsvm_file(path, 3)
    np.testing.assert_array_equal(X, [[0.5, 0, 2], [0, 1, 0]])
    np.testing.assert_array_equal(y, [-1.0, 1.0])
    path.write_bytes(b"-1 1:0.5\r+1 2:x\r")  # a bad line is still located by its number
    with pytest.raises(DataError, match=r"mac:2: the value 'x' of feature 2"):
        load_libsvm_file(path, 3)


def test_huge_feature_index_names_the_line_and_the_dense_size(tmp_path: Path) -> None:
    path = _write(tmp_path, "-1 1:1\n+1 2:1\n+1 3:1 999999999:1\n")
    with pytest.raises(DataError, match=r"data:3: feature index 999,999,999 makes the dense feature matrix "
                                        r"3 x 999,999,999 float64 = 22\.4 GiB"):
        load_libsvm_file(path, None)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_libsvm_file(tmp_path / "nope", 3)
    message = str(info.value)
    assert str(tmp_path / "nope") in message
    assert "--data-dir" in message and "download" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="no data rows"):
        load_libsvm_file(_write(tmp_path, text), 3)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("+1 2:1 abc", "not an index:value pair"),
        ("+1 2:x", "not a finite number"),
        ("+1 2:nan", "not a finite number"),
        ("+1 q:1", "not a positive integer"),
        ("+1 0:1", "indices start at 1"),
        ("+1 -3:1", "not a positive integer"),
        ("+1 3:1 2:1", "strictly increasing"),
        ("+1 2:1 2:1", "strictly increasing"),
        ("yes 2:1", "label 'yes' is not a number"),
        ("+1 2: 1", "not a finite number"),
        ("+1 99999999999999999999999:1", "above the declared feature count"),
    ],
)
def test_malformed_line_is_located(tmp_path: Path, bad_line: str, problem: str) -> None:
    path = _write(tmp_path, f"-1 1:1\n# comment\n{bad_line}\n-1 1:1\n")
    with pytest.raises(DataError) as info:
        load_libsvm_file(path, 4)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert problem in message
    assert repr(bad_line[:20])[:-1] in message  # the start of the offending line is quoted


def test_feature_index_above_declared_count(tmp_path: Path) -> None:
    path = _write(tmp_path, "-1 1:1\n+1 2:1 200:1\n")
    with pytest.raises(DataError) as info:
        load_libsvm_file(path, 123)
    message = str(info.value)
    assert f"{path}:2:" in message
    assert "feature index 200" in message and "1..123" in message


def test_non_binary_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, "2 1:1\n3 2:1\n3 1:1\n")
    with pytest.raises(DataError) as info:
        load_libsvm_file(path, 2)
    message = str(info.value)
    assert str(path) in message and "not binary" in message
    assert "2 (1 rows)" in message and "3 (2 rows)" in message


@pytest.mark.parametrize("n_features", [0, -1, 1.5, True])
def test_bad_n_features(tmp_path: Path, n_features: object) -> None:
    with pytest.raises(ValueError, match="n_features"):
        load_libsvm_file(_write(tmp_path, "-1 1:1\n"), n_features)  # type: ignore[arg-type]


# --- load_binary_dataset --------------------------------------------------------------------------------


def test_registered_file_with_wrong_checksum(tmp_path: Path) -> None:
    _write(tmp_path, "-1 1:1\n+1 2:1\n", "a8a")
    _write(tmp_path, "-1 1:1\n", "a8a.t")
    with pytest.raises(DataError) as info:
        load_binary_dataset("a8a", data_dir=tmp_path)
    message = str(info.value)
    assert "checksum mismatch" in message and str(tmp_path / "a8a") in message
    assert LIBSVM_BINARY["a8a"].train.sha256 in message


def test_registered_file_missing_in_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_binary_dataset("w8a", data_dir=tmp_path)


def test_unregistered_pair_in_data_dir(tmp_path: Path) -> None:
    _write(tmp_path, "-1 1:1\n+1 2:1\n", "toy")
    _write(tmp_path, "-1 5:2\n", "toy.t")
    ds = load_binary_dataset("toy", data_dir=str(tmp_path))
    assert ds.n_features == 5 and ds.X_train.shape == (2, 5) and ds.X_test.shape == (1, 5)
    np.testing.assert_array_equal(ds.X_test, [[0, 0, 0, 0, 2]])
    assert load_binary_dataset("toy", data_dir=tmp_path, n_features=7).X_train.shape == (2, 7)


def test_unknown_name_without_data_dir() -> None:
    with pytest.raises(DataError, match=r"unknown data set 'nope'.*a8a.*--data-dir"):
        load_binary_dataset("nope")


def test_registered_feature_count_is_enforced(libsvm_dir: Path) -> None:
    with pytest.raises(ValueError, match="n_features must be 123"):
        load_binary_dataset("a8a", data_dir=libsvm_dir, n_features=100)


def _serve_from(libsvm_dir: Path, calls: list[str]) -> Callable[[str, float], BinaryIO]:
    """A urlopen stand-in serving registry URLs from the shared files and recording the calls."""

    def fake_urlopen(url: str, timeout: float) -> BinaryIO:
        calls.append(url)
        return (libsvm_dir / url.rsplit("/", 1)[-1]).open("rb")

    return fake_urlopen


def test_download_into_cache_then_offline(
    libsvm_dir: Path, a8a: BinaryDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", _serve_from(libsvm_dir, calls))
    ds = load_binary_dataset("a8a", cache=tmp_path)
    assert calls == [LIBSVM_BINARY["a8a"].train.url, LIBSVM_BINARY["a8a"].test.url]
    assert (tmp_path / "libsvm" / "a8a").is_file() and (tmp_path / "libsvm" / "a8a.t").is_file()
    np.testing.assert_array_equal(ds.X_test, a8a.X_test)
    offline = load_binary_dataset("a8a", cache=tmp_path, download=False)
    assert len(calls) == 2
    np.testing.assert_array_equal(offline.y_train, a8a.y_train)


def test_download_refused_with_empty_cache(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"a8a is not in the cache .*download=False.*--data-dir"):
        load_binary_dataset("a8a", cache=tmp_path, download=False)


def test_dataset_shape_validation() -> None:
    with pytest.raises(ValueError, match="toy train"):
        BinaryDataset("toy", 3, np.zeros((2, 3)), np.zeros(3), np.zeros((1, 3)), np.zeros(1))


# --- embedded data set and listing ----------------------------------------------------------------------


def test_breast_cancer() -> None:
    ds = load_binary_dataset("breast_cancer", data_dir="/ignored")
    assert (ds.name, ds.n_features, ds.n_train, ds.n_test) == ("breast_cancer", 30, 455, 114)
    assert set(np.unique(ds.y_train)) == {-1.0, 1.0}
    assert int((ds.y_train == 1).sum() + (ds.y_test == 1).sum()) == 357  # benign samples
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1.0, rtol=1e-12)
    assert np.abs(ds.X_test.mean(axis=0)).max() > 1e-3  # test rows use the train statistics
    again = load_breast_cancer_dataset()
    np.testing.assert_array_equal(again.X_test, ds.X_test)
    other = load_breast_cancer_dataset(seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)


def test_available_datasets() -> None:
    listed = available_datasets()
    assert set(listed) == {"breast_cancer", "a8a", "w8a"}
    assert all(text and "\n" not in text for text in listed.values())
    assert "22,696" in listed["a8a"] and "300 features" in listed["w8a"]


def test_available_single_datasets_lists_every_single_file_set() -> None:
    listed = available_single_datasets()
    assert set(listed) == set(LIBSVM_SINGLE) == {"diabetes", "fourclass"}
    assert "768 rows" in listed["diabetes"] and "862 rows" in listed["fourclass"]
