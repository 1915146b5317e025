"""A source's identity and what can be checked of it before anything runs.

``source_files`` and ``source_fingerprint`` say what a source reads and whether it changed;
``check_source`` reads only file footers (schemas and, where present, row-group statistics) and
runs before Ray or MLflow start, so a bad source costs a second, not a cluster's start. The class
rules (``class_count``) are the same whether decided from footers or, in ingest, from the rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.config import BUILTIN_CLASSES, DataConfig
from schemas.errors import DataError
from tasks import arrow_io
from tasks.reader import check_store, filesystem, scheme_prefix

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def source_files(cfg: DataConfig) -> list[str]:
    """The files ``cfg.source`` reads (none for the bundled digits): paths, or URIs for a parquet
    source in an object store.

    Raises:
        DataError: a missing file or directory, or an object store that does not answer, named with the fix.
    """
    if cfg.source == "digits":
        return []
    if cfg.source == "fashion_mnist":
        root = Path(cfg.path or FASHION_MNIST_DIR)
        files = [root / name for pair in FASHION_MNIST_FILES.values() for name in pair]
        for f in files:
            if not f.exists():
                raise DataError(f"data.path: {f} not found; install Debian's dataset-fashion-mnist or point data.path at the IDX files")
        return [str(f) for f in files]
    if not cfg.path:
        raise DataError("data.path is not set: the parquet source needs a directory holding train/ and test/ Parquet")
    check_store(cfg.path, "data.path")
    return [f for split in ("train", "test") for f in parquet_files(cfg.path, split)]


def source_fingerprint(cfg: DataConfig) -> str:
    """Identity of the source's current content: every file's name, size and modification time
    (cheap enough to check before each resume; a changed file changes it; one listing request per
    file group on an object store)."""
    import sklearn

    files = source_files(cfg)
    infos = filesystem(files[0])[0].get_file_info([filesystem(f)[1] for f in files]) if files else []
    parts = [f"{f}:{i.size}:{i.mtime_ns}" for f, i in zip(files, infos)]
    # How ingest lays its splits out: outputs of an earlier layout are not reused for a new run.
    parts.append(f"ingest layout: streamed, seeded assignment, row groups of {arrow_io.ROWS_PER_GROUP}")
    if cfg.source == "digits":
        parts.append(f"sklearn {sklearn.__version__}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class SourceShape(NamedTuple):
    """What the footers tell of the examples, for the network's pre-flight; None where they do not."""

    input_shape: Optional[tuple[int, ...]]  # (C, H, W) for images, (D,) for rows
    num_classes: Optional[int]


BUILTIN_SHAPES = {"fashion_mnist": (1, 28, 28), "digits": (1, 8, 8)}


def check_source(cfg: DataConfig) -> SourceShape:
    """What can be checked of the source without reading its rows, before Ray starts: files exist,
    Parquet files are readable and have the configured columns with usable types; every file has the
    same features; and, where the footers carry column statistics (min, max, null count), no null
    labels or features and labels that fit the class rules of ``class_count``. Footers do not count
    NaN or inf: normalize checks those in the rows (``normalize.nonfinite``).

    Returns:
        The examples' shape and class count, as far as the footers tell.

    Raises:
        DataError: naming the file or field and the fix.
    """
    source_files(cfg)
    if cfg.source != "parquet":
        return SourceShape(BUILTIN_SHAPES[cfg.source], BUILTIN_CLASSES)
    footers = []
    for split in ("train", "test"):
        for f in parquet_files(cfg.path, split):
            schema = arrow_io.read_schema(f)
            check_columns(schema, cfg, str(f))
            footers.append(_read_footer(f, split, schema, cfg))
    _check_same_features(footers, cfg)
    for foot in footers:
        if foot.label_nulls:
            raise DataError(f"data.label_column: {foot.label_nulls} null label(s) in the {foot.split} split ({foot.path}, "
                            "counted by its footer); fill or drop them")
        if foot.feature_nulls:
            column, n = foot.feature_nulls
            if foot.wide is None:
                raise DataError(f"data.features_column: the footer of {foot.path} counts {n} null value(s) or empty "
                                f"row(s) in '{column}'; fill or drop those rows")
            raise DataError(f"data.features_columns: {n} null value(s) in column '{column}' of {foot.path}; fill or drop those rows")
    _check_footer_labels(footers, cfg)
    width = next((f.width for f in footers if f.width is not None), None)
    shape = tuple(cfg.image_shape) if cfg.image_shape else (width,) if width else None
    train = [f for f in footers if f.split == "train"]
    known = train and all(f.label_range is not None for f in train)
    return SourceShape(shape, cfg.num_classes or (int(max(f.label_range[1] for f in train)) + 1 if known else None))


