"""A worker's share of a split as a stream of batches, in bounded memory.

Training (``ShardStream.epoch``): the split's rows are cut into chunks of one row group each (the
writer's group size, ``tasks.arrow_io.ROWS_PER_GROUP``); chunk ``k`` belongs to rank
``(k + epoch) % world``. Dealing consecutive chunks round-robin gives every rank the same share of
every stretch of the split, so a split stored sorted by label still reaches every rank with the
split's class mix; the rotation by epoch moves each chunk to another rank the next epoch. The last
incomplete round is cut into ``world`` equal runs, so every rank reads exactly
``rows // world`` rows each epoch (DDP and SyncBatchNorm need equal step counts).

A rank reads its chunks in an order drawn from (seed, epoch, rank) and passes them through a
shuffle buffer of ``buffer_rows`` rows: once full, each arriving chunk of ``k`` rows replaces
``k`` slots drawn at random, whose rows leave in that order; at the end the buffer leaves in a
random permutation. The same generator draws the chunk order and the slots, so an epoch's batches
are a function of (files, seed, epoch, rank, world, batch size, buffer size) alone: a resumed run
sees the batches an uninterrupted run saw. With ``buffer_rows`` at least the shard's rows the
buffer holds the whole shard: a full shuffle of it. Memory is the buffer plus a few batches, not
the split.

Reading, decoding and shuffling run on a background thread (pyarrow releases the GIL while it
reads and decompresses), a few batches ahead of the training step.

Validation (``ShardStream.in_order``): rank ``r`` reads rows ``[r * rows // world,
(r + 1) * rows // world)`` in stored order; every row is read by exactly one rank.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

import numpy as np
import torch

from tasks import arrow_io
from tasks.reader import Split

PREFETCH_BATCHES = 4  # batches the reading thread keeps ready
DRAIN_ROWS = 256  # rows per piece in which the buffer leaves at the end of an epoch


def _seed(seed: int, epoch: int, rank: int) -> int:
    """The generator seed of ``rank``'s chunk order and buffer in ``epoch``."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def rank_ranges(rows: int, chunk: int, rank: int, world: int, epoch: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s rows of a split of ``rows`` rows in ``epoch``, as [start, stop) ranges in
    stored order: chunk ``k`` of ``chunk`` rows goes to rank ``(k + epoch) % world``, and the rows
    after the last complete round of ``world`` chunks are split into ``world`` equal runs (the
    last ``rows % world`` rows of the split are left out). Every rank gets ``rows // world`` rows."""
    usable = rows // world * world
    full = usable // (chunk * world) * chunk * world  # rows in complete rounds
    first = (rank - epoch) % world  # the chunk of each round that is this rank's
    ranges = [(s + first * chunk, s + (first + 1) * chunk) for s in range(0, full, chunk * world)]
    tail = (usable - full) // world
    if tail:
        start = full + ((rank - epoch) % world) * tail
        ranges.append((start, start + tail))
    return ranges


