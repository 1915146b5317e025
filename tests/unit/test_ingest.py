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
from tasks.ingest import ingest
from tasks.source import check_source
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
    assert ds.num_classes == 10  # a built-in source keeps its count with data.num_classes unset
    xt, _ = _read(ds.splits["train"])
    xv, _ = _read(ds.splits["val"])
    assert len(xt) + len(xv) == 1797 - 359
    assert ds.splits["train"].rows + ds.splits["val"].rows + ds.splits["test"].rows == 1797


def _write_user(tmp_path, train: pa.Table, test: pa.Table | None = None, statistics: bool = True):
    """train/ and test/ under ``tmp_path``; ``statistics=False`` writes footers without column
    statistics, as some writers do, so only the rows can tell what is wrong."""
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    pq.write_table(train, tmp_path / "train" / "p.parquet", write_statistics=statistics)
    pq.write_table(test if test is not None else train, tmp_path / "test" / "p.parquet", write_statistics=statistics)
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
    ("three_rows", r"only 3 training rows; need at least 2 after the val split"),
    ("truncated", r"\S+/train/p.parquet: not a readable Parquet file .*replace or remove it"),
    ("not_parquet", r"\S+/train/p.parquet: not a readable Parquet file"),
    ("out_of_range", r"data.label_column: 20 train label\(s\) outside \[0, 3\) in the train split \(e.g. 7\); fix the labels, "
                     r"or remove data.num_classes"),
    ("ragged", r"rows of different lengths in the train split \(3..4\)"),
    ("schema_differs", r"test split's schema differs from train: field 'y': type int32, expected int64"),
    ("empty", r"the train split is empty"),
])
def test_user_parquet_contract_errors(tmp_path, kind, match):
    """The rows' own checks: the files carry no column statistics, so the footers cannot tell."""
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
    elif kind == "three_rows":
        train = _table(n=3, labels=pa.array([0, 1, 2]))
    elif kind in ("truncated", "not_parquet"):
        train = good
    elif kind == "schema_differs":
        train, test = good, _table(label_type=pa.int32())
    else:
        train = good.slice(0, 0)
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", train, test, statistics=False)
    part = tmp_path / "in" / "train" / "p.parquet"
    if kind == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    elif kind == "not_parquet":
        part.write_text("x,y\n0.5,1\n")
    cfg = DataConfig(source="parquet", path=path, features_column="x", label_column="y", num_classes=3,
                     val_fraction=0.5 if kind == "three_rows" else 0.1)
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


@pytest.mark.parametrize("statistics, match", [
    (True, r"data.features_columns: 1 null value\(s\) in column 'alcohol' of \S+/train/p.parquet; fill or drop"),
    (False, r"data.features_columns: 1 null value\(s\) in \S+/train/p.parquet; fill or drop"),
])
def test_a_null_in_a_wide_table_is_named(tmp_path, statistics, match):
    (tmp_path / "in").mkdir()
    table = _wide()
    table = table.set_column(0, "alcohol", pa.array([None] + table.column("alcohol").to_pylist()[1:], pa.float64()))
    path = _write_user(tmp_path / "in", table, statistics=statistics)
    with pytest.raises(DataError, match=match):
        ingest(DataConfig(source="parquet", path=path, num_classes=3), tmp_path / "out", seed=0)


def test_missing_fashion_mnist_dir_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="install Debian's dataset-fashion-mnist or point data.path"):
        ingest(DataConfig(source="fashion_mnist", path=str(tmp_path)), tmp_path / "o", seed=0)


def _features(layout: str, d: int, n: int = 30) -> pa.Table:
    """``n`` rows of ``d`` features and labels 0, 1, 2 as a list column, a fixed-size list column or a wide table."""
    x = np.random.default_rng(d).normal(size=(n, d)).astype(np.float32)
    y = pa.array(np.arange(n) % 3)
    if layout == "list":
        return pa.table({"features": pa.array(x.tolist(), pa.list_(pa.float32())), "label": y})
    if layout == "fixed":
        return pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d), "label": y})
    return pa.table({**{f"f{i}": x[:, i] for i in range(d)}, "label": y})


