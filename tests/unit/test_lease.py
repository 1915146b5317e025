"""The run lease: one owner at a time, a dead owner's lease taken over, waiters admitted in turn."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.lease import LEASE_FILE, Lease, RunLocked


def test_second_owner_is_refused_with_the_holder_named(tmp_path):
    with Lease(tmp_path, "r1").acquire():
        with pytest.raises(RunLocked, match=rf"--run-id r1: in use by host \S+ pid {os.getpid()} since .*--wait-for-lock"):
            Lease(tmp_path, "r1").acquire()
    assert not (tmp_path / LEASE_FILE).exists()  # released
    Lease(tmp_path, "r1").acquire().release()


def test_waiter_gets_the_lease_when_the_owner_releases(tmp_path):
    first = Lease(tmp_path, "r1").acquire()
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    second = Lease(tmp_path, "r1").acquire(wait=True, poll_s=0.1)
    assert 0.9 < time.monotonic() - t0 < 10
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == second.owner["owner"]
    second.release()


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    """Regression: a killed driver's retry on the same machine had nobody to wait for."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LEASE_FILE).write_text(json.dumps({"owner": "x", "host": os.uname().nodename, "pid": pid, "since": "then"}))
    lease = Lease(tmp_path, "r1").acquire()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()
    lease.release()


def test_a_stale_heartbeat_from_another_host_is_taken_over(tmp_path):
    path = tmp_path / LEASE_FILE
    path.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(RunLocked, match="in use by host elsewhere pid 1"):
        Lease(tmp_path, "r1", stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    lease = Lease(tmp_path, "r1", stale_after_s=60).acquire()
    assert json.loads(path.read_text())["host"] == os.uname().nodename
    lease.release()


def test_heartbeat_keeps_the_lease_fresh(tmp_path):
    lease = Lease(tmp_path, "r1", heartbeat_s=0.1, stale_after_s=1).acquire()
    old = time.time() - 100
    os.utime(tmp_path / LEASE_FILE, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LEASE_FILE).stat().st_mtime < 1
    with pytest.raises(RunLocked):
        Lease(tmp_path, "r1", stale_after_s=1).acquire()
    lease.release()
