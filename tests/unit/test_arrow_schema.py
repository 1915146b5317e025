"""Arrow schema contract checks at stage boundaries."""

import pyarrow as pa
import pytest

from schemas import arrow
from schemas.errors import SchemaMismatch


def test_field_by_field_diff():
    expected = arrow.example_schema(4)
    actual = pa.schema([pa.field("features", pa.list_(pa.float64(), 4)), pa.field("extra", pa.string())])
    assert arrow.diff(actual, expected) == [
        "field 'features': type fixed_size_list<item: double>[4], expected fixed_size_list<item: float>[4]",
        "missing field 'label' (int64)",
        "unexpected field 'extra' (string)",
    ]
    with pytest.raises(SchemaMismatch, match="stage x: schema differs from the contract: field 'features'"):
        arrow.check(actual, expected, "stage x")


def test_list_child_name_and_metadata_do_not_matter():
    renamed = pa.schema([pa.field("features", pa.list_(pa.field("element", pa.float32()), 4)),
                         pa.field("label", pa.int64())], metadata={"x": "y"})
    arrow.check(renamed, arrow.example_schema(4), "ok")
    with pytest.raises(SchemaMismatch, match=r"\[5\]"):
        arrow.check(arrow.example_schema(5), arrow.example_schema(4), "width")


def test_split_files_are_written_without_dictionary_pages_and_read_back_exactly(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from tasks import arrow_io

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(300, 16)), 1).astype(np.float32)  # few distinct values: pyarrow would dictionary-encode
    y = rng.integers(0, 3, 300)
    arrow_io.write_file(arrow_io.to_table(x, y, arrow.example_schema(16)), tmp_path / "a.parquet")
    pq.write_table(arrow_io.to_table(x, y, arrow.example_schema(16)), tmp_path / "default.parquet")
    row_group = pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0)
    encodings = {e for c in range(row_group.num_columns) for e in row_group.column(c).encodings}
    default = set(pq.ParquetFile(tmp_path / "default.parquet").metadata.row_group(0).column(0).encodings)
    assert "RLE_DICTIONARY" in default and not encodings & {"RLE_DICTIONARY", "PLAIN_DICTIONARY"}
    table = pq.read_table(tmp_path / "a.parquet")
    assert np.array_equal(arrow_io.features_numpy(table), x) and np.array_equal(arrow_io.labels_numpy(table), y)
