"""Ingest on real sources (Debian's Fashion-MNIST files, scikit-learn's digits) and a user's Parquet,
with the data contract's errors."""

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import arrow
from schemas.config import DataConfig
from schemas.errors import DataError
from tasks.ingest import check_source, ingest
from tests.conftest import FASHION_MNIST


def _read(info):
    t = pq.read_table(info.path)
    return t.column("features").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1), t.column("label").to_numpy()


def test_fashion_mnist_idx_files_and_deterministic_split(tmp_path):
    cfg = DataConfig(source="fashion_mnist", max_train_rows=500, max_test_rows=200, val_fraction=0.2)
    a = ingest(cfg, tmp_path / "a", seed=3)
    b = ingest(cfg, tmp_path / "b", seed=3)
    c = ingest(cfg, tmp_path / "c", seed=4)
    assert {k: v.rows for k, v in a.splits.items()} == {"train": 400, "val": 100, "test": 200}
    assert a.image_shape == (1, 28, 28) and a.num_features == 784
    assert all(a.splits[s].digest == b.splits[s].digest for s in a.splits)
    assert a.splits["train"].digest != c.splits["train"].digest
    assert a.splits["test"].digest == c.splits["test"].digest  # the test split never moves
    # Independent check of the first test image against the raw IDX bytes.
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        first = np.frombuffer(f.read()[16 : 16 + 784], dtype=np.uint8).astype(np.float32)
    x, y = _read(a.splits["test"])
    np.testing.assert_array_equal(x[0], first)
    arrow.check(pq.read_schema(next((tmp_path / "a" / "test").glob("*.parquet"))), arrow.example_schema(784), "t")


def test_digits_split_sizes(tmp_path):
    ds = ingest(DataConfig(source="digits"), tmp_path, seed=0)
    xt, _ = _read(ds.splits["train"])
    xv, _ = _read(ds.splits["val"])
    assert len(xt) + len(xv) == 1797 - 359
    assert ds.splits["train"].rows + ds.splits["val"].rows + ds.splits["test"].rows == 1797


def _write_user(tmp_path, train: pa.Table, test: pa.Table | None = None):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    pq.write_table(train, tmp_path / "train" / "p.parquet")
    pq.write_table(test if test is not None else train, tmp_path / "test" / "p.parquet")
    return str(tmp_path)


def _table(n=20, d=4, label_type=pa.int64(), labels=None, feats=None):
    rng = np.random.default_rng(0)
    feats = feats if feats is not None else pa.array(rng.normal(size=(n, d)).tolist(), pa.list_(pa.float64()))
    labels = labels if labels is not None else pa.array(rng.integers(0, 3, n), label_type)
    return pa.table({"x": feats, "y": labels})


def test_user_parquet_with_configured_columns(tmp_path):
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", _table())
    ds = ingest(DataConfig(source="parquet", path=path, features_column="x", label_column="y", num_classes=3),
                tmp_path / "out", seed=0)
    assert ds.num_features == 4 and ds.splits["test"].rows == 20


@pytest.mark.parametrize("kind, match", [
    ("missing", r"data.features_column: column 'x' not in \S+/train/p.parquet and no numeric columns besides the label "
                r"\(columns: \['feat', 'y'\]\); set data.features_column or data.features_columns"),
    ("float_label", r"data.label_column: 'y' in \S+/train/p.parquet has type double, expected an integer"),
    ("string_features", r"data.features_column: 'x' in \S+/train/p.parquet holds string values, expected numbers"),
    ("null_label", r"data.label_column: 1 null label\(s\) in the train split"),
    ("null_row", r"data.features_column: 1 null feature row\(s\) in the train split"),
    ("null_value", r"data.features_column: 1 null value\(s\) inside feature rows of the train split"),
    ("single_row", r"only 1 training rows; need at least 2"),
    ("truncated", r"\S+/train/p.parquet: not a readable Parquet file .*replace or remove it"),
    ("not_parquet", r"\S+/train/p.parquet: not a readable Parquet file"),
    ("out_of_range", r"label\(s\) outside \[0, 3\)"),
    ("ragged", r"rows of different lengths in the train split \(3..4\)"),
    ("schema_differs", r"test split's schema differs from train: field 'y': type int32, expected int64"),
    ("empty", r"the train split is empty"),
])
def test_user_parquet_contract_errors(tmp_path, kind, match):
    good = _table()
    test = None
    if kind == "missing":
        train = good.rename_columns(["feat", "y"])
    elif kind == "float_label":
        train = _table(labels=pa.array(np.zeros(20)))
    elif kind == "out_of_range":
        train = _table(labels=pa.array(np.full(20, 7), pa.int64()))
    elif kind == "ragged":
        train = _table(feats=pa.array([[1.0, 2, 3, 4]] * 19 + [[1.0, 2, 3]], pa.list_(pa.float64())))
    elif kind == "string_features":
        train = _table(feats=pa.array([["0.5", "1", "2", "3"]] * 20, pa.list_(pa.string())))
    elif kind == "null_label":
        train = _table(labels=pa.array([None] + [1] * 19, pa.int64()))
    elif kind == "null_row":
        train = _table(feats=pa.array([None] + [[1.0, 2, 3, 4]] * 19, pa.list_(pa.float64())))
    elif kind == "null_value":
        train = _table(feats=pa.array([[1.0, None, 3, 4]] + [[1.0, 2, 3, 4]] * 19, pa.list_(pa.float64())))
    elif kind == "single_row":
        train = good.slice(0, 1)
    elif kind in ("truncated", "not_parquet"):
        train = good
    elif kind == "schema_differs":
        train, test = good, _table(label_type=pa.int32())
    else:
        train = good.slice(0, 0)
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", train, test)
    part = tmp_path / "in" / "train" / "p.parquet"
    if kind == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    elif kind == "not_parquet":
        part.write_text("x,y\n0.5,1\n")
    cfg = DataConfig(source="parquet", path=path, features_column="x", label_column="y", num_classes=3)
    with pytest.raises(DataError, match=match):
        ingest(cfg, tmp_path / "out", seed=0)
    if kind in ("missing", "float_label", "string_features", "truncated", "not_parquet"):
        with pytest.raises(DataError, match=match):  # found from the footers alone, before Ray starts
            check_source(cfg)


