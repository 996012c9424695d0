"""Scheduled imaging: windows, one image per window however often the trigger fires, and retention."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vhdcore
from functions.catalog.launch import execution_input
from functions.catalog.requests import Launcher, request_image
from functions.catalog.schedules import due_image, next_run, run_due, scheduled_starter, window_start
from functions.handlers.runtime import services as runtime_services
from functions.imaging.jobs import ImagingRequest
from functions.imaging.retention import expired_images
from functions.imaging.services import ImagingServices
from functions.state import Image, ImageOrigin, Schedule, ScheduleFrequency, Server, Status
from statemachine.local import LocalImaging

MIB = 1024**2
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


def image(image_id: str, server: str, origin: ImageOrigin, status: Status, minute: int) -> Image:
    return Image(
        id=image_id,
        tenant="t1",
        server_id=server,
        name=image_id,
        origin=origin,
        status=status,
        created_at=EPOCH + timedelta(minutes=minute),
    )


def test_retention_selects_only_old_active_scheduled_images_of_the_server() -> None:
    images = [image(f"sched-{n}", "s1", ImageOrigin.SCHEDULED, Status.ACTIVE, n) for n in range(6)] + [
        image("on-demand", "s1", ImageOrigin.ON_DEMAND, Status.ACTIVE, -5),
        image("failed", "s1", ImageOrigin.SCHEDULED, Status.ERROR, -4),
        image("running", "s1", ImageOrigin.SCHEDULED, Status.SAVING, -3),
        image("other-server", "s2", ImageOrigin.SCHEDULED, Status.ACTIVE, -2),
    ]
    assert [i.id for i in expired_images(images, "s1", keep=3)] == ["sched-0", "sched-1", "sched-2"]
    assert expired_images(images, "s1", keep=6) == []


# --- end to end: the real workflow in this process ------------------------------------------------------------------
@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ImagingServices, LocalImaging]]:
    monkeypatch.setenv("IMAGING_STORE", (tmp_path / "store").as_uri())
    monkeypatch.setenv("IMAGING_STATE", f"sqlite:///{tmp_path / 'state.sqlite3'}")
    services = runtime_services()
    for server in ("s1", "s2"):
        folder = tmp_path / "disks" / server
        folder.mkdir(parents=True)
        leaf = folder / "disk.vhd"
        vhdcore.create(str(leaf), 8 * MIB)
        vhdcore.write(str(leaf), MIB, f"server {server} data ".encode() * 5000)
        services.state.put_server(Server(id=server, tenant="t1", name=server, disk=str(leaf), created_at=EPOCH))
    with LocalImaging() as runner:
        yield services, runner


def launcher_into(runner: LocalImaging, executions: list[str]) -> Launcher:
    lock = threading.Lock()

    def launch(request: ImagingRequest) -> None:
        execution = runner.start(execution_input(request))
        with lock:
            executions.append(execution)

    return launch


def wait_all(runner: LocalImaging, executions: list[str], since: int) -> None:
    for execution in sorted(set(executions[since:])):
        result = runner.wait(execution, timeout_s=300)
        assert result.succeeded, (result.error, result.cause)


def daily_schedule(server: str, retention: int, created: datetime) -> Schedule:
    return Schedule(
        server_id=server, tenant="t1", frequency=ScheduleFrequency.DAILY, at=time(1, 0),
        retention=retention, created_at=created,
    )  # fmt: skip


def test_a_trigger_delivered_three_times_at_once_starts_one_image(local: tuple[ImagingServices, LocalImaging]) -> None:
    services, runner = local
    services.state.put_schedule(daily_schedule("s1", 3, EPOCH))
    now = datetime(2026, 2, 1, 1, 5, tzinfo=UTC)
    executions: list[str] = []
    start = scheduled_starter(services, launcher_into(runner, executions))
    deliveries = threading.Barrier(3)
    outcomes = []

    def deliver() -> None:
        deliveries.wait(timeout=30)
        outcomes.append(run_due(services.state, now, start))

    threads = [threading.Thread(target=deliver) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    wait_all(runner, executions, 0)
    images = services.state.list_images(server_id="s1")
    assert len(images) == 1 and images[0].origin is ImageOrigin.SCHEDULED and images[0].status is Status.ACTIVE
    assert run_due(services.state, now + timedelta(hours=3), start).started == []  # late redelivery: nothing new


def test_ten_scheduled_runs_with_retention_three_keep_the_newest_three(
    local: tuple[ImagingServices, LocalImaging],
) -> None:
    services, runner = local
    executions: list[str] = []
    launch = launcher_into(runner, executions)
    start = scheduled_starter(services, launch)
    # Untouchable neighbours: an on-demand image of s1, s2's scheduled image (retention 1), a failed scheduled one.
    on_demand = request_image(services, launch, tenant="t1", server_id="s1", name="by hand")
    wait_all(runner, executions, 0)
    services.state.put_schedule(daily_schedule("s2", 1, EPOCH))
    # moto keeps executions for the life of the process: other days than the other test's, so names never collide.
    assert run_due(services.state, datetime(2026, 3, 1, 1, 0, tzinfo=UTC), start).started
    wait_all(runner, executions, 0)
    services.state.put_image(image("failed-sched", "s1", ImageOrigin.SCHEDULED, Status.ERROR, 0))

    services.state.put_schedule(daily_schedule("s1", 3, EPOCH))
    made = []
    for day in range(10):
        now = datetime(2026, 3, 2, 1, 0, tzinfo=UTC) + timedelta(days=day, minutes=7)
        since = len(executions)
        outcome = run_due(services.state, now, start)
        started_for_s1 = [due for due in outcome.started if due.server_id == "s1"]
        assert len(started_for_s1) == 1, outcome
        made.append(started_for_s1[0].image_id)
        wait_all(runner, executions, since)

    s1 = {i.id: i for i in services.state.list_images(server_id="s1")}
    scheduled_active = [i for i in s1.values() if i.origin is ImageOrigin.SCHEDULED and i.status is Status.ACTIVE]
    assert sorted(i.id for i in scheduled_active) == sorted(made[-3:])
    assert on_demand.image_id in s1 and "failed-sched" in s1
    assert len(services.state.list_images(server_id="s2")) == 1
    for deleted in made[:-3]:
        assert not list(services.store.list_objects(f"images/{deleted}/"))
