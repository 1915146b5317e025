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
