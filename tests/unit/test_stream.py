"""tasks/stream.py: a train worker's share of a split, streamed through a bounded shuffle buffer.

References are built independently from the rows written (NumPy on the in-memory array), never
from the module's own arithmetic."""

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas import arrow
from schemas.errors import DataError
from tasks import arrow_io
from tasks.stream import ShardStream, rank_ranges

CLASSES = 10


def _write(tmp_path, x, y, file_rows, group_rows):
    table = arrow_io.to_table(x, y, arrow.example_schema(x.shape[1]))
    files = []
    for i, start in enumerate(range(0, len(y), file_rows)):
        f = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(start, file_rows), f, row_group_size=group_rows)
        files.append(str(f))
    return files


@pytest.fixture
def sorted_split(tmp_path):
    """3000 rows sorted by label (300 per class); a row's first feature is its row number."""
    n = 3000
    y = np.repeat(np.arange(CLASSES), n // CLASSES)
    x = np.stack([np.arange(n), y, np.zeros(n)], axis=1).astype(np.float32)
    return _write(tmp_path, x, y, file_rows=1024, group_rows=64), x, y


def _rows(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


@pytest.mark.parametrize("rows,chunk,world", [(3000, 64, 2), (3000, 64, 3), (1000, 64, 4), (10, 64, 3), (7, 1, 7), (640, 64, 5)])
def test_rank_ranges_deal_every_rank_the_same_number_of_distinct_rows(rows, chunk, world):
    for epoch in range(3):
        per_rank = []
        for rank in range(world):
            got = np.concatenate([np.arange(a, b) for a, b in rank_ranges(rows, chunk, rank, world, epoch)] or [np.array([], int)])
            assert len(got) == rows // world
            per_rank.append(got)
        every = np.concatenate(per_rank)
        assert len(np.unique(every)) == len(every)  # disjoint
        assert every.min(initial=0) >= 0 and every.max(initial=0) < rows
        assert len(every) == rows - rows % world  # only rows % world rows are left out


def test_chunks_rotate_to_another_rank_each_epoch():
    a0 = {r for a, b in rank_ranges(3000, 64, 0, 2, 0) for r in range(a, b)}
    a1 = {r for a, b in rank_ranges(3000, 64, 0, 2, 1) for r in range(a, b)}
    assert len(a0 & a1) < 100  # rank 0's rows of epoch 1 are (but for the tail) rank 1's of epoch 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_is_a_permutation_of_the_ranks_rows_in_full_batches(sorted_split, world):
    files, x, y = sorted_split
    batch = 50
    seen = []
    for rank in range(world):
        s = ShardStream(files, rank, world, (3,), buffer_rows=256)
        batches = list(s.epoch(1, seed=7, batch_size=batch))
        assert len(batches) == len(y) // world // batch == s.steps(batch)
        assert all(xb.shape == (batch, 3) and xb.dtype == torch.float32 and yb.dtype == torch.int64 for xb, yb in batches)
        xs, ys = _rows(batches)
        ids = xs[:, 0].astype(int)
        np.testing.assert_array_equal(xs, x[ids])  # each row whole: features with their own label
        np.testing.assert_array_equal(ys, y[ids])
        seen.append(ids)
    every = np.concatenate(seen)
    assert len(np.unique(every)) == len(every)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_files_of_uneven_sizes_still_give_equal_shares_of_every_class(tmp_path, world):
    """Files of 9, 1, 0, 17 and 13 rows (an empty and a one-row file), groups of 4: chunks cross
    group and file boundaries; every rank gets its share of every stretch of the split."""
    n = 40
    y = np.sort(np.arange(n) % 4)
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    table = arrow_io.to_table(x, y, arrow.example_schema(3))
    files, start = [], 0
    for i, k in enumerate([9, 1, 0, 17, 13]):
        f = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(start, k), f, row_group_size=4)
        files.append(str(f))
        start += k
    seen = []
    for rank in range(world):
        xs, ys = _rows(ShardStream(files, rank, world, (3,), buffer_rows=8).epoch(0, 0, 1))
        assert len(ys) == n // world
        np.testing.assert_array_equal(ys, y[xs[:, 0].astype(int)])
        # dealt by chunks of one group: each class's share is within about a chunk of 1/world of it
        assert np.all(np.abs(np.bincount(ys, minlength=4) - np.bincount(y) / world) <= 2 * 4)
        seen += xs[:, 0].tolist()
    assert len(set(seen)) == len(seen) == n // world * world


def test_the_buffer_only_reorders_the_rows_of_the_epoch(sorted_split):
    files, _, y = sorted_split
    batch = 10  # 1500 rows per rank: every row lands in a batch
    small = _rows(ShardStream(files, 0, 2, (3,), buffer_rows=100).epoch(2, 3, batch))[0][:, 0]
    whole = _rows(ShardStream(files, 0, 2, (3,), buffer_rows=10**6).epoch(2, 3, batch))[0][:, 0]
    assert sorted(small) == sorted(whole) and list(small) != list(whole)


def test_the_order_is_a_function_of_seed_epoch_and_rank(sorted_split):
    files, _, _ = sorted_split

    def ids(seed, epoch, rank=0, buffer=256):
        return _rows(ShardStream(files, rank, 2, (3,), buffer).epoch(epoch, seed, 50))[0][:, 0].tolist()

    assert ids(1, 1) == ids(1, 1)  # a resumed run sees the batches an uninterrupted one saw
    assert ids(1, 1) != ids(1, 2) and ids(1, 1) != ids(2, 1)


def _mean_tv(labels, batch, classes=CLASSES):
    p = np.bincount(labels, minlength=classes) / len(labels)
    n = len(labels) // batch
    return np.mean([0.5 * np.abs(np.bincount(labels[i * batch:(i + 1) * batch], minlength=classes) / batch - p).sum()
                    for i in range(n)])


def test_a_split_sorted_by_label_reaches_every_batch_mixed(tmp_path):
    """Mean total-variation distance between each batch's label mix and the split's: a stored-order
    read is far off (~0.9), a full shuffle is off by sampling alone; the buffer, holding 128 row groups
    (as the default does) and a fifth of the rank's rows, comes within 0.03 of the full shuffle."""
    n, batch = 40960, 128
    y = np.repeat(np.arange(CLASSES), n // CLASSES)
    x = np.stack([np.arange(n), y], axis=1).astype(np.float32)
    files = _write(tmp_path, x, y, file_rows=8192, group_rows=32)
    stored = _mean_tv(y, batch)
    full = _mean_tv(y[np.random.default_rng(0).permutation(n)], batch)
    streamed = np.mean([_mean_tv(_rows(ShardStream(files, r, 2, (2,), buffer_rows=128 * 32).epoch(1, 0, batch))[1], batch)
                        for r in range(2)])
    assert stored > 0.85 and full < 0.12
    assert streamed < full + 0.03, (stored, full, streamed)


def test_validation_parts_cover_the_split_in_stored_order(sorted_split):
    files, x, _ = sorted_split
    parts = [_rows(ShardStream(files, r, 3, (1, 1, 3), 64).in_order(batch_size=500))[0] for r in range(3)]
    assert all(p.shape[1:] == (1, 1, 3) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts).reshape(-1, 3), x)


def test_stopping_early_ends_the_reading_thread(sorted_split):
    files, _, _ = sorted_split
    before = threading.active_count()
    it = ShardStream(files, 0, 1, (3,), 64).epoch(1, 0, 10)
    next(it)
    it.close()
    assert threading.active_count() == before


def test_a_file_that_breaks_mid_epoch_is_a_data_error_in_the_loop(sorted_split):
    files, _, _ = sorted_split
    s = ShardStream(files, 0, 1, (3,), 64)
    with open(files[1], "r+b") as fh:  # footers were read; now a data page is garbage
        fh.seek(8)
        fh.write(b"\xff" * 4096)
    with pytest.raises(DataError, match="cannot be read"):
        list(s.epoch(1, 0, 10))
