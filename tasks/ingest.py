"""Ingest stage: a source -> raw Parquet splits (train, val, test) of the example schema."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import arrow
from schemas.artifacts import Dataset
from schemas.config import DataConfig
from schemas.errors import DataError
from tasks import arrow_io
from tasks.reader import Split
from tasks.source import (FASHION_MNIST_DIR, FASHION_MNIST_FILES, check_source, class_count, feature_columns,
                          parquet_files)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
DIGITS_TEST_FRACTION = 0.2


def ingest(cfg: DataConfig, out_dir: Path, seed: int) -> Dataset:
    """Read ``cfg.source`` and write train/val/test splits under ``out_dir``.

    The val split is a seeded random share of the training rows; the test split is kept apart.
    The class count is the built-in sources' 10, else ``data.num_classes``, else the train labels'
    largest + 1 (``class_count``).

    Raises:
        DataError: a missing file or a source that breaks the data contract.
    """
    feature_names = None
    if cfg.source == "fashion_mnist":
        (x_train, y_train), (x_test, y_test) = _fashion_mnist(Path(cfg.path or FASHION_MNIST_DIR))
        image_shape, pixel_max = (1, 28, 28), 255.0
        class_names = cfg.class_names or FASHION_MNIST_CLASSES
    elif cfg.source == "digits":
        (x_train, y_train), (x_test, y_test) = _digits()
        image_shape, pixel_max = (1, 8, 8), 16.0
        class_names = cfg.class_names or [str(i) for i in range(10)]
    else:
        if not cfg.path:
            raise DataError("data.path is not set: the parquet source needs a directory holding train/ and test/ Parquet")
        (x_train, y_train), (x_test, y_test), feature_names = _parquet(cfg)
        image_shape, class_names = cfg.image_shape, cfg.class_names
        pixel_max = float(max(np.nanmax(x_train), 1e-12)) if len(x_train) else 1.0
    if cfg.shift is not None and not image_shape:
        raise DataError("data.shift: corruptions need image data; set data.image_shape for a parquet source of images "
                        "or remove data.shift")
    num_classes = class_count(cfg, y_train, y_test)

    rng = np.random.default_rng(seed)
    if cfg.max_train_rows is not None and cfg.max_train_rows < len(y_train):
        keep = np.sort(rng.permutation(len(y_train))[: cfg.max_train_rows])
        x_train, y_train = x_train[keep], y_train[keep]
    if cfg.max_test_rows is not None:
        x_test, y_test = x_test[: cfg.max_test_rows], y_test[: cfg.max_test_rows]

    perm = rng.permutation(len(y_train))
    n_val = max(1, int(round(cfg.val_fraction * len(y_train))))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train_idx) < 2:
        raise DataError(f"data: only {len(y_train)} training rows; need at least 2 after the val split -- add rows or lower data.val_fraction")

    d = x_train.shape[1]
    meta = {"bnflow.image_shape": ",".join(map(str, image_shape)) if image_shape else ""}
    schema = arrow.example_schema(d, meta)
    parts = {"train": (x_train[train_idx], y_train[train_idx]), "val": (x_train[val_idx], y_train[val_idx]),
             "test": (x_test, y_test)}
    if cfg.shift is not None:
        parts.update(shifted_splits(cfg.shift, x_test, y_test, image_shape, pixel_max))
    splits = {name: arrow_io.write_split(arrow_io.to_table(x, y, schema), out_dir / name) for name, (x, y) in parts.items()}
    return Dataset(splits=splits, num_features=d, num_classes=num_classes, image_shape=image_shape,
                   feature_names=feature_names, class_names=class_names,
                   features_column=cfg.features_column if cfg.source == "parquet" and not feature_names else "features")


def shifted_splits(cfg, x_test: np.ndarray, y_test: np.ndarray, image_shape, pixel_max: float) -> dict:
    """{split name: (features, labels)}: the first ``cfg.rows`` raw test images under every corruption
    and severity of ``cfg`` (``tasks.shift``), in the raw pixel scale of the source."""
    from tasks import shift

    x = x_test[: cfg.rows].astype(np.float64).reshape(-1, *image_shape) / pixel_max
    y = y_test[: cfg.rows]
    out = {}
    for corruption in cfg.corruptions:
        for severity in ((1,) if corruption == "inverted" else cfg.severities):
            bad = shift.corrupt(x, corruption, severity, cfg.seed) * pixel_max
            out[shift.split_name(corruption, severity)] = (bad.reshape(len(y), -1).astype(np.float32), y)
    return out

def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"data.path: {path} not found; install Debian's dataset-fashion-mnist or point data.path at the IDX files")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", raw[:4])
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x}, expected unsigned bytes (0x08)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(root: Path):
    out = []
    for split in ("train", "test"):
        img_file, lbl_file = FASHION_MNIST_FILES[split]
        x = _read_idx(root / img_file).reshape(-1, 28 * 28).astype(np.float32)
        y = _read_idx(root / lbl_file).astype(np.int64)
        out.append((x, y))
    return out


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    # The test split must not move when the training seed changes: fixed permutation.
    perm = np.random.default_rng(12345).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    x = x.astype(np.float32)
    return (x[train], y[train].astype(np.int64)), (x[test], y[test].astype(np.int64))

def _parquet(cfg: DataConfig):
    check_source(cfg)  # every file's footer: readable, the configured columns, numeric types
    root = Path(cfg.path)
    tables = {}
    first = parquet_files(root, "train")[0]
    wide = feature_columns(arrow_io.read_schema(first), cfg, str(first))
    for split in ("train", "test"):
        files = parquet_files(root, split)
        parts = [_as_list_column(table, cfg, wide, str(f)) for f in files
                 for table in Split([str(f)]).batches()]
        try:
            tables[split] = pa.concat_tables(parts, promote_options="permissive")
        except pa.ArrowException as e:
            raise DataError(f"data.path: the files of the {split} split have different schemas ({e}); give them one schema") from None
    schemas = {s: t.schema for s, t in tables.items()}
    differ = arrow.diff(schemas["test"].remove_metadata(), schemas["train"].remove_metadata())
    if differ:
        raise DataError(f"data.path: the test split's schema differs from train: {'; '.join(differ)}")
    (x_train, y_train), (x_test, y_test) = [_parquet_split(tables[s], cfg, s) for s in ("train", "test")]
    if x_test.shape[1] != x_train.shape[1]:  # list columns without a fixed size: the footers may not tell
        raise DataError(f"data.path: the test split's rows have {x_test.shape[1]} features, the train split's "
                        f"{x_train.shape[1]}; give both splits the same features")
    return (x_train, y_train), (x_test, y_test), wide


def _as_list_column(table: pa.Table, cfg: DataConfig, wide: Optional[list[str]], where: str) -> pa.Table:
    """(features, label) with the features as one list column, whichever shape the file has."""
    if wide is None:
        return table.select([cfg.features_column, cfg.label_column])
    missing = [c for c in wide if c not in table.column_names]
    if missing:
        raise DataError(f"data.path: {where} lacks feature column '{missing[0]}' that the first train file has; "
                        "give every file the same columns")
    cols = [pc.cast(table.column(c), pa.float32()) for c in wide]
    if any(c.null_count for c in cols):
        nulls = sum(c.null_count for c in cols)
        raise DataError(f"data.features_columns: {nulls} null value(s) in {where}; fill or drop those rows")
    flat = np.column_stack([c.to_numpy(zero_copy_only=False) for c in cols]).reshape(-1)
    feats = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), len(wide))
    return pa.table({cfg.features_column: feats.cast(pa.list_(pa.float32())), cfg.label_column: table.column(cfg.label_column)})


def _parquet_split(table: pa.Table, cfg: DataConfig, split: str):
    if table.num_rows == 0:
        raise DataError(f"data: the {split} split is empty; it needs at least one row")
    labels = table.column(cfg.label_column)
    if labels.null_count:
        raise DataError(f"data.label_column: {labels.null_count} null label(s) in the {split} split; fill or drop them")
    feats = table.column(cfg.features_column).combine_chunks()
    if feats.null_count:
        raise DataError(f"data.features_column: {feats.null_count} null feature row(s) in the {split} split; fill or drop them")
    lengths = pc.list_value_length(feats).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise DataError(
            f"data.features_column: rows of different lengths in the {split} split ({int(lengths.min())}..{int(lengths.max())}); "
            "every row needs the same number of features")
    d = int(lengths[0])
    if cfg.image_shape is not None and int(np.prod(cfg.image_shape)) != d:
        raise DataError(f"data.image_shape={list(cfg.image_shape)} has {int(np.prod(cfg.image_shape))} values but rows have {d} features")
    values = pc.list_flatten(feats)
    if values.null_count:
        raise DataError(f"data.features_column: {values.null_count} null value(s) inside feature rows of the {split} split; fill or drop them")
    x = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    return x, labels.to_numpy().astype(np.int64)
