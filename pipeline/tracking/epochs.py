"""Per-epoch metrics to one MLflow run while training runs, from the driver only.

The train stage hands each epoch whose checkpoint is persisted to the callable the runner gave it
(``EpochLogger``): one writer per run, and no request ever costs the training loop time.

A tracking outage must not stop training, nor take MLflow's minutes of retries per epoch. Against
an MLflow server the logger therefore makes its three requests itself, through MLflow's own
``http_request`` with ``max_retries=0`` and a 5 s timeout passed per call (``MlflowClient`` takes
its retry settings only from process-wide environment variables, which another thread -- the one
running ``trainer.fit()`` -- reads at the same time). A local database store has no outage to ride
out and goes through ``MlflowClient``.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections import deque
from typing import Optional, Protocol

from mlflow.entities import Metric

MAX_PENDING_EPOCHS = 1000  # buffered during an outage; older ones are filled in from the history later
REQUEST_TIMEOUT_S = 5


class Outage(Exception):
    """The tracking store did not take a request (unreachable, timed out, or answered an HTTP error)."""


class _Store(Protocol):
    def status(self, run_id: str) -> str: ...
    def steps(self, run_id: str, key: str) -> set[int]: ...
    def log(self, run_id: str, metrics: list[Metric]) -> None: ...


class EpochLogger:
    """Logs (epoch, metrics) to ``run_id``; idempotent per epoch, buffering through outages.

    Each call sends every buffered epoch that the run does not hold yet (a killed attempt may have
    logged an epoch that its resumed run trains again). Nothing is logged once the run is no longer
    RUNNING (a killed run stays as it was left). During an outage at most ``MAX_PENDING_EPOCHS``
    epochs are kept; older ones are dropped here and logged by the driver from the train history
    when the stage ends. An error that is not an outage (a bug) is raised.
    """

    def __init__(self, run_id: str, store: _Store):
        self.run_id = run_id
        self.store = store
        self.pending: deque[tuple[int, dict]] = deque()
        self.down_since: Optional[int] = None  # the epoch at which the current outage was noticed
        self.dropped = 0

    def __call__(self, epoch: int, metrics: dict) -> Optional[str]:
        """Log one epoch; returns a console line when the store goes away or comes back."""
        self.pending.append((epoch, {k: float(v) for k, v in metrics.items()}))
        while len(self.pending) > MAX_PENDING_EPOCHS:
            self.pending.popleft()
            self.dropped += 1
        try:
            self._send()
        except Outage as e:
            if self.down_since is None:
                self.down_since = epoch
                return (f"tracking server unreachable at epoch {epoch} ({e}); training goes on and its metrics are "
                        "buffered (they are logged when the server answers again, or when the stage ends)")
            return None
        if self.down_since is not None:
            since, self.down_since = self.down_since, None
            return f"tracking server answers again: epochs {since}..{epoch} logged"
        return None

    def _send(self) -> None:
        if not self.pending:
            return
        if self.store.status(self.run_id) != "RUNNING":
            self.pending.clear()
            return
        # An epoch's metrics go in one batch, so one key tells which epochs the run holds.
        first_key = next(iter(self.pending[0][1]), None)
        logged = self.store.steps(self.run_id, first_key) if first_key else set()
        now = int(time.time() * 1000)
        fresh = [Metric(k, v, now, epoch) for epoch, metrics in self.pending if epoch not in logged
                 for k, v in metrics.items()]
        for i in range(0, len(fresh), 1000):  # MLflow takes at most 1000 metrics a batch
            self.store.log(self.run_id, fresh[i : i + 1000])
        self.pending.clear()


def for_run(uri: str, run_id: str, client) -> EpochLogger:
    """The logger for ``run_id`` in the store at ``uri`` (``client`` is that store's MlflowClient)."""
    scheme = urllib.parse.urlsplit(uri).scheme
    return EpochLogger(run_id, RestStore(uri) if scheme in ("http", "https") else ClientStore(client))


class RestStore:
    """MLflow's REST API through ``mlflow.utils.rest_utils.http_request``, without retries and with
    a short timeout per request (see the module docstring)."""

    def __init__(self, uri: str):
        from mlflow.utils.credentials import get_default_host_creds

        self.creds = get_default_host_creds(uri)

    def _call(self, endpoint: str, method: str, **kwargs) -> dict:
        import requests
        from mlflow.exceptions import MlflowException
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(self.creds, f"/api/2.0/mlflow/{endpoint}", method, max_retries=0, backoff_factor=0,
                                    timeout=REQUEST_TIMEOUT_S, raise_on_status=False, **kwargs)
        except (requests.exceptions.RequestException, MlflowException) as e:  # MLflow wraps the transport's errors
            cause = e.__cause__ or e.__context__ or e
            raise Outage(type(cause).__name__) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise Outage(f"HTTP {response.status_code} from {endpoint}")
        if response.status_code != 200:  # a request the server refuses: a bug, not an outage
            raise RuntimeError(f"MLflow refused {endpoint}: HTTP {response.status_code} {response.text[:200]}")
        return response.json()

    def status(self, run_id: str) -> str:
        return self._call("runs/get", "GET", params={"run_id": run_id})["run"]["info"]["status"]

    def steps(self, run_id: str, key: str) -> set[int]:
        body = self._call("metrics/get-history", "GET", params={"run_id": run_id, "metric_key": key})
        return {int(m.get("step", 0)) for m in body.get("metrics", [])}

    def log(self, run_id: str, metrics: list[Metric]) -> None:
        self._call("runs/log-batch", "POST", json={"run_id": run_id, "metrics": [
            {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics]})


class ClientStore:
    """A local database store through ``MlflowClient`` (no network between them; a database locked
    by another writer for too long is its outage)."""

    def __init__(self, client):
        self.client = client

    def status(self, run_id: str) -> str:
        with _store_errors_as_outage():
            return self.client.get_run(run_id).info.status

    def steps(self, run_id: str, key: str) -> set[int]:
        with _store_errors_as_outage():
            return {m.step for m in self.client.get_metric_history(run_id, key)}

    def log(self, run_id: str, metrics: list[Metric]) -> None:
        with _store_errors_as_outage():
            self.client.log_batch(run_id, metrics=metrics)


@contextlib.contextmanager
def _store_errors_as_outage():
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise Outage(e.message.splitlines()[0]) from None
