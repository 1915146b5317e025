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
    """Read ``cfg.source`` and write train/val/test splits under ``out_dir``, batch by batch.

    The val split is a seeded random share of the training rows; the test split is kept apart.
    The class count is the built-in sources' 10, else ``data.num_classes``, else the train labels'
    largest + 1 (``class_count``).

    Memory: a parquet source is read one row group at a time, in two passes (the labels alone,
    then every column) and written through ``arrow_io.SplitWriter``; beside a batch, ingest holds
    the labels (8 bytes a row) and the rows' split assignment (1 byte a row), never the features.
    The built-in sources are small and read whole.

    Raises:
        DataError: a missing file or a source that breaks the data contract.
    """
    feature_names = None
    if cfg.source == "fashion_mnist":
        train, test = (_in_memory(*xy) for xy in _fashion_mnist(Path(cfg.path or FASHION_MNIST_DIR)))
        image_shape, pixel_max = (1, 28, 28), 255.0
        class_names = cfg.class_names or FASHION_MNIST_CLASSES
    elif cfg.source == "digits":
        train, test = (_in_memory(*xy) for xy in _digits())
        image_shape, pixel_max = (1, 8, 8), 16.0
        class_names = cfg.class_names or [str(i) for i in range(10)]
    else:
        if not cfg.path:
            raise DataError("data.path is not set: the parquet source needs a directory holding train/ and test/ Parquet")
        train, test, feature_names = _parquet(cfg)
        image_shape, class_names, pixel_max = cfg.image_shape, cfg.class_names, None
    if cfg.shift is not None and not image_shape:
        raise DataError("data.shift: corruptions need image data; set data.image_shape for a parquet source of images "
                        "or remove data.shift")
    y_train, y_test = train.labels(), test.labels()
    num_classes = class_count(cfg, y_train, y_test)

    rng = np.random.default_rng(seed)
    n = len(y_train)
    kept = np.arange(n)
    if cfg.max_train_rows is not None and cfg.max_train_rows < n:
        kept = np.sort(rng.choice(n, size=cfg.max_train_rows, replace=False))
    n_val = max(1, int(round(cfg.val_fraction * len(kept))))
    if len(kept) - n_val < 2:
        raise DataError(f"data: only {len(kept)} training rows; need at least 2 after the val split -- add rows or lower data.val_fraction")
    role = np.zeros(n, dtype=np.int8)  # 0: left out, 1: train, 2: val
    role[kept] = TRAIN
    role[kept[rng.choice(len(kept), size=n_val, replace=False)]] = VAL
    n_test = len(y_test) if cfg.max_test_rows is None else min(cfg.max_test_rows, len(y_test))
    del y_train, y_test

    d = train.num_features()
    meta = {"bnflow.image_shape": ",".join(map(str, image_shape)) if image_shape else ""}
    schema = arrow.example_schema(d, meta)
    writers = {name: arrow_io.SplitWriter(out_dir / name, schema) for name in ("train", "val", "test")}
    start, top = 0, 0.0
    for x, y in train.batches():
        r = role[start : start + len(y)]
        start += len(y)
        for name, code in (("train", TRAIN), ("val", VAL)):
            writers[name].write(arrow_io.to_table(x[r == code], y[r == code], schema))
        if pixel_max is None and cfg.shift is not None and len(y):  # the corruptions' pixel scale, when not known
            top = max(top, float(np.nanmax(x)))
    shift_rows = cfg.shift.rows if cfg.shift is not None else 0
    head: list[tuple[np.ndarray, np.ndarray]] = []  # the first test rows, for the corrupted copies
    start = 0
    for x, y in test.batches():
        x, y = x[: n_test - start], y[: n_test - start]
        if test.num_features() != d:
            raise DataError(f"data.path: the test split's rows have {test.num_features()} features, the train split's "
                            f"{d}; give both splits the same features")
        writers["test"].write(arrow_io.to_table(x, y, schema))
        if start < shift_rows:
            head.append((x[: shift_rows - start], y[: shift_rows - start]))
        start += len(y)
        if start >= n_test:
            break
    splits = {name: w.close() for name, w in writers.items()}
    if cfg.shift is not None:
        x_head = np.concatenate([h[0] for h in head]) if head else np.zeros((0, d), np.float32)
        y_head = np.concatenate([h[1] for h in head]) if head else np.zeros(0, np.int64)
        pixel_max = pixel_max if pixel_max is not None else max(top, 1e-12)
        for name, (x, y) in shifted_splits(cfg.shift, x_head, y_head, image_shape, pixel_max).items():
            splits[name] = arrow_io.write_split(arrow_io.to_table(x, y, schema), out_dir / name)
    return Dataset(splits=splits, num_features=d, num_classes=num_classes, image_shape=image_shape,
                   feature_names=feature_names, class_names=class_names,
                   features_column=cfg.features_column if cfg.source == "parquet" and not feature_names else "features")


