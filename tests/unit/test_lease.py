"""The run lease: one owner at a time, a dead owner's lease taken over, waiters admitted in turn,
no clock compared across machines, and an owner that loses its lease told so."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.lease import LEASE_FILE, Lease, RunLocked, this_node

OTHER_NODE = "00000000-0000-0000-0000-000000000000 pid:[4026531836]"  # another boot of another machine


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _write_lease(path, **record) -> None:
    """A lease written by another process, published whole as the owner's own would be."""
    tmp = path.with_name("written-by-hand")
    tmp.write_text(json.dumps({"since": "then", **record}))
    os.replace(tmp, path)


def _acquire_in_background(lease, **kwargs) -> threading.Event:
    """Start ``lease.acquire(**kwargs)`` in a thread; the event is set once it returns."""
    taken = threading.Event()

    def take():
        lease.acquire(**kwargs)
        taken.set()

    threading.Thread(target=take, daemon=True).start()
    return taken


def test_second_owner_is_refused_with_the_holder_named(tmp_path):
    with Lease(tmp_path, "r1").acquire():
        with pytest.raises(RunLocked, match=rf"--run-id r1: in use by host \S+ pid {os.getpid()} since .*--wait-for-lock"):
            Lease(tmp_path, "r1").acquire()
    assert list(tmp_path.iterdir()) == []  # released, beat file included
    Lease(tmp_path, "r1").acquire().release()


def test_waiter_gets_the_lease_when_the_owner_releases(tmp_path):
    first = Lease(tmp_path, "r1").acquire()
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    second = Lease(tmp_path, "r1").acquire(wait=True, poll_s=0.1)
    assert 0.9 < time.monotonic() - t0 < 10
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == second.owner["token"]
    second.release()


def test_a_beating_owner_is_not_taken_over_however_old_its_file_times(tmp_path):
    """Regression: takeover compared the taker's clock with the lease file's mtime, set by the
    owner's host; a live owner whose file times looked old (a clock behind, here 1970) was taken over."""
    owner = Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3).acquire()
    stop = threading.Event()

    def back_to_1970():
        while not stop.is_set():
            for f in tmp_path.iterdir():
                try:
                    os.utime(f, (0, 0))
                except FileNotFoundError:
                    pass
            time.sleep(0.01)

    threading.Thread(target=back_to_1970, daemon=True).start()
    taker = Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3)
    taken = _acquire_in_background(taker, wait=True, poll_s=0.02)
    assert not taken.wait(1.5)  # five stale periods
    assert not owner.lost.is_set()
    stop.set()
    owner.release()
    assert taken.wait(5)
    taker.release()


def test_a_silent_owner_on_another_node_is_taken_over_after_stale_after_s(tmp_path):
    """The owner's counter stops; a waiter takes over once it has seen it unchanged for
    stale_after_s by its own clock, whatever the other host's clock wrote on the file."""
    path = tmp_path / LEASE_FILE
    token = "f" * 32
    _write_lease(path, token=token, host="elsewhere", node=OTHER_NODE, pid=1)
    (tmp_path / f"{LEASE_FILE}.{token}.beat").write_text("7")
    future = time.time() + 3600  # that host's clock runs an hour ahead: it must not matter
    os.utime(path, (future, future))
    with pytest.raises(RunLocked, match="in use by host elsewhere pid 1 since then"):
        Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3).acquire()  # wait=False never judges staleness
    taker = _taken_over_after(tmp_path, 0.3)
    assert not (tmp_path / f"{LEASE_FILE}.{token}.beat").exists()  # the dead owner's beat file is cleared away
    taker.release()
    assert list(tmp_path.iterdir()) == []


def _taken_over_after(tmp_path, at_least_s: float) -> Lease:
    """A waiting taker's lease on ``tmp_path``, taken no sooner than ``at_least_s`` by its own clock."""
    taker = Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3)
    t0 = time.monotonic()
    taken = _acquire_in_background(taker, wait=True, poll_s=0.02)
    assert taken.wait(10)
    assert time.monotonic() - t0 >= at_least_s
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == taker.owner["token"]
    return taker


def test_an_owner_whose_lease_file_vanishes_stops_and_says_so(tmp_path):
    """Regression: the heartbeat ignored a vanished lease file and its owner kept working, never told."""
    messages = []
    owner = Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3, on_lost=messages.append).acquire()
    (tmp_path / LEASE_FILE).unlink()
    assert owner.lost.wait(1)
    time.sleep(0.3)  # six beat periods more: nothing is recreated
    assert messages == [f"lost the lease of run id r1 to nobody (its file {tmp_path / LEASE_FILE} was removed)"]
    assert list(tmp_path.iterdir()) == []
    owner.release()
    assert list(tmp_path.iterdir()) == []


