"""Connecting to Ray: an existing cluster (``ray job submit``, RAY_ADDRESS) or an embedded one."""

from __future__ import annotations

import os
import socket
import time
import urllib.parse

from schemas.config import PipelineConfig
from schemas.errors import ConfigError


# Ray Train runtime settings (the driver's values are passed on to the controller and workers; a
# user's own value wins). The controller consumes a worker's ray.train.report only when it polls
# the worker group, every 2 s by default, and a worker's next report waits for the previous one to
# be consumed: an epoch shorter than the poll interval waited up to 2 s in its report, and fit()
# returned up to 2 s after the loop ended.
RAY_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def connect(cfg: PipelineConfig, verbose: bool = False) -> None:
    """Attach to the cluster this job runs on, or start a local Ray on loopback; check resources.

    Quiet unless ``verbose``: Ray's INFO logs and the workers' output
    stay in Ray's log files (``ray logs``, the dashboard) instead of the console. What a user must
    see from a worker reaches the driver another way (training progress through the train stage's
    progress file, errors as exceptions).

    Raises:
        ConfigError: the config asks for more training CPUs or GPUs than the cluster has.
    """
    import ray

    for key, value in RAY_TRAIN_SETTINGS.items():
        os.environ.setdefault(key, value)  # read by Ray Train's controller and workers, which inherit them
    quiet = {"log_to_driver": verbose, "logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")}
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**quiet)
        else:
            # Embedded, single machine: keep every socket (Ray, gloo) on loopback.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # The dashboard serves Ray's State API, which Ray Train's placement-group monitor polls
            # (without it, it warns every few seconds); it is also where users watch the workers.
            t0 = time.perf_counter()
            ctx = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                           **quiet)
            where = f"; dashboard at http://{ctx.dashboard_url}" if ctx.dashboard_url else ""
            print(f"[bnflow] embedded Ray started in {time.perf_counter() - t0:.1f}s{where}", flush=True)
    check_resources(cfg, ray.cluster_resources())


def check_reachable(timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when RAY_ADDRESS names nothing that
    answers (call before anything else starts).

    Raises:
        ConfigError: naming the address and the fix.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    if address in ("", "auto", "local"):
        return
    parts = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        return
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}); start it "
                          "(ray start --head) or unset RAY_ADDRESS to run on an embedded Ray") from None


def check_resources(cfg: PipelineConfig, resources: dict) -> None:
    t = cfg.train
    cpus = int(resources.get("CPU", 0))
    if t.workers * t.cpus_per_worker > cpus:
        raise ConfigError(
            f"train.workers={t.workers} x train.cpus_per_worker={t.cpus_per_worker} needs {t.workers * t.cpus_per_worker} CPUs "
            f"but the Ray cluster has {cpus}; lower train.workers (at most {max(cpus // t.cpus_per_worker, 0)})")
    gpus = int(resources.get("GPU", 0))
    if t.use_gpu and t.workers > gpus:
        raise ConfigError(f"train.use_gpu=true with train.workers={t.workers} needs {t.workers} GPUs but the cluster has {gpus}; "
                          "lower train.workers or set train.use_gpu=false")
