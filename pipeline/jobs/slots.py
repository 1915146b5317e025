"""Run slots of a schedule: (schedule name, slot time) -> one run id, whoever triggers it and however often.

A scheduler (cron, Kubernetes, Airflow, ``pipeline schedule``) that runs ``--slot <time>`` for each
due time gets one run per slot: a retry of the slot names the same run id, so it resumes that run
(the run's lease keeps two attempts from overlapping) instead of starting a second one.
"""

from __future__ import annotations

import datetime as dt
import re

from schemas.errors import ConfigError

SCHEDULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_slot(text: str) -> dt.datetime:
    """``2026-11-24T02:00Z`` (or any ISO 8601 time with a zone) -> an aware UTC datetime, to the minute.

    Raises:
        ConfigError: not an ISO time, or one without a time zone (ambiguous across machines).
    """
    try:
        slot = dt.datetime.fromisoformat(text.strip().replace(" ", "T"))
    except ValueError:
        raise ConfigError(f"--slot {text!r}: not an ISO 8601 time; write it like 2026-11-24T02:00Z") from None
    if slot.tzinfo is None:
        raise ConfigError(f"--slot {text!r}: give the time zone (a slot names one instant on every machine), "
                          f"e.g. {slot:%Y-%m-%dT%H:%M}Z")
    if slot.second or slot.microsecond:
        raise ConfigError(f"--slot {text!r}: slots are whole minutes, e.g. {slot:%Y-%m-%dT%H:%M%z}")
    return slot.astimezone(dt.timezone.utc)


def check_schedule_name(name: str) -> str:
    if not SCHEDULE_NAME.fullmatch(name):
        raise ConfigError(f"--schedule {name!r}: use letters, digits, '.', '_' and '-' only, at most 64 characters")
    return name


def slot_run_id(schedule: str, slot: dt.datetime) -> str:
    """The run id of a slot: ``<schedule>-<UTC time to the minute>``, e.g. ``nightly-20261124T0200Z``."""
    return f"{schedule}-{slot.astimezone(dt.timezone.utc):%Y%m%dT%H%MZ}"


def slot_label(slot: dt.datetime) -> str:
    """The slot as shown and tagged: ``2026-11-24T02:00Z``."""
    return f"{slot.astimezone(dt.timezone.utc):%Y-%m-%dT%H:%MZ}"
