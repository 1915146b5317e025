"""Run a function on every rank of a real gloo process group on loopback, in spawned processes."""

from __future__ import annotations

import io
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


def _entry(target, rank, world, port, args, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = target(rank, world, *args)
    buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
    torch.save(out, buf)
    queue.put((rank, buf.getvalue()))
    dist.destroy_process_group()


def run_group(target, world: int, *args, timeout: float = 180, dies: frozenset = frozenset()) -> list:
    """``target(rank, world, *args)`` on each rank (a module-level function returning a picklable
    value); returns the values in rank order (None for the ranks in ``dies``, which are expected to
    exit on their own) and checks every other process exited cleanly."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {r: torch.load(io.BytesIO(b)) for r, b in (queue.get(timeout=timeout) for _ in range(world - len(dies)))}
    for r, p in enumerate(procs):
        p.join(timeout=60)
        assert r in dies or p.exitcode == 0
    return [results.get(r) for r in range(world)]
