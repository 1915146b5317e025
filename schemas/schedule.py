"""A recurring run's policy: the ``pipeline schedule`` command's options, checked as one model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CronSchedule(BaseModel):
    """When to run, and what to do about missed and overlapping slots."""

    model_config = ConfigDict(extra="forbid")
    cron: str = Field(description="five-field cron expression in UTC, e.g. '0 2 * * *' (02:00 every day)")
    catchup: Literal["none", "latest", "all"] = Field(
        "latest", description="slots missed while no scheduler ran: none, only the latest, or all (oldest first)")
    max_active: int = Field(1, ge=1, description="at most this many of the schedule's jobs run at once")
    overlap: Literal["queue", "skip"] = Field(
        "queue", description="a slot due while max_active jobs run: wait for one to end (queue) or drop it (skip)")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from croniter import croniter

        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a five-field cron expression (minute hour day month weekday), e.g. '0 2 * * *'")
        return v
