"""The one reader of split rows: every stage, the champion gate and ``adapt`` read Parquet rows here.
(Checks that need only a file's footer -- its schema, its column statistics -- read the footer
directly: ``tasks.arrow_io.check_split`` and ``tasks.source``.)

A ``Split`` is a list of Parquet files in order; its rows are numbered globally over the files. It
reads their footers once (row counts, row groups, schema) and then reads by row group, never a whole
file or split at once unless asked to: ``batches`` yields one row group at a time (through an
optional per-batch ``transform``: where decoding, normalization and augmentation go), ``slice``
reads a range of rows and ``take`` the rows at given global indices, each from only the row groups
that hold them.

Files are opened through ``pyarrow.fs``: a local path or any URI pyarrow has a filesystem for, one
code path. The files of a stage's output come from its manifest (``SplitInfo.files``), not from
listing a directory: a reader trusts only what a complete stage says it wrote (a manifest written
before the field existed is read by listing its split's directory, ``arrow_io.split_files``).
Data no stage wrote (a user's source, ``adapt``'s new rows) is found by ``list_parquet``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.errors import DataError


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(the filesystem, the path within it) of a local path or a URI. An object store's endpoint,
    region and credentials come from the standard AWS variables and files (``AWS_ENDPOINT_URL``,
    ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``..., ``~/.aws``), never from a recipe."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def scheme_prefix(path: str) -> str:
    """The scheme ``filesystem`` takes off a URI ("s3://"; "" for a local path): put it back in
    front of a path the filesystem lists to get a URI again."""
    return path.split("://", 1)[0] + "://" if "://" in path else ""


def check_store(path: str, what: str) -> None:
    """For a URI: that its object store answers, the bucket exists and the credentials may list it,
    before anything else reads it (a local path: nothing to check here).

    Raises:
        DataError: one line naming ``what``, the URI, what failed and the fix.
    """
    if "://" not in path:
        return
    if "?" in path:
        raise DataError(f"{what}={path}: options in the URI are not read; set the endpoint and region with "
                        "AWS_ENDPOINT_URL and AWS_DEFAULT_REGION, and remove the '?...' part")
    try:
        fs, inner = filesystem(path)
        fs.get_file_info(pafs.FileSelector(inner))  # a listing: unlike a lookup, it tells a missing bucket
    except FileNotFoundError:
        return  # the bucket answers; the prefix holds nothing yet (what is missing, the caller says)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{what}={path}: {_store_failure(str(e), _bucket(path))}") from None


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def _store_failure(message: str, bucket: str) -> str:
    """What an object store's error means, and the fix, in words (pyarrow's S3 messages)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"the object store at {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3 (AWS_ENDPOINT_URL is not set)"
    if "NETWORK_CONNECTION" in message or "curlCode" in message:
        return f"{where} cannot be reached; start it, or set AWS_ENDPOINT_URL to the store's address"
    if "NO_SUCH_BUCKET" in message:
        return f"bucket '{bucket}' does not exist on {where}; create it or fix the bucket name"
    if any(k in message for k in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403")):
        return (f"{where} refused the credentials for bucket '{bucket}'; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE and ~/.aws/credentials) to a key that may read it")
    if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
            or os.path.exists(os.path.expanduser("~/.aws/credentials"))):
        return (f"no AWS credentials found for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "with ~/.aws/credentials")
    first = message.splitlines()[0] if message else "no detail"
    return f"{where} answered: {first}; check AWS_ENDPOINT_URL, the credentials and the bucket"


def list_parquet(directory: str) -> list[str]:
    """The ``.parquet`` files under ``directory`` (recursively), in name order: for data that no
    stage wrote (a user's source, ``adapt``'s new rows). An empty list when there are none."""
    fs, root = filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = scheme_prefix(directory)
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into Split.files
    index: int  # row group number within the file
    start: int  # global number of its first row
    rows: int


class Split:
    """Parquet files read as one sequence of rows (see the module docstring).

    Raises:
        DataError: a file that is not readable Parquet (named, with the fix).
    """

    def __init__(self, files: list[str]):
        self.files = list(files)
        self._open = [_parquet(f) for f in self.files]
        self.row_groups: list[RowGroup] = []
        start = 0
        for i, pf in enumerate(self._open):
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                self.row_groups.append(RowGroup(i, g, start, n))
                start += n
        self.rows = start
        self.file_rows = [pf.metadata.num_rows for pf in self._open]
        self._starts = [g.start for g in self.row_groups]

    @property
    def schema(self) -> pa.Schema:
        return self._open[0].schema_arrow if self._open else pa.schema([])

    def read(self, group: RowGroup, columns: Optional[list[str]] = None) -> pa.Table:
        try:
            return self._open[group.file].read_row_group(group.index, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.files[group.file]}: row group {group.index} cannot be read "
                            f"({str(e).splitlines()[0]}); replace or remove the file") from None

    def batches(self, columns: Optional[list[str]] = None, transform: Optional[Callable] = None,
                max_rows: Optional[int] = None) -> Iterator:
        """Every row group in order, as a table (or what ``transform(table)`` makes of it). With
        ``max_rows``, a larger group comes as several tables of at most that many rows, decoded as
        they are read: for files no stage wrote, whose groups may hold a whole file (pyarrow's
        default is a million rows; reading one such Fashion-MNIST file whole peaked at 814 MB of
        Arrow memory, in 4,096-row batches at 75 MB)."""
        for group in self.row_groups:
            parts = [self.read(group, columns)] if max_rows is None or group.rows <= max_rows else \
                self._read_in_batches(group, columns, max_rows)
            for table in parts:
                yield transform(table) if transform is not None else table

    def _read_in_batches(self, group: RowGroup, columns: Optional[list[str]], max_rows: int) -> Iterator[pa.Table]:
        try:
            for batch in self._open[group.file].iter_batches(batch_size=max_rows, row_groups=[group.index], columns=columns):
                yield pa.Table.from_batches([batch])
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.files[group.file]}: row group {group.index} cannot be read "
                            f"({str(e).splitlines()[0]}); replace or remove the file") from None

    def read_all(self, columns: Optional[list[str]] = None) -> pa.Table:
        """The whole split as one table: only for data known to be small (a gate's test rows)."""
        tables = list(self.batches(columns))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def slice(self, start: int, stop: int, columns: Optional[list[str]] = None) -> pa.Table:
        """Rows [start, stop) (global numbers), reading only the row groups that hold them."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        for group in self.row_groups[max(first, 0):]:
            if group.start >= stop:
                break
            lo, hi = max(start, group.start) - group.start, min(stop, group.start + group.rows) - group.start
            table = self.read(group, columns)
            parts.append(table if (lo, hi) == (0, group.rows) else table.slice(lo, hi - lo))
        if not parts:
            return (self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])).empty_table()
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def take(self, index: np.ndarray, columns: Optional[list[str]] = None) -> pa.Table:
        """The rows at global numbers ``index``, in that order, reading only the row groups that
        hold them."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.rows):
            raise IndexError(f"row numbers outside 0..{self.rows - 1}")
        which = np.searchsorted(self._starts, index, side="right") - 1
        parts, where = [], []
        for g in np.unique(which):
            pick = np.nonzero(which == g)[0]
            group = self.row_groups[g]
            parts.append(self.read(group, columns).take(pa.array(index[pick] - group.start)))
            where.append(pick)
        if not parts:
            return (self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])).empty_table()
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


def _parquet(path: str) -> pq.ParquetFile:
    fs, inner = filesystem(path)
    try:
        return pq.ParquetFile(fs.open_input_file(inner))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); replace or remove it") from None
