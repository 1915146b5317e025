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
# The unit a reader reads and a train worker's shuffle deals and buffers (tasks/stream.py). Chosen by
# measurement (benchmarks/stream.py): on a split stored sorted by label, a shuffle buffer mixes as
# many stretches of the split as it holds groups, so smaller groups shuffle better at the same
# memory; 256 rows (0.8 MB of 784 float32 features) read as fast per row as 2048 on local disk.
ROWS_PER_GROUP = 256


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
    writer = SplitWriter(path, table.schema)
    writer.write(table)
    return writer.close()


class SplitWriter:
    """A split written from a stream of tables of any sizes: numbered files of ``ROWS_PER_FILE``
    rows in row groups of ``ROWS_PER_GROUP`` (only the last group of the split is shorter), written
    as ``write_file`` writes. It holds at most one row group's rows between calls; a split without
    rows is one empty file."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.path.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= ROWS_PER_GROUP:
            self._flush(whole_groups=True)

    def close(self) -> SplitInfo:
        self._flush(whole_groups=False)
        if self._file is not None:
            self._file.close()
        if not self.names:  # no rows at all: one empty file keeps the split's schema
            self.names.append(f"part-{0:05d}.parquet")
            write_file(self.schema.empty_table(), self.path / self.names[-1])
        return SplitInfo(path=str(self.path), rows=self.rows, digest=digest_dir(self.path), files=self.names)

    def _flush(self, whole_groups: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = table.num_rows // ROWS_PER_GROUP * ROWS_PER_GROUP if whole_groups else table.num_rows
        done = 0
        while done < n:
            if self._file is None or self._file_rows == ROWS_PER_FILE:
                if self._file is not None:
                    self._file.close()
                self.names.append(f"part-{len(self.names):05d}.parquet")
                self._file = pq.ParquetWriter(self.path / self.names[-1], self.schema, use_dictionary=False)
                self._file_rows = 0
            k = min(n - done, ROWS_PER_FILE - self._file_rows)
            self._file.write_table(table.slice(done, k), row_group_size=ROWS_PER_GROUP)
            self._file_rows += k
            self.rows += k
            done += k
        rest = table.slice(n)
        self._pending, self._pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)


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
