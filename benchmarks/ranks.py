"""Run one function on every rank of a real gloo process group on loopback, in spawned processes."""

from __future__ import annotations

import io
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(target, rank, world, port, threads, args, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = target(rank, world, *args)
    buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
    torch.save(out, buf)
    queue.put((rank, buf.getvalue()))
    dist.destroy_process_group()


def run(target, world: int, *args, threads: int = 1, timeout: float = 1800) -> list:
    """``target(rank, world, *args)`` (a module-level function) on each of ``world`` ranks with
    ``threads`` torch threads each; returns what each returned, in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, r, world, port, threads, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join()
    return [torch.load(io.BytesIO(results[r])) for r in range(world)]
