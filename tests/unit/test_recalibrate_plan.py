"""How the recalibrate stage picks and shares out its calibration rows (pure logic, real Parquet files)."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas import arrow
from schemas.config import RecalibrateConfig
from schemas.errors import DataError
from tasks import arrow_io
from tasks.recalibrate import DEFAULT_ROWS, batch_plan, calibration_rows, rank_batches, read_rows


def test_default_rows_are_ten_thousand_or_the_whole_split_and_more_than_exist_is_an_error():
    assert calibration_rows(RecalibrateConfig(), 54_000) == DEFAULT_ROWS == 10_000
    assert calibration_rows(RecalibrateConfig(), 1_293) == 1_293
    assert calibration_rows(RecalibrateConfig(rows=500), 1_293) == 500
    with pytest.raises(DataError, match=r"recalibrate.rows=2000: split 'train' holds only 1293 rows"):
        calibration_rows(RecalibrateConfig(rows=2000), 1_293)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_every_row_is_calibrated_once_whatever_the_worker_count(world):
    plan = batch_plan([5, 11, 3], rows=17, batch_size=4, seed=3)
    assert sorted(set(plan["order"].tolist())) == sorted(plan["order"].tolist())  # without replacement
    assert plan["bounds"] == [0, 4, 8, 12, 17]  # the trailing single row joined the last batch
    runs = [rank_batches(plan, r, world) for r in range(world)]
    covered = [b for lo, hi in runs for b in range(lo, hi)]
    assert covered == list(range(len(plan["bounds"]) - 1))  # contiguous, in order, none twice
    assert batch_plan([5, 11, 3], rows=17, batch_size=4, seed=3)["order"].tolist() == plan["order"].tolist()


def test_read_rows_returns_the_asked_rows_in_order(tmp_path):
    x = np.arange(19 * 2, dtype=np.float32).reshape(19, 2)
    files, sizes, start = [], [5, 11, 3], 0
    for i, n in enumerate(sizes):
        f = tmp_path / f"part-{i}.parquet"
        pq.write_table(arrow_io.to_table(x[start:start + n], np.zeros(n), arrow.example_schema(2)), f, row_group_size=2)
        files.append(str(f))
        start += n
    index = np.array([18, 0, 7, 5, 4, 16])
    assert np.array_equal(read_rows(files, index), x[index])
