"""When a schedule fires (DESIGN §6, `imaging schedule`): the window a moment falls in, the next run after it, and
whether a window is due; pure functions of a schedule and a time (functions/catalog/schedules.py), in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.catalog.schedules import due_image, next_run, window_start
from functions.state import Schedule, ScheduleFrequency

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def schedule_of(frequency: ScheduleFrequency, at: time, weekday: int | None, created_at: datetime = EPOCH) -> Schedule:
    return Schedule(
        server_id="s1", tenant="t1", frequency=frequency, at=at, weekday=weekday, retention=3, created_at=created_at
    )


@settings(max_examples=300, deadline=None)
@given(
    now=st.datetimes(min_value=datetime(2026, 1, 2), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    weekday=st.none() | st.integers(0, 6),
)
def test_the_window_is_the_latest_firing_at_or_before_now(
    now: datetime, hour: int, minute: int, weekday: int | None
) -> None:
    frequency = ScheduleFrequency.DAILY if weekday is None else ScheduleFrequency.WEEKLY
    period = timedelta(days=1 if weekday is None else 7)
    window = window_start(schedule_of(frequency, time(hour, minute), weekday), now)
    assert window <= now < window + period
    assert (window.hour, window.minute, window.second, window.microsecond) == (hour, minute, 0, 0)
    if weekday is not None:
        assert window.weekday() == weekday


@pytest.mark.parametrize(
    ("now", "at", "weekday", "expected"),
    [
        # Daily: later today; tomorrow once today's time has come (at that very minute, or past it).
        (datetime(2026, 3, 10, 1, 59, 59, tzinfo=UTC), time(2, 0), None, datetime(2026, 3, 10, 2, 0, tzinfo=UTC)),
        (datetime(2026, 3, 10, 2, 0, tzinfo=UTC), time(2, 0), None, datetime(2026, 3, 11, 2, 0, tzinfo=UTC)),
        (datetime(2026, 3, 10, 23, 59, tzinfo=UTC), time(0, 0), None, datetime(2026, 3, 11, 0, 0, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 30, tzinfo=UTC), time(23, 0), None, datetime(2027, 1, 1, 23, 0, tzinfo=UTC)),
        # Weekly (2026-03-10 is a Tuesday, weekday 1): later today on its day; next week on the same day once its
        # time has passed; later this week; and across a month's end.
        (datetime(2026, 3, 10, 8, 0, tzinfo=UTC), time(9, 30), 1, datetime(2026, 3, 10, 9, 30, tzinfo=UTC)),
        (datetime(2026, 3, 10, 9, 31, tzinfo=UTC), time(9, 30), 1, datetime(2026, 3, 17, 9, 30, tzinfo=UTC)),
        (datetime(2026, 3, 10, 9, 30, tzinfo=UTC), time(9, 30), 1, datetime(2026, 3, 17, 9, 30, tzinfo=UTC)),
        (datetime(2026, 3, 10, 23, 0, tzinfo=UTC), time(1, 0), 2, datetime(2026, 3, 11, 1, 0, tzinfo=UTC)),
        (datetime(2026, 3, 10, 8, 0, tzinfo=UTC), time(7, 0), 0, datetime(2026, 3, 16, 7, 0, tzinfo=UTC)),
        (datetime(2026, 3, 28, 12, 0, tzinfo=UTC), time(6, 0), 2, datetime(2026, 4, 1, 6, 0, tzinfo=UTC)),
    ],
)
def test_the_next_run_is_later_today_tomorrow_or_next_week(
    now: datetime, at: time, weekday: int | None, expected: datetime
) -> None:
    frequency = ScheduleFrequency.DAILY if weekday is None else ScheduleFrequency.WEEKLY
    assert next_run(schedule_of(frequency, at, weekday), now) == expected


def test_the_next_run_is_computed_in_utc_whatever_the_zone_of_now() -> None:
    """10:00 in New York (UTC-5 in January) is 15:00 UTC: a 14:00 UTC daily schedule next fires tomorrow."""
    new_york = timezone(timedelta(hours=-5))
    found = next_run(schedule_of(ScheduleFrequency.DAILY, time(14, 0), None), datetime(2026, 1, 5, 10, tzinfo=new_york))
    assert found == datetime(2026, 1, 6, 14, 0, tzinfo=UTC) and found.utcoffset() == timedelta(0)


@settings(max_examples=300, deadline=None)
@given(
    now=st.datetimes(min_value=datetime(2026, 1, 2), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    weekday=st.none() | st.integers(0, 6),
)
def test_the_next_run_is_the_first_firing_after_now(now: datetime, hour: int, minute: int, weekday: int | None) -> None:
    frequency = ScheduleFrequency.DAILY if weekday is None else ScheduleFrequency.WEEKLY
    period = timedelta(days=1 if weekday is None else 7)
    found = next_run(schedule_of(frequency, time(hour, minute), weekday), now)
    assert now < found <= now + period
    assert (found.hour, found.minute, found.second, found.microsecond) == (hour, minute, 0, 0)
    if weekday is not None:
        assert found.weekday() == weekday


def test_a_window_is_due_once_and_never_before_the_schedule_existed() -> None:
    daily = schedule_of(ScheduleFrequency.DAILY, time(2, 30), None, created_at=datetime(2026, 3, 10, 12, tzinfo=UTC))
    assert due_image(daily, datetime(2026, 3, 10, 23, tzinfo=UTC)) is None  # today's 02:30 predates the schedule
    due = due_image(daily, datetime(2026, 3, 11, 2, 31, tzinfo=UTC))
    assert due is not None and due.window == datetime(2026, 3, 11, 2, 30, tzinfo=UTC)
    later = due_image(daily, datetime(2026, 3, 11, 20, tzinfo=UTC))
    assert later is not None and later.job_id == due.job_id
    started = daily.model_copy(update={"last_window_started": due.window})
    assert due_image(started, datetime(2026, 3, 11, 20, tzinfo=UTC)) is None
    assert due_image(started, datetime(2026, 3, 12, 2, 30, tzinfo=UTC)) is not None