@pytest.mark.parametrize("layout, match", [
    ("list", r"data.path: \S+/test/p.parquet has 5 features per row, \S+/train/p.parquet has 4; give every file of both "
             r"splits the same 4 features"),
    ("fixed", r"data.path: \S+/test/p.parquet has 5 features per row, \S+/train/p.parquet has 4"),
    ("wide", r"data.path: \S+/test/p.parquet has feature column 'f4' that \S+/train/p.parquet lacks; give every file of "
             r"both splits the same feature columns, or list them in data.features_columns"),
])
def test_a_test_split_with_other_features_is_found_before_ray_starts(tmp_path, layout, match):
    """Issue 21: a test split with 5 features under a train split of 4 ended in an ArrowTypeError
    traceback from inside the ingest stage (a wide table's extra column passed unnoticed)."""
    path = _write_user(tmp_path, _features(layout, 4), _features(layout, 5))
    with pytest.raises(DataError, match=match):
        check_source(DataConfig(source="parquet", path=path))


def test_a_test_split_with_other_features_is_named_from_the_rows_without_footer_statistics(tmp_path):
    """Issue 21: without statistics the footers cannot count a list column's features; the rows
    must still give one line, not the ArrowTypeError of writing the test split."""
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", _features("list", 4), _features("list", 5), statistics=False)
    check_source(DataConfig(source="parquet", path=path))
    with pytest.raises(DataError, match=r"data.path: the test split's rows have 5 features, the train split's 4; "
                                        r"give both splits the same features"):
        ingest(DataConfig(source="parquet", path=path), tmp_path / "out", seed=0)


def _labelled(labels, features=None) -> pa.Table:
    n = len(labels)
    feats = features if features is not None else pa.array(np.ones((n, 4)).tolist(), pa.list_(pa.float64()))
    return pa.table({"features": feats, "label": pa.array(labels, pa.int64())})


@pytest.mark.parametrize("case, settings, match", [
    ("null label", {}, r"data.label_column: 1 null label\(s\) in the train split \(\S+/train/p.parquet, counted by its "
                       r"footer\); fill or drop them"),
    ("null feature row", {}, r"data.features_column: the footer of \S+/train/p.parquet counts 1 null value\(s\) or "
                             r"empty row\(s\) in 'features'; fill or drop those rows"),
    ("null feature value", {}, r"the footer of \S+/train/p.parquet counts 1 null value\(s\) or empty row\(s\)"),
    ("label above num_classes", {"num_classes": 3}, r"data.label_column: train label\(s\) outside \[0, 3\) in "
                                                     r"\S+/train/p.parquet by its footer \(e.g. 7\); fix the labels, or "
                                                     r"remove data.num_classes"),
    ("negative label", {}, r"data.label_column: train label\(s\) outside \[0, 3\) in \S+/train/p.parquet by its "
                           r"footer \(e.g. -1\); class ids count from 0; fix the labels"),
    ("test class not in train", {}, r"data.label_column: test label\(s\) outside \[0, 3\) in \S+/test/p.parquet by its "
                                    r"footer \(e.g. 5\); the train labels stop at 2 and every test class needs train rows"),
])
def test_footer_statistics_find_bad_labels_and_nulls_before_ray_starts(tmp_path, case, settings, match):
    """Issue 21: null labels, null features and labels out of range surfaced only inside the ingest
    stage, after Ray had started; the footers' min, max and null counts tell them first."""
    labels, test_labels, feats = list(np.arange(30) % 3), None, None
    if case == "null label":
        labels[0] = None
    elif case == "null feature row":
        feats = pa.array([None] + [[1.0, 2, 3, 4]] * 29, pa.list_(pa.float64()))
    elif case == "null feature value":
        feats = pa.array([[1.0, None, 3, 4]] + [[1.0, 2, 3, 4]] * 29, pa.list_(pa.float64()))
    elif case == "label above num_classes":
        labels[3] = 7
    elif case == "negative label":
        labels[3] = -1
    else:
        test_labels = labels[:-1] + [5]
    train = _labelled(labels, feats)
    path = _write_user(tmp_path, train, _labelled(test_labels) if test_labels else train)
    with pytest.raises(DataError, match=match):
        check_source(DataConfig(source="parquet", path=path, **settings))