def _wide(n=30):
    """A wide table as users export it: one numeric column per feature, the label, a text column."""
    rng = np.random.default_rng(1)
    return pa.table({"alcohol": rng.normal(13, 1, n), "ash": rng.normal(2.4, 0.3, n).astype(np.float32),
                     "proline": rng.integers(300, 1700, n), "label": rng.integers(0, 3, n),
                     "note": pa.array(["x"] * n)})


def _split_features(ds, split):
    t = pq.read_table(ds.splits[split].path)
    return np.asarray(t.column(arrow.FEATURES).to_pylist(), dtype=np.float64), np.asarray(t.column(arrow.LABEL).to_pylist())


def test_a_wide_table_takes_every_numeric_column_but_the_label_in_order(tmp_path):
    (tmp_path / "in").mkdir()
    table = _wide()
    path = _write_user(tmp_path / "in", table)
    ds = ingest(DataConfig(source="parquet", path=path, num_classes=3), tmp_path / "out", seed=0)
    assert ds.feature_names == ["alcohol", "ash", "proline"] and ds.num_features == 3
    x, y = _split_features(ds, "test")  # the test split keeps the file's row order
    expected = np.column_stack([np.asarray(table.column(c).to_pylist(), dtype=np.float64) for c in ds.feature_names])
    np.testing.assert_allclose(x, expected.astype(np.float32), rtol=0, atol=0)
    assert (y == np.asarray(table.column("label").to_pylist())).all()


def test_listed_feature_columns_are_taken_in_the_listed_order(tmp_path):
    (tmp_path / "in").mkdir()
    table = _wide()
    path = _write_user(tmp_path / "in", table)
    ds = ingest(DataConfig(source="parquet", path=path, num_classes=3, features_columns=["proline", "alcohol"]),
                tmp_path / "out", seed=0)
    assert ds.feature_names == ["proline", "alcohol"]
    x, _ = _split_features(ds, "test")
    np.testing.assert_array_equal(x[:, 0], np.asarray(table.column("proline").to_pylist(), dtype=np.float32))


@pytest.mark.parametrize("columns, match", [
    (["alcohol", "colour"], r"data.features_columns: column 'colour' not in \S+/train/p.parquet"),
    (["alcohol", "note"], r"data.features_columns: 'note' in \S+/train/p.parquet has type string, expected numbers"),
    (["alcohol", "label"], r"data.features_columns: lists the label column 'label'; leave it out"),
])
def test_wrong_feature_columns_are_named_before_ray_starts(tmp_path, columns, match):
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", _wide())
    with pytest.raises(DataError, match=match):
        check_source(DataConfig(source="parquet", path=path, num_classes=3, features_columns=columns))


def test_a_null_in_a_wide_table_is_named(tmp_path):
    (tmp_path / "in").mkdir()
    table = _wide()
    table = table.set_column(0, "alcohol", pa.array([None] + table.column("alcohol").to_pylist()[1:], pa.float64()))
    path = _write_user(tmp_path / "in", table)
    with pytest.raises(DataError, match=r"data.features_columns: 1 null value\(s\) in \S+/train/p.parquet; fill or drop"):
        ingest(DataConfig(source="parquet", path=path, num_classes=3), tmp_path / "out", seed=0)


def test_missing_fashion_mnist_dir_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="install Debian's dataset-fashion-mnist or point data.path"):
        ingest(DataConfig(source="fashion_mnist", path=str(tmp_path)), tmp_path / "o", seed=0)
