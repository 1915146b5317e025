"""``pipeline.adapt.read_sample``: adapt's seeded sample of new rows, read file by file from only the
row groups that hold it, against NumPy indexing of the rows written."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.adapt import read_sample
from schemas.errors import DataError


def test_the_sample_is_the_plans_rows_in_order_across_files_of_different_column_types(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    pq.write_table(pa.table({"a": np.round(x[:120, 0] * 100).astype(np.int64), "b": x[:120, 1], "c": x[:120, 2]}),
                   tmp_path / "p0.parquet", row_group_size=50)
    pq.write_table(pa.table({"a": np.round(x[120:, 0] * 100).astype(np.float64), "b": x[120:, 1], "c": x[120:, 2]}),
                   tmp_path / "p1.parquet", row_group_size=50)
    want = np.column_stack([np.round(x[:, 0] * 100), x[:, 1], x[:, 2]]).astype(np.float32)
    got, bounds = read_sample(str(tmp_path), ["a", "b", "c"], 3, "features", rows=70, batch_size=32, seed=5)
    order = np.random.default_rng(5).permutation(300)[:70]  # batch_plan's sample, independently
    np.testing.assert_array_equal(got, want[order])
    assert bounds == [0, 32, 64, 70]


def test_rows_below_two_name_the_flag(tmp_path):
    pq.write_table(pa.table({"features": pa.array([[1.0, 2.0]] * 5)}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"--rows 1: BN statistics need at least 2 rows"):
        read_sample(str(tmp_path), None, 2, "features", rows=1, batch_size=8, seed=0)