def test_the_class_count_comes_from_the_labels_when_the_recipe_does_not_say(tmp_path):
    """Issue 21: 3-class data under the default data.num_classes=10 trained a 10-way head without a word."""
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", _labelled(np.arange(30) % 3), statistics=False)
    ds = ingest(DataConfig(source="parquet", path=path), tmp_path / "out", seed=0)
    assert ds.num_classes == 3


@pytest.mark.parametrize("statistics", [True, False])
def test_a_num_classes_the_train_labels_do_not_reach_is_refused(tmp_path, statistics):
    """Issue 21: data.num_classes=10 over labels 0..2 gave seven classes with support 0 and ten served probabilities."""
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", _labelled(np.arange(30) % 3), statistics=statistics)
    cfg = DataConfig(source="parquet", path=path, num_classes=10)
    match = (r"data.num_classes=10 but the train labels use only 3 classes \(largest label 2, .*\); remove "
             r"data.num_classes to take the count from the labels, or fix the labels")
    with pytest.raises(DataError, match=match):
        ingest(cfg, tmp_path / "out", seed=0)
    if statistics:
        with pytest.raises(DataError, match=match):  # before Ray starts
            check_source(cfg)
    else:
        check_source(cfg)  # no statistics: only the rows can tell


@pytest.mark.parametrize("num_classes, said", [(None, "the largest train label is 2"), (3, "data.num_classes=3")])
def test_a_class_without_train_rows_is_named(tmp_path, num_classes, said):
    """Issue 21: a class between 0 and the largest label with no train rows is a head output that never learns."""
    (tmp_path / "in").mkdir()
    path = _write_user(tmp_path / "in", _labelled(np.arange(30) % 3 * (np.arange(30) % 3 != 1)), _labelled([0, 2, 2]))
    with pytest.raises(DataError, match=rf"data.label_column: class 1 never appears in the train split \({said}\); every "
                                        r"class 0..2 needs train rows -- renumber the labels or add rows of class 1"):
        ingest(DataConfig(source="parquet", path=path, num_classes=num_classes), tmp_path / "out", seed=0)


def test_class_names_must_match_the_count_taken_from_the_labels(tmp_path):
    path = _write_user(tmp_path, _labelled(np.arange(30) % 3))
    with pytest.raises(DataError, match=r"data.class_names has 2 names but the train labels hold 3 classes \(0..2\); "
                                        r"give one name per class"):
        check_source(DataConfig(source="parquet", path=path, class_names=["a", "b"]))


def test_a_built_in_source_keeps_its_class_count():
    with pytest.raises(ValueError, match=r"data.num_classes=5: the digits source has 10 classes; remove data.num_classes"):
        DataConfig(source="digits", num_classes=5)


def _source_files(root, split, x, y, file_rows, group_rows):
    (root / split).mkdir(parents=True)
    for i, s in enumerate(range(0, len(y), file_rows)):
        table = pa.table({"x": pa.array(list(x[s:s + file_rows]), pa.list_(pa.float32())), "y": pa.array(y[s:s + file_rows])})
        pq.write_table(table, root / split / f"f{i:02d}.parquet", row_group_size=group_rows)


