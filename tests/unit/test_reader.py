"""The one reader (tasks/reader.py) against plain NumPy indexing of the rows it was given."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas import arrow
from schemas.errors import DataError
from tasks import arrow_io
from tasks.reader import Split, list_parquet


@pytest.fixture
def split(tmp_path):
    """23 rows of 3 features over files of 10, 9 and 4 rows, in row groups of 4."""
    x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    y = np.arange(23) % 5
    files, start = [], 0
    for i, n in enumerate((10, 9, 4)):
        f = tmp_path / "s" / f"part-{i:05d}.parquet"
        f.parent.mkdir(exist_ok=True)
        pq.write_table(arrow_io.to_table(x[start:start + n], y[start:start + n], arrow.example_schema(3)), f, row_group_size=4)
        files.append(str(f))
        start += n
    return files, x, y


def test_rows_are_numbered_over_the_files_and_read_by_row_group(split):
    files, x, y = split
    s = Split(files)
    assert s.rows == 23 and s.file_rows == [10, 9, 4]
    assert [g.rows for g in s.row_groups] == [4, 4, 2, 4, 4, 1, 4]
    batches = list(s.batches(transform=lambda t: (arrow_io.features_numpy(t), arrow_io.labels_numpy(t))))
    assert len(batches) == 7  # one per row group, never a whole file
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def test_take_returns_the_asked_rows_in_the_asked_order(split):
    files, x, y = split
    index = np.array([22, 0, 9, 10, 3, 18, 19, 5, 5])
    table = Split(files).take(index)
    np.testing.assert_array_equal(arrow_io.features_numpy(table), x[index])
    np.testing.assert_array_equal(arrow_io.labels_numpy(table), y[index])
    assert Split(files).take(np.array([], dtype=np.int64)).num_rows == 0
    with pytest.raises(IndexError):
        Split(files).take(np.array([23]))


def test_a_slice_reads_like_numpy_slicing(split):
    files, x, y = split
    s = Split(files)
    for a, b in [(0, 23), (3, 4), (2, 17), (22, 23), (5, 5)]:
        table = s.slice(a, b)
        np.testing.assert_array_equal(arrow_io.features_numpy(table).reshape(-1, x.shape[1]), x[a:b])
        np.testing.assert_array_equal(arrow_io.labels_numpy(table), y[a:b])


def test_listing_and_unreadable_files(split, tmp_path):
    files, _, _ = split
    assert list_parquet(str(tmp_path / "s")) == files
    assert list_parquet(str(tmp_path / "nowhere")) == []
    bad = tmp_path / "s" / "part-00009.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="part-00009.parquet: not a readable Parquet file"):
        Split(files + [str(bad)])


def test_a_relative_path_keeps_the_users_spelling(split, tmp_path, monkeypatch):
    """Paths in messages and in the source fingerprint stay as the user wrote them."""
    from tasks.reader import scheme_prefix
    from tasks.source import parquet_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "train" / "a.parquet").write_bytes(b"")
    assert parquet_files("src", "train") == ["src/train/a.parquet"]
    assert list_parquet("s") == sorted(f"s/part-{i:05d}.parquet" for i in range(3))
    assert scheme_prefix("s3://bucket/prefix/") == "s3://" and scheme_prefix("relative/dir") == ""