def class_count(cfg: DataConfig, y_train: np.ndarray, y_test: np.ndarray) -> int:
    """The number of classes the model is built for, with the labels checked against it.

    fashion_mnist and digits: 10. A parquet source: ``data.num_classes`` when set, else the largest
    train label + 1; either way every class 0..k-1 must appear in the train split, so a recipe's
    count that the labels contradict is refused rather than training classes without rows.

    Raises:
        DataError: an empty split, a label outside [0, k), a class without train rows, or names
            (``data.class_names``) that do not match the count.
    """
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) == 0:
            raise DataError(f"data: the {split} split is empty; it needs at least one row")
    given = cfg.num_classes if cfg.source == "parquet" else BUILTIN_CLASSES
    top = int(y_train.max())
    k = given or max(top + 1, 1)
    for split, y in (("train", y_train), ("test", y_test)):
        bad = (y < 0) | (y >= k)
        if bad.any():
            raise DataError(_outside(cfg, k, f"{int(bad.sum())} {split} label(s)", f"the {split} split", int(y[bad][0])))
    if cfg.source != "parquet":
        return k
    _checkclass_count(cfg, top, "in the train split")
    missing = np.flatnonzero(np.bincount(y_train, minlength=k) == 0)
    if len(missing):
        c = int(missing[0])
        said = f"data.num_classes={k}" if cfg.num_classes else f"the largest train label is {k - 1}"
        raise DataError(f"data.label_column: class {c} never appears in the train split ({said}); every class 0..{k - 1} "
                        f"needs train rows -- renumber the labels or add rows of class {c}")
    return k


def _outside(cfg: DataConfig, k: Optional[int], what: str, where: str, example: int) -> str:
    """The line for labels outside [0, k) (k None: not known yet, below 0), with the fix that fits where k came from."""
    if example < 0:
        fix = "class ids count from 0; fix the labels"
    elif cfg.source == "parquet" and cfg.num_classes:
        fix = "fix the labels, or remove data.num_classes to take the count from the train labels"
    elif cfg.source == "parquet":
        fix = f"the train labels stop at {k - 1} and every test class needs train rows; fix the labels"
    else:
        fix = "fix the labels"
    return f"data.label_column: {what} {f'outside [0, {k})' if k else 'below 0'} in {where} (e.g. {example}); {fix}"


def _checkclass_count(cfg: DataConfig, top: int, where: str) -> None:
    """A parquet source's count rules that the largest train label ``top`` alone decides."""
    if cfg.num_classes and top + 1 < cfg.num_classes:
        raise DataError(f"data.num_classes={cfg.num_classes} but the train labels use only {top + 1} classes (largest "
                        f"label {top}, {where}); remove data.num_classes to take the count from the labels, or fix the labels")
    k = cfg.num_classes or top + 1
    if k < 2:
        raise DataError(f"data.label_column: the train labels hold only class 0 ({where}); a classifier needs at least 2 classes")
    if cfg.class_names is not None and len(cfg.class_names) != k:
        raise DataError(f"data.class_names has {len(cfg.class_names)} names but the train labels hold {k} classes "
                        f"(0..{k - 1}); give one name per class, in label order")