def test_a_parquet_source_over_many_files_and_groups_lands_once_per_row(tmp_path):
    """Read batch by batch and dealt to train/val by a seeded assignment: every source train row is
    in exactly one of them, whole; the test rows keep their order and the max_test_rows cut."""
    rng = np.random.default_rng(1)
    n, d = 1000, 3
    x = np.column_stack([np.arange(n), rng.normal(size=(n, d - 1))]).astype(np.float32)  # feature 0: the row number
    y = rng.integers(0, 4, n)
    _source_files(tmp_path / "in", "train", x, y, file_rows=300, group_rows=70)
    _source_files(tmp_path / "in", "test", x[:200], y[:200], file_rows=90, group_rows=40)
    ds = ingest(DataConfig(source="parquet", path=str(tmp_path / "in"), features_column="x", label_column="y",
                           max_test_rows=150, val_fraction=0.25), tmp_path / "out", seed=0)
    (xt, yt), (xv, yv), (xs, ys) = (_read(ds.splits[s]) for s in ("train", "val", "test"))
    ids = np.concatenate([xt[:, 0], xv[:, 0]]).astype(int)
    assert sorted(ids) == list(range(n)) and len(xv) == 250
    np.testing.assert_array_equal(np.concatenate([xt, xv]), x[ids])
    np.testing.assert_array_equal(np.concatenate([yt, yv]), y[ids])
    np.testing.assert_array_equal(xs, x[:150])
    np.testing.assert_array_equal(ys, y[:150])


def test_split_writer_cuts_any_stream_into_files_and_groups(tmp_path, monkeypatch):
    from tasks import arrow_io

    monkeypatch.setattr(arrow_io, "ROWS_PER_GROUP", 4)
    monkeypatch.setattr(arrow_io, "ROWS_PER_FILE", 12)
    schema = arrow.example_schema(2)
    x = np.arange(58, dtype=np.float32).reshape(29, 2)
    writer = arrow_io.SplitWriter(tmp_path / "s", schema)
    for a, b in [(0, 3), (3, 3), (3, 14), (14, 15), (15, 29)]:
        writer.write(arrow_io.to_table(x[a:b], np.arange(a, b), schema))
    info = writer.close()
    files = [pq.ParquetFile(tmp_path / "s" / f) for f in info.files]
    assert info.rows == 29 and [f.metadata.num_rows for f in files] == [12, 12, 5]
    assert [f.metadata.row_group(g).num_rows for f in files for g in range(f.metadata.num_row_groups)] == [4, 4, 4, 4, 4, 4, 4, 1]
    got = pa.concat_tables([f.read() for f in files])
    np.testing.assert_array_equal(got.column("label").to_numpy(), np.arange(29))
    empty = arrow_io.SplitWriter(tmp_path / "e", schema).close()
    assert empty.rows == 0 and len(empty.files) == 1 and pq.read_table(tmp_path / "e" / empty.files[0]).schema.equals(schema)


def test_ingest_of_a_parquet_source_never_holds_its_features(tmp_path):
    """A 48 MB source (12,000 rows x 1,024 float32 features in 8 files): the peak of NumPy's and
    Arrow's allocations during ingest stays under a third of it (the old ingest held it all, twice).
    Measured in a fresh process, on a second ingest: the first imports what ingest imports lazily."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    n, d = 12000, 1024
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 10, n)
    _source_files(tmp_path / "in", "train", x, y, file_rows=1500, group_rows=256)
    _source_files(tmp_path / "in", "test", x[:500], y[:500], file_rows=500, group_rows=256)
    del x
    code = f"""
import tracemalloc, pyarrow as pa
from pathlib import Path
from schemas.config import DataConfig
from tasks.ingest import ingest
cfg = DataConfig(source="parquet", path={str(tmp_path / 'in')!r}, features_column="x", label_column="y")
tracemalloc.start()
ingest(cfg, Path({str(tmp_path / 'out')!r}), 0)  # the first pass also imports what ingest imports lazily
tracemalloc.reset_peak()
base = tracemalloc.get_traced_memory()[0]
ingest(cfg, Path({str(tmp_path / 'again')!r}), 0)
print(tracemalloc.get_traced_memory()[1] - base, pa.default_memory_pool().max_memory())
"""
    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    numpy_peak, arrow_peak = int(out[0]), int(out[1])
    assert numpy_peak < n * d * 4 / 3 and arrow_peak < n * d * 4 / 3, (numpy_peak, arrow_peak)
