"""Scheduled imaging: which window of a schedule is due, and starting exactly one image per server and window.

A schedule fires at HH:MM UTC every day, or on one weekday. The *window* is the latest such instant at or before
now; a window is due when it is not older than the schedule itself and later than the last window started. The run
derives the job and image ids from (server, window), starts the image through an idempotent `start` (the same ids
give the same job and execution), and then records the window. So a trigger delivered twice, late, or concurrently
starts one image per window, and a run that crashed between the start and the record is repaired by the next one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from functions.catalog.requests import Launcher, request_image
from functions.imaging.services import ImagingServices
from functions.state import ImageOrigin, Schedule, ScheduleFrequency, StateStore

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
"""Schedule.weekday 0..6, as datetime.weekday() counts them."""
MAX_LATENESS = timedelta(days=7)
"""A window older than this is skipped rather than imaged (a schedule paused for weeks starts afresh)."""


@dataclass(frozen=True)
class DueImage:
    """One scheduled image to start: deterministic ids so that duplicates converge."""

    server_id: str
    tenant: str
    window: datetime
    job_id: str
    image_id: str
    name: str


def window_start(schedule: Schedule, now: datetime) -> datetime:
    """The latest instant at or before `now` at which the schedule fires."""
    now = now.astimezone(UTC)
    today = now.replace(hour=schedule.at.hour, minute=schedule.at.minute, second=0, microsecond=0)
    if schedule.frequency is ScheduleFrequency.DAILY:
        return today if today <= now else today - timedelta(days=1)
    assert schedule.weekday is not None  # the model guarantees a weekday for weekly schedules
    back = (now.weekday() - schedule.weekday) % 7
    candidate = today - timedelta(days=back)
    return candidate if candidate <= now else candidate - timedelta(days=7)


def period(schedule: Schedule) -> timedelta:
    """The time between two firings of the schedule."""
    return timedelta(days=1 if schedule.frequency is ScheduleFrequency.DAILY else 7)


def next_run(schedule: Schedule, now: datetime) -> datetime:
    """The first instant strictly after `now` at which the schedule fires: later today, tomorrow, or (weekly) up to
    a week ahead: a week ahead when today is its day and its time has come."""
    return window_start(schedule, now) + period(schedule)


def due_image(schedule: Schedule, now: datetime) -> DueImage | None:
    """The image this schedule owes at `now`, if any."""
    window = window_start(schedule, now)
    if window < schedule.created_at or now - window > MAX_LATENESS:
        return None
    if schedule.last_window_started is not None and window <= schedule.last_window_started:
        return None
    stamp = window.strftime("%Y%m%dT%H%MZ")
    # Ids stay within the state's id pattern (80 characters): the server id is at most 80, so hash if needed.
    key = f"{schedule.server_id}-{stamp}"
    return DueImage(
        server_id=schedule.server_id,
        tenant=schedule.tenant,
        window=window,
        job_id=_bounded(f"sj-{key}"),
        image_id=_bounded(f"si-{key}"),
        name=f"scheduled {window:%Y-%m-%d %H:%M} UTC",
    )


def _bounded(identifier: str) -> str:
    if len(identifier) <= 80:
        return identifier
    return identifier[:56] + "-" + hashlib.sha256(identifier.encode()).hexdigest()[:23]


@dataclass(frozen=True)
class RunOutcome:
    started: list[DueImage]
    failed: list[tuple[DueImage, str]]


def run_due(state: StateStore, now: datetime, start: Callable[[DueImage], None]) -> RunOutcome:
    """Start every due scheduled image once. `start` must be idempotent for the same ids (it is retried by later
    runs if it fails); one failing server does not stop the others."""
    started: list[DueImage] = []
    failed: list[tuple[DueImage, str]] = []
    for schedule in state.list_schedules():
        due = due_image(schedule, now)
        if due is None:
            continue
        try:
            start(due)
        except Exception as error:  # reported per server; the window stays due for the next run
            failed.append((due, f"{type(error).__name__}: {error}"))
            continue
        state.claim_schedule_window(due.server_id, due.window)
        started.append(due)
    return RunOutcome(started=started, failed=failed)


def start_due_images(services: ImagingServices, launch: Launcher) -> RunOutcome:
    """The timer's work: start every schedule's due image now (`run_due` with `scheduled_starter`)."""
    return run_due(services.state, services.now(), scheduled_starter(services, launch))


def scheduled_starter(services: ImagingServices, launch: Launcher) -> Callable[[DueImage], None]:
    """`start` for run_due: request the scheduled image with its deterministic ids (idempotent)."""

    def start(due: DueImage) -> None:
        request_image(
            services,
            launch,
            tenant=due.tenant,
            server_id=due.server_id,
            name=due.name,
            job_id=due.job_id,
            image_id=due.image_id,
            origin=ImageOrigin.SCHEDULED,
        )

    return start
