from __future__ import annotations

import hashlib
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbbo.data import movielens as ml
from mbbo.data.movielens import (
    MovieLensError,
    MovieLensFileNotFoundError,
    Ratings,
    UserItemCSR,
    download_movielens,
    gains,
    load_movielens,
    read_ratings,
    recbole_ml100k_path,
    split_leave_last,
)

ROWS = [(7, 30, 4, 100), (3, 10, 5, 50), (7, 10, 1, 90), (3, 20, 2, 60), (12, 30, 3, 10)]


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def _formats(tmp_path: Path) -> dict[str, Path]:
    return {
        "ml-100k": _write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)),
        "ml-1m": _write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS)),
        "ml-20m": _write(
            tmp_path / "ratings.csv",
            "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in ROWS),
        ),
        "recbole": _write(
            tmp_path / "ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS),
        ),
    }


# ------------------------------------------------------------------------------------------------ reading


def test_all_formats_read_the_same_ratings(tmp_path):
    for fmt, path in _formats(tmp_path).items():
        r = read_ratings(path)  # format inferred from the name
        assert r.n_users == 3 and r.n_items == 3 and len(r) == 5, fmt
        np.testing.assert_array_equal(r.user_ids, [3, 7, 12])
        np.testing.assert_array_equal(r.item_ids, [10, 20, 30])
        np.testing.assert_array_equal(r.users, [1, 0, 1, 0, 2])
        np.testing.assert_array_equal(r.items, [2, 0, 0, 1, 2])
        np.testing.assert_array_equal(r.ratings, [4, 5, 1, 2, 3])
        np.testing.assert_array_equal(r.timestamps, [100, 50, 90, 60, 10])
        header = 1 if fmt in ("ml-20m", "recbole") else 0
        np.testing.assert_array_equal(r.lines, np.arange(1, 6) + header)
        assert read_ratings(path, fmt).source == str(path)


def test_ml100k_file(shared_data):
    path = shared_data / "movielens" / "ml-100k" / "u.data"
    r = read_ratings(path)
    assert (len(r), r.n_users, r.n_items) == (100_000, 943, 1682)
    np.testing.assert_array_equal(r.user_ids, np.arange(1, 944))
    np.testing.assert_array_equal(r.item_ids, np.arange(1, 1683))
    assert set(np.unique(r.ratings)) == {1, 2, 3, 4, 5}
    first = path.read_text().splitlines()[0].split("\t")
    assert (r.user_ids[r.users[0]], r.item_ids[r.items[0]], r.ratings[0], r.timestamps[0]) == tuple(
        float(x) for x in first
    )


