"""The DDP rendezvous of the training workers, listening only on the address Ray gives the node.

Ray Train's default setup (``init_process_group("env://")``) has rank 0 start torch's TCPStore, and
TCPStore listens on every interface whatever host name it is given. On a laptop or a CI machine that
exposes a port, to anyone on the network, that accepts store writes from the training job. Here rank 0
binds the listening socket itself, to the node address Ray advertises (127.0.0.1 in embedded mode, the
node's cluster IP on a cluster), and hands it to TCPStore (``master_listen_fd``). Everything else is
Ray Train's own ``TorchConfig`` backend: the backend choice, the environment variables, the shutdown.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig
# Private, and the coupling is deliberate: on_start below replaces only the process-group creation of
# this backend. A Ray upgrade that renames these fails at import, in the tests, not silently.
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None  # rank 0's bound socket, kept alive until the store owns it


def _bind() -> tuple[str, int]:
    """On rank 0: bind a listening socket on this node's Ray address and keep it for ``_join``."""
    import ray

    global _listener
    host = ray.util.get_node_ip_address()
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    _listener = sock
    return host, sock.getsockname()[1]


def _join(backend: str, host: str, port: int, world_rank: int, world_size: int, timeout_s: int) -> None:
    """On every rank: open the store (rank 0 serves it on the bound socket) and the process group."""
    import torch.distributed as dist

    global _listener
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray Train does: a timed-out NCCL collective fails the worker instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=_listener.fileno(), wait_for_workers=False)
        # TCPStore serves on the descriptor from now on; this object only has to stay out of the way.
        _listener.detach()
        _listener = None
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _ScopedTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "ScopedTorchConfig"):
        import ray

        host, port = worker_group.execute_single(0, _bind)
        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _join, backend=backend, host=host, port=port, world_rank=i,
                                                   world_size=len(worker_group), timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class ScopedTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on the node's Ray address only (see module)."""

    @property
    def backend_cls(self):
        return _ScopedTorchBackend
