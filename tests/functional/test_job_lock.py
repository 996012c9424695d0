"""A job holds its server's lock for as long as it runs: each step renews it, and a job whose lock expired and was
taken by another job stops instead of imaging the server alongside it (real SQLite state, injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from functions.imaging.errors import ServerBusyError
from functions.imaging.jobs import ImagingRequest, hold_server_lock, start_job
from functions.imaging.services import ImagingConfig, ImagingServices
from functions.state import Server, Status
from functions.state.sqlite_state import SqliteStateStore
from functions.storage import FileObjectStore

TTL_S = 600.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def services(tmp_path: Path, clock: Clock) -> ImagingServices:
    state = SqliteStateStore(tmp_path / "state.sqlite3", clock=clock)
    state.put_server(Server(id="web1", tenant="t1", name="web1", disk="/srv/web1.vhd", created_at=clock.now))
    return ImagingServices(
        store=FileObjectStore(tmp_path / "store"), state=state, config=ImagingConfig(lock_ttl_s=TTL_S), now=clock
    )


def request(job_id: str) -> ImagingRequest:
    return ImagingRequest(job_id=job_id, image_id=f"img-{job_id}", tenant="t1", name="n", server_id="web1")


def test_each_step_renews_the_lock_so_a_long_job_keeps_its_server(services: ImagingServices, clock: Clock) -> None:
    job = start_job(services, request("job1"))
    for _ in range(5):  # five steps, each started just before the lock would expire: 4 TTLs in all
        clock.now += timedelta(seconds=TTL_S * 0.8)
        hold_server_lock(services, job)
        with pytest.raises(ServerBusyError):
            start_job(services, request(f"job-{clock.now.timestamp():.0f}"))
    held = services.state.get_lock("web1")
    assert held is not None and held.owner == "job1"
    assert held.expires_at == clock.now + timedelta(seconds=TTL_S)


def test_a_job_whose_expired_lock_was_taken_stops(services: ImagingServices, clock: Clock) -> None:
    stalled = start_job(services, request("stalled"))
    clock.now += timedelta(seconds=TTL_S + 1)  # the lock expires: the server is free for another job
    start_job(services, request("next"))
    with pytest.raises(ServerBusyError, match="lost server web1's lock to job next"):
        hold_server_lock(services, stalled)
    held = services.state.get_lock("web1")
    assert held is not None and held.owner == "next"


def test_an_expired_lock_nobody_took_is_taken_again(services: ImagingServices, clock: Clock) -> None:
    job = start_job(services, request("slow"))
    clock.now += timedelta(seconds=TTL_S * 3)
    hold_server_lock(services, job)
    held = services.state.get_lock("web1")
    assert held is not None and held.owner == "slow"


def test_a_disk_job_has_no_server_lock_to_hold(services: ImagingServices) -> None:
    job = start_job(
        services, ImagingRequest(job_id="diskjob", image_id="img-diskjob", tenant="t1", name="n", disk="/x.vhd")
    )
    hold_server_lock(services, job)
    assert services.state.get_lock("web1") is None


def test_a_lock_left_by_a_job_that_has_ended_does_not_make_the_server_busy(services: ImagingServices) -> None:
    # Finalize marks the image ACTIVE a moment before it releases the lock: a request in between finds it held.
    finished = start_job(services, request("finished"))
    services.state.update_job(finished.revised(status=Status.ERROR, error_code="CANCELLED"))
    assert services.state.get_lock("web1") is not None

    start_job(services, request("next"))

    held = services.state.get_lock("web1")
    assert held is not None and held.owner == "next"
    with pytest.raises(ServerBusyError):  # the next one is running: its lock is its own
        start_job(services, request("third"))


def test_a_lock_taken_by_something_other_than_a_job_is_never_taken_over(services: ImagingServices) -> None:
    assert services.state.acquire_lock("web1", "server-remove", TTL_S)
    with pytest.raises(ServerBusyError):
        start_job(services, request("job1"))