def test_an_owner_whose_lease_is_taken_stops_and_leaves_the_new_one_alone(tmp_path):
    """An owner that finds another token in its lease file stops beating, says so once, and never
    rewrites or removes the new owner's file, not even on release."""
    messages = []
    path = tmp_path / LEASE_FILE
    owner = Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3, on_lost=messages.append).acquire()
    _write_lease(path, token="e" * 32, host="elsewhere", node=OTHER_NODE, pid=4242)
    before, written = path.read_bytes(), path.stat().st_mtime_ns
    assert owner.lost.wait(1)
    time.sleep(0.3)
    assert messages == ["lost the lease of run id r1 to host elsewhere pid 4242"]
    owner.release()
    assert path.read_bytes() == before and path.stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.iterdir()] == [LEASE_FILE]


@pytest.mark.skipif(this_node() is None, reason="no /proc to tell this node apart")
def test_a_dead_owner_on_this_node_is_taken_over_at_once(tmp_path):
    """Regression: a killed driver's retry on the same machine had nobody to wait for."""
    path = tmp_path / LEASE_FILE
    _write_lease(path, token="d" * 32, host=socket.gethostname(), node=this_node(), pid=_dead_pid())
    lease = Lease(tmp_path, "r1").acquire()  # wait=False: no stale period to sit out
    assert json.loads(path.read_text())["token"] == lease.owner["token"]
    lease.release()


def test_a_dead_pid_on_another_node_with_this_host_name_is_not_taken_at_once(tmp_path):
    """Regression: the dead-owner shortcut trusted the host name, so a live owner on another node
    with the same name (a container, a cloned VM), whose pid happens to be free here, was taken over."""
    _write_lease(tmp_path / LEASE_FILE, token="c" * 32, host=socket.gethostname(), node=OTHER_NODE, pid=_dead_pid())
    with pytest.raises(RunLocked, match=f"in use by host {socket.gethostname()} pid"):
        Lease(tmp_path, "r1").acquire()


@pytest.mark.skipif(this_node() is None, reason="no /proc to tell this node apart")
def test_takers_racing_for_a_dead_owners_lease_leave_exactly_one_owner(tmp_path):
    for attempt in range(20):
        run_dir = tmp_path / str(attempt)
        run_dir.mkdir()
        _write_lease(run_dir / LEASE_FILE, token="b" * 32, host=socket.gethostname(), node=this_node(), pid=_dead_pid())
        takers = [Lease(run_dir, "r1", heartbeat_s=0.05, stale_after_s=0.3) for _ in range(6)]
        start = threading.Barrier(len(takers))
        won = []

        def take(lease):
            start.wait()
            try:
                won.append(lease.acquire())
            except RunLocked:
                pass

        threads = [threading.Thread(target=take, args=(lease,)) for lease in takers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"attempt {attempt}"
        time.sleep(0.15)  # three beats: the winner still holds it
        assert not won[0].lost.is_set()
        assert json.loads((run_dir / LEASE_FILE).read_text())["token"] == won[0].owner["token"]
        won[0].release()
        assert list(run_dir.iterdir()) == []  # nothing left aside


def test_waiters_on_a_silent_lease_take_it_one_at_a_time(tmp_path):
    _write_lease(tmp_path / LEASE_FILE, token="a" * 32, host="elsewhere", node=OTHER_NODE, pid=1)
    waiters = [Lease(tmp_path, "r1", heartbeat_s=0.05, stale_after_s=0.3) for _ in range(4)]
    taken = [_acquire_in_background(lease, wait=True, poll_s=0.02) for lease in waiters]
    released = []
    for turn in range(len(waiters)):
        deadline = time.monotonic() + 10
        while sum(t.is_set() for t in taken) <= turn and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.6 if turn == 0 else 0.1)  # the first owner outlives two stale periods
        holders = [lease for lease, t in zip(waiters, taken)
                   if t.is_set() and not lease.lost.is_set() and lease not in released]
        assert len(holders) == 1, f"turn {turn}"
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == holders[0].owner["token"]
        holders[0].release()
        released.append(holders[0])
    assert list(tmp_path.iterdir()) == []


def test_a_heartbeat_slower_than_the_stale_period_is_refused(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_s=60, stale_after_s=60: need 0 < heartbeat_s < stale_after_s"):
        Lease(tmp_path, "r1", heartbeat_s=60, stale_after_s=60)


def test_a_claim_left_by_a_taker_that_died_does_not_block_the_lease_forever(tmp_path):
    """A taker that dies between claiming a stale lease and removing it leaves its claim; waiters
    disregard the claim once they have seen the lease stale for two periods."""
    path, token = tmp_path / LEASE_FILE, "9" * 32
    _write_lease(path, token=token, host="elsewhere", node=OTHER_NODE, pid=1)
    os.link(path, tmp_path / f"{LEASE_FILE}.taking-{token}")
    taker = _taken_over_after(tmp_path, 0.6)
    taker.release()
    assert list(tmp_path.iterdir()) == []
