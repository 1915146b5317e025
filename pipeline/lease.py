"""One owner per run id: an exclusive lease file in the run directory.

The lease works on a shared filesystem (NFS included): it is taken with an exclusive create
(``O_CREAT | O_EXCL``), its owner refreshes its modification time every ``heartbeat_s`` seconds,
and a lease whose heartbeat is older than ``stale_after_s`` belongs to an owner that died (a killed
driver, a lost node) and may be taken over; on the owner's own host, a dead owner process is seen
at once. A takeover renames the stale file away first, so two
processes taking over at once cannot both win: the loser finds the winner's fresh lease and puts
it back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from schemas.errors import UserError

LEASE_FILE = ".lease"


class RunLocked(UserError):
    """Another live process owns this run id."""


class Lease:
    def __init__(self, run_dir: Path, run_id: str, heartbeat_s: float = 10.0, stale_after_s: float = 60.0):
        self.path = Path(run_dir) / LEASE_FILE
        self.run_id = run_id
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.owner = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "job_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, wait: bool = False, poll_s: float = 2.0) -> "Lease":
        """Take the lease, waiting for a live owner to finish when ``wait``.

        Raises:
            RunLocked: a live owner holds it and ``wait`` is false.
        """
        while not self._try_take():
            if not wait:
                holder = self._read() or {}
                raise RunLocked(
                    f"--run-id {self.run_id}: in use by host {holder.get('host')} pid {holder.get('pid')}"
                    f"{' job ' + holder['job_id'] if holder.get('job_id') else ''} since {holder.get('since')}; "
                    "wait for it to finish, or pass --wait-for-lock to queue behind it")
            time.sleep(poll_s)
        self._thread = threading.Thread(target=self._beat, name="bnflow-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get("owner") == self.owner["owner"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def _try_take(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over_if_stale()
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _take_over_if_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return self._try_take()
        stale = self._read()
        if age < self.stale_after_s and not _owner_died_here(stale):
            return False
        aside = self.path.with_name(f"{LEASE_FILE}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # someone else moved it first
            return self._try_take()
        moved = json.loads(aside.read_text() or "{}") if aside.exists() else {}
        if stale is not None and moved.get("owner") != stale.get("owner"):
            # We moved a fresh lease that a concurrent taker had just written: put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._try_take()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass


def _owner_died_here(owner: dict | None) -> bool:
    """An owner on this host whose process is gone: no need to wait for its heartbeat to age."""
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