class ShardStream:
    """Rank ``rank`` of ``world``'s share of the split in ``files`` (see the module docstring).

    Raises:
        DataError: a file that is not readable Parquet (from ``tasks.reader``).
    """

    def __init__(self, files: list[str], rank: int, world: int, input_shape: tuple[int, ...],
                 buffer_rows: int):
        self.split = Split(files)
        self.rank, self.world = rank, world
        self.input_shape = tuple(input_shape)
        self.buffer_rows = buffer_rows
        self.chunk = max((g.rows for g in self.split.row_groups), default=1)  # the writer's group size
        self.rows = self.split.rows // world  # rows this rank trains on per epoch

    def steps(self, batch_size: int) -> int:
        """Full batches per epoch (a last partial batch is left out, as every rank leaves it out)."""
        return self.rows // batch_size

    def epoch(self, epoch: int, seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps(batch_size)`` shuffled (features, labels) batches of this rank's rows in ``epoch``."""
        rng = np.random.default_rng(_seed(seed, epoch, self.rank))
        ranges = rank_ranges(self.split.rows, self.chunk, self.rank, self.world, epoch)
        order = [ranges[i] for i in rng.permutation(len(ranges))]
        chunks = _shuffled((self._read(a, b) for a, b in order), max(1, min(self.buffer_rows, self.rows)), rng)
        return _background(_batches(chunks, batch_size, self.steps(batch_size), self.input_shape))

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous part of the split in stored order (every row read by exactly one
        rank; parts differ by at most one row), in batches of at most ``batch_size``."""
        n = self.split.rows
        a, b = self.rank * n // self.world, (self.rank + 1) * n // self.world
        pieces = (self._read(max(a, g.start), min(b, g.start + g.rows)) for g in self.split.row_groups
                  if g.start < b and g.start + g.rows > a)
        return _background(_batches(pieces, batch_size, None, self.input_shape))

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of the split as (features (n, D) float32, labels (n,) int64), reading
        only the row groups that hold them."""
        table = self.split.slice(start, stop)  # read-only arrays: the buffer or _batches copies them
        return arrow_io.features_numpy(table), arrow_io.labels_numpy(table).astype(np.int64, copy=False)


def _shuffled(chunks: Iterator[tuple[np.ndarray, np.ndarray]], buffer_rows: int,
              rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of ``chunks`` through a shuffle buffer of ``buffer_rows`` rows (module docstring)."""
    bx: Optional[np.ndarray] = None
    by: Optional[np.ndarray] = None
    n = 0  # rows in the buffer
    for x, y in chunks:
        if bx is None:
            bx = np.empty((buffer_rows, x.shape[1]), dtype=x.dtype)
            by = np.empty(buffer_rows, dtype=y.dtype)
        take = min(buffer_rows - n, len(y))
        bx[n : n + take], by[n : n + take] = x[:take], y[:take]
        n += take
        for s in range(take, len(y), buffer_rows):  # the buffer is full: swap rows out
            k = min(buffer_rows, len(y) - s)
            slots = rng.choice(buffer_rows, size=k, replace=False)
            yield bx[slots], by[slots]  # fancy indexing copies
            bx[slots], by[slots] = x[s : s + k], y[s : s + k]
    last = rng.permutation(n)
    for s in range(0, n, DRAIN_ROWS):  # in pieces: a copy of the whole buffer at once would double its memory
        yield bx[last[s : s + DRAIN_ROWS]], by[last[s : s + DRAIN_ROWS]]


def _batches(chunks: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, steps: Optional[int],
             input_shape: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut ``chunks`` into batches of ``batch_size`` as tensors of ``input_shape`` examples: exactly
    ``steps`` full batches, or (``steps`` None) every row, the last batch possibly short."""
    xs, ys, held, made = [], [], 0, 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        held += len(y)
        while held >= batch_size and (steps is None or made < steps):
            x_all, y_all = (np.concatenate(xs), np.concatenate(ys)) if len(xs) > 1 else (xs[0], ys[0])
            yield (torch.from_numpy(np.require(x_all[:batch_size], requirements=["C", "W"])).view(-1, *input_shape),
                   torch.from_numpy(np.require(y_all[:batch_size], requirements=["C", "W"])))
            xs, ys, held, made = [x_all[batch_size:]], [y_all[batch_size:]], held - batch_size, made + 1
        if steps is not None and made == steps:
            return
    if steps is None and held:
        yield (torch.from_numpy(np.concatenate(xs)).view(-1, *input_shape), torch.from_numpy(np.concatenate(ys)))


_DONE = object()


def _background(items: Iterator, depth: int = PREFETCH_BATCHES) -> Iterator:
    """``items`` produced on a daemon thread, at most ``depth`` ahead of the consumer; an exception
    there is raised here. Closing the returned generator early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer, which raises it
            put((None, e))

    thread = threading.Thread(target=produce, name="bnflow-shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()