class _Footer(NamedTuple):
    """What one Parquet file's footer says of its rows; None where it does not say."""

    path: Path
    split: str
    wide: Optional[list[str]]  # a wide table's feature columns; None: one list column
    width: Optional[int]  # features per row: a fixed-size list's size, else leaf values / rows when no entry is null
    label_range: Optional[tuple[int, int]]  # (min, max) over the row groups that hold rows
    label_nulls: Optional[int]
    feature_nulls: Optional[tuple[str, int]]  # (column, count) of the first feature column with nulls


def _read_footer(path: str, split: str, schema: pa.Schema, cfg: DataConfig) -> _Footer:
    md = pq.read_metadata(path)  # read_schema has just read this footer: it parses
    wide = feature_columns(schema, cfg, str(path))
    label = _leaf_stats(md, cfg.label_column)
    feats = [(c, _leaf_stats(md, c)) for c in (wide or [cfg.features_column])]
    nulls = next(((c, st.nulls) for c, st in feats if st.nulls), None)
    width = None
    if wide is not None:
        width = len(wide)
    elif pa.types.is_fixed_size_list(schema.field(cfg.features_column).type):
        width = schema.field(cfg.features_column).type.list_size
    elif feats[0][1].nulls == 0 and md.num_rows and feats[0][1].values % md.num_rows == 0:
        # With no null or empty entry, a list column's leaf holds exactly sum(row lengths) values;
        # a ratio that is not whole means rows of different lengths, which ingest names from the rows.
        width = feats[0][1].values // md.num_rows
    return _Footer(path, split, wide, width, label.range, label.nulls, nulls)


class _LeafStats(NamedTuple):
    values: Optional[int]  # leaf values, a null or empty list counting one
    nulls: Optional[int]
    range: Optional[tuple]


def _leaf_stats(md: pq.FileMetaData, name: str) -> _LeafStats:
    """Row-group statistics of the top-level column ``name`` (its one leaf: a list column's values),
    summed over the row groups that hold rows; a count or range is None when some row group lacks it."""
    leaves = [i for i in range(md.num_columns) if md.schema.column(i).path == name
              or md.schema.column(i).path.startswith(f"{name}.")]
    if len(leaves) != 1:
        return _LeafStats(None, None, None)
    chunks = [md.row_group(g).column(leaves[0]) for g in range(md.num_row_groups) if md.row_group(g).num_rows]
    stats = [c.statistics for c in chunks]
    nulls = sum(s.null_count for s in stats) if all(s is not None and s.has_null_count for s in stats) else None
    known = chunks and all(s is not None and s.has_min_max for s in stats)
    return _LeafStats(sum(c.num_values for c in chunks), nulls,
                      (min(s.min for s in stats), max(s.max for s in stats)) if known else None)


def _check_same_features(footers: list[_Footer], cfg: DataConfig) -> None:
    """Every file holds the first train file's features: the same columns, the same count per row."""
    first = footers[0]
    for foot in footers[1:]:
        have = set(foot.wide or [cfg.features_column])
        want = set(first.wide or [cfg.features_column])
        if want - have:
            raise DataError(f"data.path: {foot.path} lacks feature column '{sorted(want - have)[0]}' that {first.path} has; "
                            "give every file of both splits the same feature columns")
        if have - want:
            raise DataError(f"data.path: {foot.path} has feature column '{sorted(have - want)[0]}' that {first.path} lacks; "
                            "give every file of both splits the same feature columns, or list them in data.features_columns")
        if None not in (foot.width, first.width) and foot.width != first.width:
            raise DataError(f"data.path: {foot.path} has {foot.width} features per row, {first.path} has {first.width}; "
                            f"give every file of both splits the same {first.width} features")