TRAIN, VAL = 1, 2
BATCH_ROWS = 16384  # rows per batch of a built-in source held in memory
SOURCE_BATCH_ROWS = 4096  # the most rows of a user's file decoded at once, whatever its row groups


class _in_memory:
    """A built-in source's split, already in memory, read in batches as a parquet source is."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def labels(self) -> np.ndarray:
        return self.y

    def num_features(self) -> int:
        return self.x.shape[1]

    def batches(self):
        for s in range(0, max(len(self.y), 1), BATCH_ROWS):
            yield self.x[s : s + BATCH_ROWS], self.y[s : s + BATCH_ROWS]


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
    """(train, test, the wide table's feature columns or None): the splits of a parquet source,
    read lazily, one row group at a time."""
    check_source(cfg)  # every file's footer: readable, the configured columns, numeric types
    first = parquet_files(cfg.path, "train")[0]
    wide = feature_columns(arrow_io.read_schema(first), cfg, first)
    train, test = (_ParquetSplit(cfg, split, parquet_files(cfg.path, split), wide) for split in ("train", "test"))
    differ = arrow.diff(test.schema().remove_metadata(), train.schema().remove_metadata())
    if differ:
        raise DataError(f"data.path: the test split's schema differs from train: {'; '.join(differ)}")
    return train, test, wide


class _ParquetSplit:
    """One split of a parquet source: its labels (one pass over the label column), then its rows as
    (features (n, D) float32, labels (n,) int64) batches, one row group at a time, each checked
    against the data contract as it is read."""

    def __init__(self, cfg: DataConfig, split: str, files: list[str], wide: Optional[list[str]]):
        self.cfg, self.split, self.files, self.wide = cfg, split, files, wide
        self._d: Optional[int] = None

    def schema(self) -> pa.Schema:
        """The (features, label) schema its rows take (from the first file's footer)."""
        return _as_list_column(arrow_io.read_schema(self.files[0]).empty_table(), self.cfg, self.wide, self.files[0]).schema

    def labels(self) -> np.ndarray:
        parts, nulls = [], 0
        for f in self.files:
            for table in Split([f]).batches(columns=[self.cfg.label_column], max_rows=SOURCE_BATCH_ROWS):
                col = table.column(0)
                nulls += col.null_count
                parts.append(col.to_numpy(zero_copy_only=False))
        if nulls:
            raise DataError(f"data.label_column: {nulls} null label(s) in the {self.split} split; fill or drop them")
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def num_features(self) -> int:
        if self._d is None:
            self._d = next((len(x[0]) for x, _ in self.batches() if len(x)), 0)
        return self._d

    def batches(self):
        for f in self.files:
            for table in Split([f]).batches(max_rows=SOURCE_BATCH_ROWS):
                yield self._rows(_as_list_column(table, self.cfg, self.wide, f), f)

    def _rows(self, table: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray]:
        cfg, split = self.cfg, self.split
        labels = table.column(cfg.label_column).combine_chunks()
        feats = table.column(cfg.features_column).combine_chunks()
        if feats.null_count:
            raise DataError(f"data.features_column: {feats.null_count} null feature row(s) in the {split} split "
                            f"(in a row group of {where}); fill or drop them")
        if table.num_rows == 0:
            return np.zeros((0, self._d or 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        lengths = pc.list_value_length(feats).to_numpy(zero_copy_only=False)
        lo, hi = int(lengths.min()), int(lengths.max())
        if self._d is not None:
            lo, hi = min(lo, self._d), max(hi, self._d)
        if lo != hi:
            raise DataError(f"data.features_column: rows of different lengths in the {split} split ({lo}..{hi}); "
                            "every row needs the same number of features")
        d = self._d = hi
        if cfg.image_shape is not None and int(np.prod(cfg.image_shape)) != d:
            raise DataError(f"data.image_shape={list(cfg.image_shape)} has {int(np.prod(cfg.image_shape))} values but rows have {d} features")
        values = pc.list_flatten(feats)
        if values.null_count:
            raise DataError(f"data.features_column: {values.null_count} null value(s) inside feature rows of the {split} split "
                            f"(in a row group of {where}); fill or drop them")
        x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)
        return x, labels.to_numpy(zero_copy_only=False).astype(np.int64)


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
