"""Arrow schemas exchanged between stages: the contract checked at every stage boundary."""

from __future__ import annotations

import pyarrow as pa

from schemas.errors import SchemaMismatch

SCHEMA_VERSION = "1"
FEATURES = "features"
LABEL = "label"


def example_schema(num_features: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """Rows of one example each: a fixed-size float32 feature vector and an int64 class label."""
    return pa.schema(
        [pa.field(FEATURES, pa.list_(pa.float32(), num_features), nullable=False),
         pa.field(LABEL, pa.int64(), nullable=False)],
        metadata={"bnflow.schema_version": SCHEMA_VERSION, **(metadata or {})},
    )


def same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Type equality that ignores a list's child field name ('item' vs Parquet's 'element')."""
    if pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b):
        return a.list_size == b.list_size and same_type(a.value_type, b.value_type)
    if pa.types.is_list(a) and pa.types.is_list(b):
        return same_type(a.value_type, b.value_type)
    return a == b


def diff(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Field-by-field differences of names and types. Nullability and metadata are not compared:
    Parquet writers differ in how they record nullability, and null values are refused where data
    enters (ingest)."""
    lines = []
    exp = {f.name: f for f in expected}
    act = {f.name: f for f in actual}
    for name, f in exp.items():
        if name not in act:
            lines.append(f"missing field '{name}' ({f.type})")
        elif not same_type(act[name].type, f.type):
            lines.append(f"field '{name}': type {act[name].type}, expected {f.type}")
    for name, f in act.items():
        if name not in exp:
            lines.append(f"unexpected field '{name}' ({f.type})")
    return lines


def check(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise SchemaMismatch with a field-by-field diff when ``actual`` breaks the contract."""
    problems = diff(actual, expected)
    if problems:
        raise SchemaMismatch(f"{where}: schema differs from the contract: " + "; ".join(problems))
