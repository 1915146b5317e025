"""``python -m pipeline schedule``: a small long-running process that submits one job per due cron
slot, for users with no scheduler of their own.

It keeps no state of its own: a slot is handled when the cluster holds a job for it (the slot's
submission ids are deterministic, ``pipeline.jobs.submit``), so a restarted scheduler knows what ran.
Every submission goes through ``pipeline submit``'s code path, so a slot retried by hand and by the
scheduler is still one run.
"""

from __future__ import annotations

import datetime as dt
from typing import Callable

from pipeline.jobs import slots
from pipeline.jobs.submit import LIVE
from schemas.schedule import CronSchedule


def slots_between(cron: str, after: dt.datetime, until: dt.datetime) -> list[dt.datetime]:
    """The cron's slots in (after, until], oldest first, as aware UTC datetimes."""
    from croniter import croniter

    it = croniter(cron, after.astimezone(dt.timezone.utc))
    out = []
    while True:
        slot = it.get_next(dt.datetime)
        if slot > until:
            return out
        out.append(slot)


class Scheduler:
    """Decides which slots to submit at each tick; all I/O is injected (tests drive it with a clock).

    Args:
        jobs: returns {slot: job status} of this schedule's jobs on the cluster.
        submit: submits one slot's job (and returns without waiting for it).
        say: one console line.
    """

    def __init__(self, cfg: CronSchedule, jobs: Callable[[], dict], submit: Callable[[dt.datetime], None],
                 say: Callable[[str], None], started: dt.datetime):
        self.cfg, self.jobs, self.submit, self.say = cfg, jobs, submit, say
        self.started = started
        self.queue: list[dt.datetime] = []
        self.skipped: set[dt.datetime] = set()
        self.first = True

    def tick(self, now: dt.datetime) -> list[dt.datetime]:
        """Submit what is due at ``now``; returns the slots submitted."""
        jobs = self.jobs()
        due = slots_between(self.cfg.cron, self.started, now)
        if self.first:  # missed while no scheduler ran: slots after the newest one with a job
            self.first = False
            # "all" with no job yet takes only the latest too: a new schedule does not replay a year.
            if self.cfg.catchup != "none":
                last = max(jobs) if jobs else None
                missed = slots_between(self.cfg.cron, last or self.started - dt.timedelta(days=366), self.started)
                if last is None or self.cfg.catchup == "latest":
                    missed = missed[-1:]
                due = missed + due
        for slot in due:
            if slot not in jobs and slot not in self.queue and slot not in self.skipped:
                self.queue.append(slot)
        live = sum(1 for status in jobs.values() if status in LIVE)
        submitted = []
        while self.queue and live < self.cfg.max_active:
            slot = self.queue[0]
            self.submit(slot)  # if this raises, the slot stays first in the queue for the next tick
            self.queue.pop(0)
            submitted.append(slot)
            live += 1
        if self.cfg.overlap == "skip":
            for slot in self.queue:
                self.say(f"schedule: skipping slot {slots.slot_label(slot)}: {live} job(s) of this schedule still run "
                         f"(max_active={self.cfg.max_active})")
                self.skipped.add(slot)
            self.queue = []
        return submitted

    def run_forever(self, clock: Callable[[], dt.datetime], sleep: Callable[[float], None], poll_s: float = 30.0) -> None:
        """Tick every ``poll_s`` seconds. A failed tick (the cluster unreachable, a submission refused)
        is said and tried again at the next one: a scheduler outlives its cluster's restarts."""
        while True:
            try:
                self.tick(clock())
            except Exception as e:
                self.say(f"schedule: {e}; trying again in {poll_s:.0f}s")
            sleep(poll_s)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def cluster_jobs(client, schedule: str) -> Callable[[], dict]:
    """{slot: status} of ``schedule``'s jobs (by the metadata ``pipeline submit`` gives them); a slot
    with several attempts counts by its newest."""
    def jobs() -> dict:
        out = {}
        for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            meta = j.metadata or {}
            if meta.get("bnflow.schedule") == schedule and meta.get("bnflow.slot"):
                out[slots.parse_slot(meta["bnflow.slot"])] = str(getattr(j.status, "value", j.status))
        return out

    return jobs