def _check_footer_labels(footers: list[_Footer], cfg: DataConfig) -> None:
    """``class_count``'s rules, decided from the label column's row-group min and max where every
    train file records them (the label values themselves are read by ingest)."""
    train = [f for f in footers if f.split == "train" and f.label_range is not None]
    known = len(train) == sum(f.split == "train" for f in footers)
    top = max(f.label_range[1] for f in train) if known and train else None
    k = cfg.num_classes or (top + 1 if top is not None else None)
    for foot in footers:
        if foot.label_range is None:
            continue
        for label in foot.label_range:
            if label < 0 or (k is not None and label >= k):
                raise DataError(_outside(cfg, k, f"{foot.split} label(s)", f"{foot.path} by its footer", label))
    if top is not None:
        where = f"by the footer of {train[0].path}" if len(train) == 1 else f"by the footers of {train[0].path.rsplit('/', 1)[0]}"
        _checkclass_count(cfg, top, where)


def parquet_files(root: str, split: str) -> list[str]:
    """A parquet source's files of ``split``: ``<root>/<split>/*.parquet`` in name order, or
    ``<root>/<split>.parquet``; paths, or URIs where ``root`` is one."""
    fs, inner = filesystem(root)
    base, prefix = inner.rstrip("/"), scheme_prefix(root)
    folder, single = fs.get_file_info([f"{base}/{split}", f"{base}/{split}.parquet"])
    if folder.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder.path))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        if not files:
            raise DataError(f"data.path: {root.rstrip('/')}/{split} holds no .parquet files; put the {split} split there")
        return [prefix + f for f in files]
    if single.type == pafs.FileType.File:
        return [prefix + single.path]
    raise DataError(f"data.path: {root} has no {split}/ directory or {split}.parquet file; put the {split} split there")


def feature_columns(schema: pa.Schema, cfg: DataConfig, where: str) -> Optional[list[str]]:
    """How a Parquet table holds its features: None for one list column (``data.features_column``),
    else the wide table's feature columns in order (``data.features_columns``, or every numeric
    column except the label).

    Raises:
        DataError: a listed column is missing or not numeric, or the table has no feature columns.
    """
    names = schema.names
    if cfg.features_columns is None and cfg.features_column in names:
        return None
    if cfg.features_columns is not None:
        missing = [c for c in cfg.features_columns if c not in names]
        if missing:
            raise DataError(f"data.features_columns: column '{missing[0]}' not in {where} (columns: {names}); "
                            "list the table's feature columns")
        wrong = [c for c in cfg.features_columns if not is_numeric(schema.field(c).type)]
        if wrong:
            raise DataError(f"data.features_columns: '{wrong[0]}' in {where} has type {schema.field(wrong[0]).type}, "
                            "expected numbers; convert it to float32 or leave it out of the list")
        if cfg.label_column in cfg.features_columns:
            raise DataError(f"data.features_columns: lists the label column '{cfg.label_column}'; leave it out")
        return list(cfg.features_columns)
    numeric = [n for n in names if n != cfg.label_column and is_numeric(schema.field(n).type)]
    if not numeric:
        raise DataError(f"data.features_column: column '{cfg.features_column}' not in {where} and no numeric columns "
                        f"besides the label (columns: {names}); set data.features_column or data.features_columns")
    return numeric


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def check_columns(schema: pa.Schema, cfg: DataConfig, where: str) -> None:
    names = schema.names
    if cfg.label_column not in names:
        raise DataError(f"data.label_column: column '{cfg.label_column}' not in {where} (columns: {names}); set data.label_column")
    label = schema.field(cfg.label_column).type
    if not pa.types.is_integer(label):
        raise DataError(f"data.label_column: '{cfg.label_column}' in {where} has type {label}, expected an integer class id; cast it to int64")
    if feature_columns(schema, cfg, where) is not None:
        return
    feats = schema.field(cfg.features_column).type
    if not (pa.types.is_list(feats) or pa.types.is_fixed_size_list(feats) or pa.types.is_large_list(feats)):
        raise DataError(f"data.features_column: '{cfg.features_column}' in {where} has type {feats}, expected a list of floats")
    value = feats.value_type
    if not is_numeric(value):
        raise DataError(f"data.features_column: '{cfg.features_column}' in {where} holds {value} values, expected numbers; "
                        "convert the features to float32")
