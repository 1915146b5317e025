"""Arrow/Parquet helpers shared by the stages: the split writer, digests, zero-copy NumPy views.
Reading rows is ``tasks.reader``'s; footers are read here (``check_split``, ``read_schema``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import arrow
from schemas.artifacts import SplitInfo
from schemas.errors import DataError

ROWS_PER_FILE = 16384  # several files per split, so stage tasks read and write them in parallel
# The unit a reader reads and a shuffle buffer draws from: several per file, small enough that a
# batch of them stays far below a worker's memory (2048 rows of 784 float32 features: 6.4 MB).
ROWS_PER_GROUP = 2048


def write_file(table: pa.Table, path: str | Path) -> None:
    """One Parquet file of a split, written the way every stage writes them: snappy pages without
    dictionary encoding (pyarrow's default tries a dictionary per column, and feature columns
    rarely gain from one). On a standardized Fashion-MNIST split (``python -m benchmarks.parquet_io``)
    writing took 0.24x the time and a worker's shard read 0.45x, for files 1.74x the size."""
    pq.write_table(table, path, use_dictionary=False, row_group_size=ROWS_PER_GROUP)


def write_tables(tables, path: str | Path, schema: pa.Schema) -> int:
    """One Parquet file from a stream of tables (each becomes its row groups), written as
    ``write_file`` writes; returns the rows written. Nothing holds more than one table at a time."""
    rows = 0
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=ROWS_PER_GROUP)
            rows += table.num_rows
    return rows


def to_table(x: np.ndarray, y: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Features (N, D) float32 and labels (N,) as a table of the example schema (no copy of x)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    feats = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
    return pa.Table.from_arrays([feats, pa.array(y.astype(np.int64))], schema=schema)


def features_numpy(table_or_batch) -> np.ndarray:
    """The features column as an (N, D) float32 array, zero-copy where Arrow allows."""
    col = table_or_batch.column(arrow.FEATURES)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    values = col.values if col.offset == 0 else col.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, d)


def features_tensor(table_or_batch):
    """The features column as a float32 torch tensor (copied only when Arrow's buffer is read-only)."""
    import torch

    return torch.from_numpy(np.require(features_numpy(table_or_batch), requirements="W"))


def labels_numpy(table_or_batch) -> np.ndarray:
    col = table_or_batch.column(arrow.LABEL)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


def file_digest(path: str | Path) -> str:
    """sha256 of one file's full bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def combine_digests(file_digests: list[str]) -> str:
    """A split's digest: sha256 over its files' sha256s in file-name order. Writers that hash each
    file as they write it need no second read of the split."""
    return hashlib.sha256("".join(file_digests).encode()).hexdigest()


def digest_dir(path: Path) -> str:
    """The digest of every Parquet file of a split (full content, names excluded)."""
    return combine_digests([file_digest(f) for f in sorted(Path(path).glob("*.parquet"))])


def write_split(table: pa.Table, path: Path) -> SplitInfo:
    """Write a split as numbered Parquet files under ``path`` and describe it."""
    path.mkdir(parents=True, exist_ok=True)
    names = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_FILE)):
        names.append(f"part-{i:05d}.parquet")
        write_file(table.slice(start, ROWS_PER_FILE), path / names[-1])
    return SplitInfo(path=str(path), rows=table.num_rows, digest=digest_dir(path), files=names)


def split_files(info: SplitInfo) -> list[str]:
    """A split's Parquet files, in order: those its manifest lists (older manifests: those in its
    directory, in name order)."""
    if info.files:
        return [str(Path(info.path) / name) for name in info.files]
    return sorted(str(f) for f in Path(info.path).glob("*.parquet"))


def check_split(info: SplitInfo, expected: pa.Schema, where: str) -> list[str]:
    """Check every Parquet file of a split against the contract, reading only the file footers;
    returns the files.

    Raises:
        DataError: no Parquet file, or a file that is not readable Parquet (truncated, another format).
        SchemaMismatch: a file whose schema breaks the contract (field-by-field diff).
    """
    files = split_files(info)
    if not files:
        raise DataError(f"{where}: no Parquet files under {info.path}; rerun the stage that writes it")
    for f in files:
        arrow.check(read_schema(f), expected, where=f"{where} ({Path(f).name})")
    return files


def read_schema(path: str | Path) -> pa.Schema:
    """A Parquet file's Arrow schema from its footer.

    Raises:
        DataError: the file is not readable Parquet.
    """
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); replace or remove it") from None
