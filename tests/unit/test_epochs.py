"""The per-epoch MLflow logger (pipeline/tracking/epochs.py): idempotent, buffering through
outages with a bound, raising bugs, and leaving the process environment alone."""

import os
import time

import pytest

from pipeline.tracking import epochs
from pipeline.tracking.epochs import EpochLogger, Outage, RestStore
from tests.conftest import free_port


class Store:
    """A run's metric store in memory; ``down`` makes every request an outage."""

    def __init__(self):
        self.logged: dict[str, dict[int, float]] = {}
        self.down = False
        self.status_value = "RUNNING"
        self.error = None

    def _check(self):
        if self.error:
            raise self.error
        if self.down:
            raise Outage("ConnectionError")

    def status(self, run_id):
        self._check()
        return self.status_value

    def steps(self, run_id, key):
        self._check()
        return set(self.logged.get(key, {}))

    def log(self, run_id, metrics):
        self._check()
        for m in metrics:
            self.logged.setdefault(m.key, {})[m.step] = m.value


def test_an_outage_is_said_once_buffered_and_sent_when_the_server_answers_again():
    store = Store()
    log = EpochLogger("run", store)
    assert log(1, {"loss": 1.0}) is None
    store.down = True
    note = log(2, {"loss": 0.5})
    assert note.startswith("tracking server unreachable at epoch 2")
    assert log(3, {"loss": 0.25}) is None  # said once per outage
    store.down = False
    assert log(4, {"loss": 0.125}) == "tracking server answers again: epochs 2..4 logged"
    assert store.logged["loss"] == {1: 1.0, 2: 0.5, 3: 0.25, 4: 0.125}


def test_an_epoch_the_run_already_holds_is_not_logged_twice():
    store = Store()
    store.logged["loss"] = {1: 9.0}  # logged by a killed attempt
    EpochLogger("run", store)(1, {"loss": 1.0})
    assert store.logged["loss"] == {1: 9.0}


def test_the_buffer_is_bounded_during_a_long_outage(monkeypatch):
    monkeypatch.setattr(epochs, "MAX_PENDING_EPOCHS", 5)
    store = Store()
    store.down = True
    log = EpochLogger("run", store)
    for e in range(1, 21):
        log(e, {"loss": float(e)})
    assert len(log.pending) == 5 and log.dropped == 15  # the oldest go; the driver fills them from the history
    store.down = False
    log(21, {"loss": 21.0})
    assert sorted(store.logged["loss"]) == list(range(17, 22)) and log.dropped == 16


def test_a_bug_is_raised_not_reported_as_an_outage():
    """Regression: ``except Exception`` reported any bug once as "server unreachable" and then
    stayed silent while the buffer grew."""
    store = Store()
    store.error = TypeError("unsupported operand")
    with pytest.raises(TypeError):
        EpochLogger("run", store)(1, {"loss": 1.0})


def test_nothing_is_logged_once_the_run_is_no_longer_running():
    store = Store()
    store.status_value = "KILLED"
    EpochLogger("run", store)(1, {"loss": 1.0})
    assert store.logged == {}


def test_a_server_that_does_not_answer_costs_one_short_request_and_no_environment_change():
    """Regression: the logger set MLflow's retry variables in os.environ around each request while
    trainer.fit() ran on another thread of the same process."""
    before = dict(os.environ)
    store = RestStore(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(Outage):
        store.status("run")
    assert time.perf_counter() - t0 < epochs.REQUEST_TIMEOUT_S  # refused at once, no retries
    assert dict(os.environ) == before
