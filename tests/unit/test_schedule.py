"""The scheduler's decisions, driven by an injected clock and a fake job list (its I/O is injected;
the real submission path is tested in tests/integration/test_submit.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.jobs.schedule import Scheduler, slots_between
from schemas.schedule import CronSchedule

UTC = dt.timezone.utc


def t(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


class Cluster:
    """Jobs by slot, as the scheduler sees them; submitting a slot adds a RUNNING job."""

    def __init__(self, jobs=None):
        self.jobs = dict(jobs or {})
        self.submitted: list[dt.datetime] = []

    def submit(self, slot):
        assert slot not in self.jobs, "a slot submitted twice"
        self.submitted.append(slot)
        self.jobs[slot] = "RUNNING"


def scheduler(cluster, started, **policy) -> Scheduler:
    cfg = CronSchedule(cron="0 2 * * *", **policy)
    return Scheduler(cfg, lambda: dict(cluster.jobs), cluster.submit, lambda line: None, started=started)


def test_slots_between_is_half_open_and_ordered():
    assert slots_between("0 2 * * *", t(24, 2), t(26, 2)) == [t(25, 2), t(26, 2)]
    assert slots_between("0 */6 * * *", t(24, 1), t(24, 13)) == [t(24, 6), t(24, 12)]


def test_each_due_slot_is_submitted_once_as_the_clock_passes_it():
    cluster = Cluster({t(23, 2): "SUCCEEDED"})
    s = scheduler(cluster, started=t(23, 12))
    assert s.tick(t(23, 12)) == []  # the 23rd's slot already has a job
    assert s.tick(t(24, 1, 59)) == []
    assert s.tick(t(24, 2)) == [t(24, 2)]
    assert s.tick(t(24, 2, 1)) == []  # still due, but it has a job now
    cluster.jobs[t(24, 2)] = "SUCCEEDED"
    assert s.tick(t(25, 2, 30)) == [t(25, 2)]
    assert cluster.submitted == [t(24, 2), t(25, 2)]


@pytest.mark.parametrize("catchup, expected", [("none", []), ("latest", [t(23, 2)]),
                                               ("all", [t(21, 2), t(22, 2), t(23, 2)])])
def test_catch_up_after_downtime(catchup, expected):
    cluster = Cluster({t(20, 2): "SUCCEEDED"})  # then the scheduler was down for three slots
    s = scheduler(cluster, started=t(23, 9), catchup=catchup, max_active=5)
    assert s.tick(t(23, 9)) == expected


def test_a_new_schedule_catching_up_all_takes_only_the_latest():
    s = scheduler(Cluster(), started=t(23, 9), catchup="all", max_active=5)
    assert s.tick(t(23, 9)) == [t(23, 2)]


def test_a_slot_due_while_the_previous_runs_is_queued_then_submitted():
    cluster = Cluster({t(23, 2): "RUNNING"})
    s = scheduler(cluster, started=t(23, 3), overlap="queue")
    assert s.tick(t(24, 2)) == []  # max_active=1 and the 23rd still runs
    assert s.queue == [t(24, 2)]
    cluster.jobs[t(23, 2)] = "SUCCEEDED"
    assert s.tick(t(24, 2, 30)) == [t(24, 2)]


def test_a_slot_due_while_the_previous_runs_is_skipped_for_good():
    cluster = Cluster({t(23, 2): "RUNNING"})
    s = scheduler(cluster, started=t(23, 3), overlap="skip")
    assert s.tick(t(24, 2)) == []
    cluster.jobs[t(23, 2)] = "FAILED"
    assert s.tick(t(24, 3)) == []  # the 24th was skipped, not queued
    assert s.tick(t(25, 2)) == [t(25, 2)]


def test_a_bad_cron_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="not a five-field cron expression"):
        CronSchedule(cron="0 2 * *")


def test_a_failed_submission_is_retried_at_the_next_tick_and_the_scheduler_lives_on():
    cluster = Cluster()
    down = {"n": 1}

    def flaky(slot):
        if down["n"]:
            down["n"] -= 1
            raise ConnectionError("dashboard unreachable")
        cluster.submit(slot)

    class Stop(BaseException):  # not an Exception: the loop does not swallow it
        pass

    said, clock = [], iter([t(24, 2), t(24, 2, 1)])

    def sleep(_):
        if not clock.__length_hint__():
            raise Stop

    s = Scheduler(CronSchedule(cron="0 2 * * *", catchup="none"), lambda: dict(cluster.jobs), flaky, said.append,
                  started=t(24, 1))
    with pytest.raises(Stop):  # after two ticks
        s.run_forever(lambda: next(clock), sleep)
    assert cluster.submitted == [t(24, 2)]
    assert said == ["schedule: dashboard unreachable; trying again in 30s"]
