"""Scheduled imaging: one image per window however often the trigger fires, and retention (when a schedule fires:
tests/unit/test_schedule_windows.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

import vhdcore
from functions.catalog.launch import execution_input
from functions.catalog.requests import Launcher, request_image
from functions.catalog.schedules import run_due, scheduled_starter
from functions.handlers.runtime import services as runtime_services
from functions.imaging.jobs import ImagingRequest
from functions.imaging.retention import expired_images
from functions.imaging.services import ImagingServices
from functions.state import Image, ImageOrigin, Schedule, ScheduleFrequency, Server, Status
from statemachine.local import LocalImaging

MIB = 1024**2
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


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