def test_recbole_wheel_copy_matches_u_data(shared_data):
    path = recbole_ml100k_path()
    if path is None:
        pytest.skip("recbole is not installed")
    a = read_ratings(path)
    b = read_ratings(shared_data / "movielens" / "ml-100k" / "u.data")
    for f in ("users", "items", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert load_movielens("ml-100k").n_users == 943


def test_recbole_path_absent_is_none(monkeypatch):
    monkeypatch.setattr(ml.importlib.util, "find_spec", lambda name: None)
    assert recbole_ml100k_path() is None


def test_half_stars_only_for_ml20m(tmp_path):
    csv = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3,0.5,11\n")
    np.testing.assert_array_equal(read_ratings(csv).ratings, [3.5, 0.5])
    with pytest.raises(MovieLensError, match=r"u\.data:2: rating outside \{1, 2, 3, 4, 5\}"):
        read_ratings(_write(tmp_path / "u.data", "1\t2\t3\t10\n1\t3\t3.5\t11\n"))
    with pytest.raises(MovieLensError, match=r"ratings\.csv:3: rating outside"):
        read_ratings(_write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,10\n1,3,0.25,1\n"))
    with pytest.raises(MovieLensError, match=r"ratings\.csv:2: rating outside"):
        read_ratings(_write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,5.5,10\n"))


@pytest.mark.parametrize(
    ("body", "line", "pattern"),
    [
        ("1\t2\t3\t4\n5\t6\t7\n", 2, "expected 4 fields"),
        ("1\t2\t3\t4\n5\t6\t7\t8\t9\n", 2, "expected 4 fields"),
        ("1\t2\t3\t4\n1\t2\tx\t4\n", 2, "non-numeric"),
        ("1\t2\t0\t4\n", 1, "rating outside"),
        ("1\t2\t6\t4\n", 1, "rating outside"),
        ("1\t2\t3\t4\n1.5\t2\t3\t4\n", 2, "user id is not a non-negative integer"),
        ("1\t-2\t3\t4\n", 1, "item id is not a non-negative integer"),
        ("1\t2\t3\tnan\n", 1, "timestamp is not finite"),
        ("1\t2\t3\t4\n\n1\t\t3\t4\n", 3, "expected 4 fields|non-numeric"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, body, line, pattern):
    path = _write(tmp_path / "u.data", body)
    with pytest.raises(MovieLensError, match=rf"u\.data:{line}: ({pattern})") as info:
        read_ratings(path)
    assert isinstance(info.value, ValueError)


def test_line_numbers_across_chunks_and_lenient_whitespace(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "_CHUNK_BYTES", 16)  # many chunks, lines cut across reads
    body = "".join(f"{u}::{u + 1}::{1 + u % 5}::{1000 + u}\r\n" for u in range(40)) + "\n" + "9::9::9::9"
    path = _write(tmp_path / "ratings.dat", body)
    with pytest.raises(MovieLensError, match=r"ratings\.dat:42: rating outside"):
        read_ratings(path)
    path = _write(tmp_path / "ratings.dat", body[: -len("9::9::9::9")] + "9::9::4::9")  # no final newline
    r = read_ratings(path)
    assert len(r) == 41
    assert r.lines[-1] == 42 and r.lines[39] == 40
    np.testing.assert_array_equal(r.ratings[:5], [1, 2, 3, 4, 5])


def test_header_missing_file_and_format_errors(tmp_path):
    with pytest.raises(MovieLensError, match=r"ratings\.csv:1: expected a header"):
        read_ratings(_write(tmp_path / "ratings.csv", "1,2,3,4\n"))
    with pytest.raises(MovieLensFileNotFoundError, match="not found") as info:
        read_ratings(tmp_path / "nope.data")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(MovieLensError, match="cannot infer"):
        read_ratings(_write(tmp_path / "ratings.txt", "1\t2\t3\t4\n"))
    with pytest.raises(MovieLensError, match="fmt="):
        read_ratings(_write(tmp_path / "u.data", "1\t2\t3\t4\n"), "ml-10m")  # type: ignore[arg-type]
    with pytest.raises(MovieLensError, match="no ratings"):
        read_ratings(_write(tmp_path / "u.data", "\n"))


def test_ratings_from_arrays_validates():
    r = Ratings.from_arrays([5, 5, 2], [9, 1, 9], [1, 2, 3], [0, 1, 2])
    np.testing.assert_array_equal(r.users, [1, 1, 0])
    np.testing.assert_array_equal(r.items, [1, 0, 1])
    with pytest.raises(MovieLensError):
        Ratings.from_arrays([1, 2], [1], [1], [1])


# ------------------------------------------------------------------------------------------------ split


def _reference_split(r: Ratings, n_test: int, n_dev: int):
    """Obviously-correct version of the protocol, one user at a time, in plain Python."""
    first_row: dict[tuple[int, int, float], int] = {}
    for row in range(len(r)):
        first_row.setdefault((int(r.users[row]), int(r.items[row]), float(r.timestamps[row])), row)
    latest: dict[tuple[int, int], int] = {}
    for (u, i, _t), row in sorted(first_row.items(), key=lambda kv: kv[0][2]):
        latest[(u, i)] = row  # in time order: the latest rating of a (user, item) pair wins
    per_user: dict[int, list[int]] = defaultdict(list)
    for row in sorted(latest.values()):
        per_user[int(r.users[row])].append(row)
    parts: dict[str, set[tuple[int, int, float]]] = {"train": set(), "dev": set(), "test": set()}
    for rows in per_user.values():
        rows.sort(key=lambda row: float(r.timestamps[row]))  # stable: file order among ties
        first, rest = rows[:1], rows[1:]
        test = rest[len(rest) - min(n_test, len(rest)) :]
        rest = rest[: len(rest) - len(test)]
        dev = rest[len(rest) - min(n_dev, len(rest)) :]
        train = first + rest[: len(rest) - len(dev)]
        for name, chosen in (("train", train), ("dev", dev), ("test", test)):
            parts[name] |= {(int(r.users[x]), int(r.items[x]), float(r.ratings[x])) for x in chosen}
    return parts


def _as_set(csr: UserItemCSR) -> set[tuple[int, int, float]]:
    rows = csr.row_of_entry().tolist()
    return set(zip(rows, csr.items.tolist(), csr.ratings.tolist(), strict=True))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(1, 5), st.integers(0, 5)),  # few times: many ties
        min_size=1,
        max_size=60,
    ),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_split_matches_reference(rows, n_test, n_dev):
    u, i, rt, t = (np.array(c) for c in zip(*rows, strict=True))
    r = Ratings.from_arrays(u, i, rt, t)
    s = split_leave_last(r, n_test, n_dev)
    ref = _reference_split(r, n_test, n_dev)
    assert _as_set(s.train) == ref["train"]
    assert _as_set(s.dev) == ref["dev"]
    assert _as_set(s.test) == ref["test"]
    assert bool((s.train.counts() >= 1).all())  # every user keeps its first rating


def test_split_ml100k(shared_data):
    r = read_ratings(shared_data / "movielens" / "ml-100k" / "u.data")
    s = split_leave_last(r)
    assert s.summary() == {"users": 943, "items": 1682, "train": 90570, "dev": 4715, "test": 4715}
    assert bool((s.dev.counts() == 5).all()) and bool((s.test.counts() == 5).all())
    assert int(s.train.counts().min()) >= 10
    ref = _reference_split(r, 5, 5)
    assert _as_set(s.test) == ref["test"] and _as_set(s.dev) == ref["dev"]


def test_split_small_users_ties_and_duplicates():
    # user 0: 8 ratings -> 1 train, 2 dev, 5 test; user 1: 1 rating -> train only; user 2: 3 ratings -> 1/0/2
    rows = [(0, k, 1 + k % 5, 10 * k) for k in range(8)] + [(1, 0, 3, 5)] + [(2, 0, 1, 0), (2, 1, 2, 1), (2, 2, 3, 2)]
    rows += [(2, 2, 5, 2)]  # exact (user, item, time) duplicate: the first row (rating 3) is kept
    rows += [(1, 3, 2, 1), (1, 3, 4, 0)]  # (user, item) at two times: the latest (rating 2 at time 1) is kept
    u, i, rt, t = (np.array(c) for c in zip(*rows, strict=True))
    s = split_leave_last(Ratings.from_arrays(u, i, rt, t))
    np.testing.assert_array_equal(s.train.counts(), [1, 1, 1])
    np.testing.assert_array_equal(s.dev.counts(), [2, 0, 0])
    np.testing.assert_array_equal(s.test.counts(), [5, 1, 2])
    # user 1: item 3 kept at time 1 with rating 2 (its first rating, so train); item 0 at time 5 is test
    assert s.train.row(1)[0].tolist() == [3] and s.train.row(1)[1].tolist() == [2.0]
    assert s.test.row(1)[0].tolist() == [0] and s.test.row(1)[1].tolist() == [3.0]
    assert s.test.row(2)[1].tolist() == [2.0, 3.0]
    assert s.dev.row(0)[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="n_test"):
        split_leave_last(Ratings.from_arrays(u, i, rt, t), -1)
    # ties in time keep file order: the later row in the file is the "later" rating
    s2 = split_leave_last(Ratings.from_arrays([0, 0, 0], [5, 3, 4], [1, 1, 1], [0, 7, 7]), 1, 0)
    assert s2.test.row(0)[0].tolist() == [1]  # raw item 4 (3->0, 4->1, 5->2): the last of the tie in the file


# ------------------------------------------------------------------------------------------------ CSR


def test_csr_api():
    csr = UserItemCSR.from_coo([3, 0, 0, 3, 3], [4, 3, 1, 0, 2], [1.0, 2.0, 3.0, 4.0, 5.0], 4, 5)
    np.testing.assert_array_equal(csr.offsets, [0, 2, 2, 2, 5])
    np.testing.assert_array_equal(csr.items, [1, 3, 0, 2, 4])
    np.testing.assert_array_equal(csr.ratings, [3.0, 2.0, 4.0, 5.0, 1.0])
    np.testing.assert_array_equal(csr.counts(), [2, 0, 0, 3])
    np.testing.assert_array_equal(csr.row_of_entry(), [0, 0, 3, 3, 3])
    assert (csr.n_users, csr.n_items, csr.nnz) == (4, 5, 5)
    torch.testing.assert_close(csr.gains, torch.exp2(csr.ratings) - 1)
    torch.testing.assert_close(gains(torch.tensor([0.0, 1.0, 3.5])), torch.tensor([0.0, 1.0, 2**3.5 - 1]))
    pos, entry = csr.entries(torch.tensor([3, 1, 0]))
    np.testing.assert_array_equal(pos, [0, 0, 0, 2, 2])
    np.testing.assert_array_equal(entry, [2, 3, 4, 0, 1])
    items, ratings, mask = csr.padded(torch.tensor([3, 1, 0]))
    np.testing.assert_array_equal(items, [[0, 2, 4], [0, 0, 0], [1, 3, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(ratings[2], [3.0, 2.0, 0.0])
    items, _, mask = csr.padded(torch.tensor([3]), width=2)
    assert items.tolist() == [[0, 2]] and mask.all()
    got = csr.contains(torch.tensor([0, 3]), torch.tensor([[1, 2, 3], [2, 3, 4]]))
    assert got.tolist() == [[True, False, True], [True, False, True]]
    assert csr.row(1)[0].numel() == 0
    assert csr.to("cpu").items.device.type == "cpu"


def test_csr_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        UserItemCSR.from_coo([0, 0], [1, 1], [1, 1], 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        UserItemCSR.from_coo([0], [2], [1], 1, 2)
    with pytest.raises(ValueError, match="offsets"):
        UserItemCSR(torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([1.0]), 2)


# ------------------------------------------------------------------------------------------------ download


def _fake_archive(tmp_path: Path) -> tuple[Path, str]:
    body = b"1\t1\t5\t10\n1\t2\t3\t11\n2\t1\t4\t12\n"
    archive = tmp_path / "src" / "ml-100k.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/u.data", body)
    return archive, hashlib.sha256(body).hexdigest()


def test_download_cache_and_checksum(tmp_path, monkeypatch):
    archive, digest = _fake_archive(tmp_path)
    cache = tmp_path / "cache"
    src = ml._Source(archive.as_uri(), "ml-100k/u.data", "ml-100k", digest)
    monkeypatch.setitem(ml.MOVIELENS_SOURCES, "ml-100k", src)
    path = download_movielens("ml-100k", cache)
    assert path == cache / "movielens" / "ml-100k" / "u.data" and path.is_file()
    archive.unlink()  # a valid cached file is reused without the network
    assert download_movielens("ml-100k", cache) == path
    monkeypatch.setenv("MBBO_CACHE", str(cache))
    monkeypatch.setattr(ml, "recbole_ml100k_path", lambda: None)
    assert len(load_movielens("ml-100k")) == 3
    assert len(load_movielens("ml-100k", path.parent)) == 3  # a directory is accepted

    archive, _ = _fake_archive(tmp_path / "again")
    bad = ml._Source(archive.as_uri(), "ml-100k/u.data", "ml-100k", "0" * 64)
    monkeypatch.setitem(ml.MOVIELENS_SOURCES, "ml-100k", bad)
    with pytest.raises(MovieLensError, match="sha256"):
        download_movielens("ml-100k", tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "movielens" / "ml-100k" / "u.data").exists()


def test_download_through_checksummed_fetch(tmp_path, monkeypatch):
    archive, digest = _fake_archive(tmp_path)
    zip_digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    src = ml._Source(archive.as_uri(), "ml-100k/u.data", "ml-100k", digest, zip_digest)
    monkeypatch.setitem(ml.MOVIELENS_SOURCES, "ml-100k", src)
    path = download_movielens("ml-100k", tmp_path / "cache")
    assert (tmp_path / "cache" / "movielens" / "ml-100k.zip").is_file()
    assert len(read_ratings(path)) == 3


def test_errors_are_value_errors():
    assert issubclass(MovieLensError, ValueError)
    try:
        from mbbo.data.errors import DataError
    except ImportError:  # pragma: no cover
        return
    assert issubclass(MovieLensError, DataError)


def test_download_errors(tmp_path, monkeypatch):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    monkeypatch.setitem(ml.MOVIELENS_SOURCES, "ml-1m", ml._Source(junk.as_uri(), "ml-1m/ratings.dat", "ml-1m", None))
    with pytest.raises(MovieLensError, match="not a MovieLens archive"):
        download_movielens("ml-1m", tmp_path / "c")
    missing = ml._Source((tmp_path / "absent.zip").as_uri(), "ml-1m/ratings.dat", "ml-1m", None)
    monkeypatch.setitem(ml.MOVIELENS_SOURCES, "ml-1m", missing)
    with pytest.raises(MovieLensError, match="could not download"):
        download_movielens("ml-1m", tmp_path / "c2")
    assert not any((tmp_path / "c2" / "movielens").iterdir())  # no partial file left
    with pytest.raises(MovieLensError, match="name="):
        download_movielens("ml-3m", tmp_path)
    with pytest.raises(MovieLensError, match="name="):
        load_movielens("ml-3m")
    with pytest.raises(MovieLensFileNotFoundError, match="download=True"):
        load_movielens("ml-20m", cache=tmp_path / "empty")
