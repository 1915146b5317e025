"""One owner per run id: an exclusive lease file in the run directory, kept alive by a counter.

The protocol, on a local disk or a shared filesystem (NFS included), compares no clock between
machines:

- ``.lease`` names its owner: a random token, the host name, the node (see below), the pid and the
  start time (for people to read; no code compares it). It is written whole to a temporary file and
  published with ``os.link``, which fails when ``.lease`` exists: one creator succeeds, and no
  reader ever sees half a file. The owner never rewrites ``.lease``.
- The owner shows it is alive by raising a counter in its own beat file, ``.lease.<token>.beat``,
  every ``heartbeat_s`` seconds (a temporary file, then ``os.replace``). Nobody else writes that
  file, so a heartbeat cannot overwrite another owner's lease.
- A process that finds ``.lease`` held watches the pair (token, counter) and calls the lease stale
  only once the pair has not changed for ``stale_after_s`` seconds of its own ``time.monotonic()``;
  file times play no part. ``acquire(wait=False)`` therefore refuses a held lease at once, with one
  exception: an owner on this very node (same boot id and pid namespace; a host name cannot tell
  nodes apart) whose process no longer exists.
- A taker first claims the stale lease: ``os.link(".lease", ".lease.taking-<token>")`` succeeds for
  one taker per stale token, and the claim is the lease file itself, so the taker checks that it
  holds the lease it judged before removing ``.lease`` and creating its own as above. A taker that
  linked a newer lease drops its claim and keeps waiting.
- Before every beat the owner reads ``.lease``: vanished, or naming another token, means the lease
  was taken. The owner then sets ``lost``, removes its own beat file, writes nothing more and calls
  ``on_lost`` once.

What is not guaranteed: an owner that stalls (a frozen VM, a partitioned NFS client) for longer than
``stale_after_s`` is taken over while it cannot look, and when it wakes it may keep working for up
to ``heartbeat_s`` before its next beat shows it the loss; no lease closes that window without the
storage itself refusing stale writers. Likewise ``release`` reads the token and then unlinks: an
owner stalled that long between the two removes its taker's lease, and the taker learns of it at
its next beat. A taker that dies between its claim and its removal of the stale lease leaves the
claim behind; a waiter disregards such a claim once it has watched the lease stale for twice
``stale_after_s``, and only a taker stalled, not dead, that long could then collide with it.
In each case the loser learns of it at its next beat, at most ``heartbeat_s`` later, and is told
through ``on_lost``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from schemas.errors import UserError

LEASE_FILE = ".lease"
TOKEN = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


class RunLocked(UserError):
    """Another live process owns this run id."""


class Lease:
    """The lease of one run directory (see the module docstring for the protocol).

    Args:
        run_dir: the run's directory; it must exist.
        run_id: named in messages only.
        heartbeat_s: seconds between the owner's beats (and its checks that it still owns the lease).
        stale_after_s: seconds a taker watches an unchanged beat before taking over; must exceed
            ``heartbeat_s`` by enough to cover a slow beat (the default is six beats).
        on_lost: called once, from the heartbeat thread, with a one-line message when another
            process has taken the lease; the caller decides how to stop its work.
    """

    def __init__(self, run_dir: Path, run_id: str, heartbeat_s: float = 10.0, stale_after_s: float = 60.0,
                 on_lost: Optional[Callable[[str], None]] = None):
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"heartbeat_s={heartbeat_s}, stale_after_s={stale_after_s}: need 0 < heartbeat_s < "
                             "stale_after_s, or a live owner would look stale between two beats")
        self.path = Path(run_dir) / LEASE_FILE
        self.run_id = run_id
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.on_lost = on_lost
        self.owner = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "node": this_node(), "pid": os.getpid(),
                      "job_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.lost = threading.Event()
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, wait: bool = False, poll_s: float = 2.0) -> "Lease":
        """Take the lease, waiting for a live owner to finish when ``wait``.

        A held lease is taken over only when its beat has not moved for ``stale_after_s`` seconds
        while this call watched (so only when ``wait``), or at once when its owner was a process on
        this node that no longer exists.

        Raises:
            RunLocked: the lease is held and ``wait`` is false.
        """
        watched, since = None, 0.0
        while not self._create():
            holder = _read(self.path)
            if holder is None:  # released between our create and our read
                continue
            token = holder.get("token")
            seen = (token, self._beat_of(token))
            if seen != watched:
                watched, since = seen, time.monotonic()
            quiet = time.monotonic() - since
            if quiet >= self.stale_after_s or self._died_on_this_node(holder):
                if self._take_over(token, claim_abandoned=quiet >= 2 * self.stale_after_s):
                    break
            if not wait:
                raise RunLocked(
                    f"--run-id {self.run_id}: in use by host {holder.get('host')} pid {holder.get('pid')}"
                    f"{' job ' + holder['job_id'] if holder.get('job_id') else ''} since {holder.get('since')}; "
                    "wait for it to finish, or pass --wait-for-lock to queue behind it")
            time.sleep(poll_s)
        self._write_beat()
        self._thread = threading.Thread(target=self._beat, name="bnflow-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop beating and remove the lease, unless another process has taken it meanwhile."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set() and (_read(self.path) or {}).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)
        self._beat_path(self.owner["token"]).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def _create(self) -> bool:
        """Publish our lease if there is none; whole or not at all."""
        tmp = self.path.with_name(f"{LEASE_FILE}.new-{self.owner['token']}")
        with open(tmp, "w") as f:
            json.dump(self.owner, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            # On NFS a link retried after a lost reply reports EEXIST although it worked; the link
            # count of our own file tells (the method open(2) gives for lock files over NFS).
            return os.stat(tmp).st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, token, claim_abandoned: bool) -> bool:
        """Replace the lease of ``token``, judged stale, by ours. False when another process got there first.

        The claim, a second name for the lease file made with ``os.link``, makes the takeover
        exclusive: there is one claim name per stale token, and it names the very file it was made
        from, so we check what we will remove, and ``.lease`` never goes missing for another taker to
        refill while we look. While the claim exists, no other taker removes that lease.
        """
        claim = self.path.with_name(f"{LEASE_FILE}.taking-{token if _is_token(token) else 'unreadable'}")
        try:
            os.link(self.path, claim)
        except FileNotFoundError:  # released, or taken over, since we looked
            return False
        except FileExistsError:
            if claim_abandoned:
                # The lease has sat stale for two periods under a claim that a taker finishes in
                # microseconds: that taker died in between. Clear it; the next poll claims afresh.
                claim.unlink(missing_ok=True)
            return False
        claimed = _read(claim)
        if claimed is None or claimed.get("token") != token:
            claim.unlink(missing_ok=True)  # we linked a newer lease than the one we judged: leave it be
            return False
        self.path.unlink(missing_ok=True)
        claim.unlink(missing_ok=True)
        if _is_token(token):
            self._beat_path(token).unlink(missing_ok=True)
        return self._create()  # a newcomer may create first; then it, not we, is the one owner

    def _died_on_this_node(self, holder: dict) -> bool:
        """An owner on this node whose process is gone: no need to wait for its beat to stop moving.

        Only on the same node does a pid name the same process; a host name does not say that
        (containers and cloned machines share names), the boot id and pid namespace do.
        """
        if self.owner["node"] is None or holder.get("node") != self.owner["node"]:
            return False
        if not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        return False

    def _beat_path(self, token) -> Path:
        return self.path.with_name(f"{LEASE_FILE}.{token}.beat")

    def _beat_of(self, token) -> Optional[int]:
        """The counter of ``token``'s beat file; None when there is none (yet, or any more)."""
        if not _is_token(token):
            return None
        try:
            return int(self._beat_path(token).read_text())
        except (OSError, ValueError):
            return None

    def _write_beat(self) -> None:
        beat = self._beat_path(self.owner["token"])
        tmp = beat.with_name(beat.name + ".tmp")
        try:
            tmp.write_text(str(self._beats))
            os.replace(tmp, beat)
        except OSError:
            pass  # a storage hiccup: the next beat tries again; a long outage ends as a takeover, which we detect
        self._beats += 1

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = _read(self.path)
            except OSError:
                continue  # cannot tell (storage unreachable): neither claim the lease nor give it up
            if holder is None or holder.get("token") != self.owner["token"]:
                self._lose(holder)
                return
            self._write_beat()

    def _lose(self, holder: Optional[dict]) -> None:
        self.lost.set()
        self._beat_path(self.owner["token"]).unlink(missing_ok=True)  # our own file: nobody else reads it now
        taker = (f"host {holder.get('host')} pid {holder.get('pid')}" if holder is not None
                 else f"nobody (its file {self.path} was removed)")
        if self.on_lost is not None:
            self.on_lost(f"lost the lease of run id {self.run_id} to {taker}")


def this_node() -> Optional[str]:
    """This kernel boot and pid namespace: the scope within which a pid names one process.

    None where ``/proc`` cannot say (not Linux); then no owner is ever judged dead by its pid.
    """
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot_id} {pid_namespace}"


def _is_token(token) -> bool:
    """Whether a lease file's token can be part of a file name (a tampered file's need not)."""
    return isinstance(token, str) and TOKEN.fullmatch(token) is not None


def _read(path: Path) -> Optional[dict]:
    """The lease record at ``path``: None when there is no file, {} when it is not a lease record.

    Raises:
        OSError: the file exists but cannot be read (storage unreachable).
    """
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
