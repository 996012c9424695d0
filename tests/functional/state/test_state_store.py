"""The StateStore contract on every backend: each model round-trips, lists, conditional writes, id validation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta

import pytest

from functions.state import (
    AlreadyExistsError,
    ApiToken,
    Image,
    ImageOrigin,
    InvalidIdError,
    Job,
    NotFoundError,
    PreconditionFailedError,
    Schedule,
    ScheduleFrequency,
    Server,
    StateStore,
    Status,
    VersionConflictError,
    hash_token,
    modify_job,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JUNK_IDS = ["../etc", "a/b", "", " srv", "srv\x00", "srv\n", "-srv", "x" * 81, "srv.1", "sérvér", "..", "a%2Fb"]


def server(server_id: str = "srv-1", tenant: str = "tenant-a", disk: str = "/data/sr/srv-1/leaf.vhd") -> Server:
    return Server(id=server_id, tenant=tenant, name=f"web {server_id}", disk=disk, flavor="m1.large", created_at=T0)


def job(job_id: str = "job-1", server_id: str | None = "srv-1", at: datetime = T0, disk: str | None = None) -> Job:
    return Job.queued(id=job_id, tenant="tenant-a", server_id=server_id, disk=disk, image_id=f"img-of-{job_id}", at=at)


def image(
    image_id: str = "img-1", server_id: str | None = "srv-1", tenant: str = "tenant-a", at: datetime = T0
) -> Image:
    return Image(
        id=image_id,
        tenant=tenant,
        server_id=server_id,
        job_id="job-1",
        name="nightly",
        status=Status.ACTIVE,
        origin=ImageOrigin.SCHEDULED,
        object_url=f"s3://images/images/{image_id}/image.vhd.zst",
        manifest={
            "image_id": image_id,
            "virtual_size": 10 * 2**30,
            "compression_ratio": 3.25,
            "parts": [{"number": 1, "sha256": "ab" * 32, "size": 8 * 2**20}],
            "chain": [{"uuid": "0f3c", "file_size": 123}],
            "history": [{"status": "QUEUED", "at": "2026-03-01T12:00:00Z"}],
            "note": None,
            "unicode": "ünïcödé ✓",
        },
        virtual_size=10 * 2**30,
        compressed_size=123_456_789,
        created_at=at,
    )


def schedule(server_id: str = "srv-1", tenant: str = "tenant-a", weekly: bool = False) -> Schedule:
    return Schedule(
        server_id=server_id,
        tenant=tenant,
        frequency=ScheduleFrequency.WEEKLY if weekly else ScheduleFrequency.DAILY,
        at=time(2, 30),
        weekday=6 if weekly else None,
        retention=3,
        created_at=T0,
    )


# Servers


def test_server_round_trip_list_and_delete(store: StateStore) -> None:
    first, second, other = server("srv-1"), server("srv-2"), server("srv-3", tenant="tenant-b")
    for record in (second, other, first):
        store.put_server(record)

    assert store.get_server("srv-1") == first
    assert store.list_servers("tenant-a") == [first, second]
    assert store.list_servers("tenant-b") == [other]
    assert store.list_servers("tenant-c") == []

    assert store.delete_server("srv-1") is True
    assert store.delete_server("srv-1") is False
    with pytest.raises(NotFoundError) as missing:
        store.get_server("srv-1")
    assert (missing.value.kind, missing.value.record_id) == ("server", "srv-1")


def test_server_disk_pointer_moves_only_from_the_expected_disk(store: StateStore) -> None:
    store.put_server(server(disk="/sr/leaf-1.vhd"))

    moved = store.swap_server_disk("srv-1", expected_disk="/sr/leaf-1.vhd", new_disk="/sr/leaf-2.vhd")
    assert moved.disk == "/sr/leaf-2.vhd"
    assert store.get_server("srv-1") == moved

    with pytest.raises(PreconditionFailedError) as stale:
        store.swap_server_disk("srv-1", expected_disk="/sr/leaf-1.vhd", new_disk="/sr/leaf-3.vhd")
    assert stale.value.found == "/sr/leaf-2.vhd"
    assert store.get_server("srv-1").disk == "/sr/leaf-2.vhd"
    with pytest.raises(NotFoundError):
        store.swap_server_disk("srv-9", expected_disk="/a", new_disk="/b")


def test_a_server_record_is_replaced_only_if_unchanged(store: StateStore) -> None:
    """The chain record of a server kept in object storage: swapped whole, or not at all."""
    first = server(disk="sr/srv-1/b.vhd").model_copy(update={"chain": ("sr/srv-1/b.vhd", "sr/srv-1/a.vhd")})
    store.put_server(first)
    merged = first.model_copy(update={"chain": ("sr/srv-1/b.vhd", "sr/srv-1/m.vhd"), "garbage": ("sr/srv-1/a.vhd",)})

    assert store.replace_server(first, merged) == merged
    assert store.get_server("srv-1") == merged
    with pytest.raises(PreconditionFailedError):
        store.replace_server(first, first.model_copy(update={"disk": "sr/srv-1/c.vhd"}))
    assert store.get_server("srv-1") == merged
    cleared = store.replace_server(merged, merged.model_copy(update={"garbage": ()}))
    assert store.get_server("srv-1").garbage == () == cleared.garbage
    with pytest.raises(NotFoundError):
        store.replace_server(server("srv-9"), server("srv-9"))


# Jobs


def test_job_round_trip_and_history(store: StateStore) -> None:
    created = store.create_job(job())
    assert created.version == 0
    assert store.get_job("job-1") == created

    saving = store.update_job(created.transition(Status.SAVING, at=T0 + timedelta(seconds=5), detail="snapshot"))
    progressed = saving.revised(bytes_done=512, bytes_total=2048, eta_seconds=12.5, execution_name="exec-1")
    progressed = store.update_job(progressed)
    uploading = store.update_job(progressed.transition(Status.UPLOADING, at=T0 + timedelta(seconds=9)))
    uploading = store.update_job(uploading.revised(upload_id="upload/id+with=odd chars"))
    done = store.update_job(uploading.transition(Status.ACTIVE, at=T0 + timedelta(seconds=20)))

    stored = store.get_job("job-1")
    assert stored == done
    assert stored.version == 5
    assert (stored.status, stored.progress, stored.eta_seconds) == (Status.ACTIVE, 100, 0.0)
    assert [(event.status, event.at) for event in stored.history] == [
        (Status.QUEUED, T0),
        (Status.SAVING, T0 + timedelta(seconds=5)),
        (Status.UPLOADING, T0 + timedelta(seconds=9)),
        (Status.ACTIVE, T0 + timedelta(seconds=20)),
    ]
    assert stored.history[1].detail == "snapshot"


def test_a_failed_job_keeps_its_progress_with_a_code_and_hint(store: StateStore) -> None:
    saving = store.update_job(store.create_job(job()).transition(Status.SAVING, at=T0))
    failed = store.update_job(
        saving.transition(Status.ERROR, at=T0, error_code="CoalesceTimeout", error_hint="wait and image again")
    )
    stored = store.get_job("job-1")
    assert stored == failed
    assert (stored.status, stored.progress, stored.error_code) == (Status.ERROR, 25, "CoalesceTimeout")


def test_creating_a_job_twice_is_refused(store: StateStore) -> None:
    store.create_job(job())
    with pytest.raises(AlreadyExistsError):
        store.create_job(job())


def test_a_stale_job_update_raises_a_version_conflict(store: StateStore) -> None:
    read_by_a = store.create_job(job())
    read_by_b = store.get_job("job-1")
    store.update_job(read_by_a.transition(Status.SAVING, at=T0))

    with pytest.raises(VersionConflictError) as conflict:
        store.update_job(read_by_b.revised(bytes_done=10))
    assert (conflict.value.expected_version, conflict.value.found_version) == (0, 1)
    assert store.get_job("job-1").status is Status.SAVING
    assert store.get_job("job-1").bytes_done == 0

    with pytest.raises(VersionConflictError) as missing:
        store.update_job(job("job-404"))
    assert missing.value.found_version is None


def test_concurrent_job_updates_lose_nothing(
    store: StateStore, run_threads: Callable[[int, Callable[[int], object]], list[object]]
) -> None:
    store.create_job(job().revised(bytes_total=1000))

    def add_ten_bytes(_: int) -> object:
        return modify_job(store, "job-1", lambda current: current.revised(bytes_done=current.bytes_done + 10))

    results = run_threads(12, add_ten_bytes)

    assert all(isinstance(result, Job) for result in results), results
    final = store.get_job("job-1")
    assert final.bytes_done == 120
    assert final.version == 12
    assert sorted(result.bytes_done for result in results if isinstance(result, Job)) == list(range(10, 130, 10))


def test_modify_job_gives_up_after_its_attempts(store: StateStore) -> None:
    store.create_job(job())

    def always_overtaken(current: Job) -> Job:
        store.update_job(store.get_job("job-1").revised(bytes_done=current.bytes_done + 1))
        return current.revised(eta_seconds=1.0)

    with pytest.raises(VersionConflictError):
        modify_job(store, "job-1", always_overtaken, max_attempts=3)
    assert store.get_job("job-1").bytes_done == 3


def test_jobs_list_by_server_oldest_first(store: StateStore) -> None:
    later = store.create_job(job("job-b", at=T0 + timedelta(minutes=1)))
    earlier = store.create_job(job("job-a", at=T0))
    store.create_job(job("job-c", server_id="srv-2"))
    disk_only = job("job-d", server_id=None, disk="/tmp/chain/leaf.vhd")
    assert store.create_job(disk_only) == store.get_job("job-d")

    assert store.list_jobs("srv-1") == [earlier, later]
    assert [listed.id for listed in store.list_jobs("srv-2")] == ["job-c"]


# Images


def test_image_round_trip_lists_status_and_delete(store: StateStore) -> None:
    newest = image("img-2", at=T0 + timedelta(days=1))
    oldest = image("img-1")
    elsewhere = image("img-3", server_id="srv-2")
    from_disk = image("img-4", server_id=None)
    foreign = image("img-5", server_id="srv-9", tenant="tenant-b")
    for record in (newest, oldest, elsewhere, from_disk, foreign):
        store.put_image(record)

    assert store.get_image("img-1") == oldest
    assert store.get_image("img-1").manifest == oldest.manifest
    assert store.list_images(server_id="srv-1") == [oldest, newest]
    assert store.list_images(tenant="tenant-a") == [oldest, elsewhere, from_disk, newest]
    assert store.list_images(tenant="tenant-b") == [foreign]

    failed = store.update_image_status("img-2", Status.ERROR)
    assert failed.status is Status.ERROR
    assert store.get_image("img-2") == failed
    with pytest.raises(NotFoundError):
        store.update_image_status("img-404", Status.ACTIVE)

    assert store.delete_image("img-1") is True
    assert store.delete_image("img-1") is False
    assert store.list_images(server_id="srv-1") == [failed]
    with pytest.raises(TypeError):
        store.list_images()


# Schedules


def test_schedule_round_trip_and_lists(store: StateStore) -> None:
    daily, weekly, foreign = schedule("srv-1"), schedule("srv-2", weekly=True), schedule("srv-3", tenant="tenant-b")
    for record in (weekly, foreign, daily):
        store.put_schedule(record)

    assert store.get_schedule("srv-2") == weekly
    assert store.list_schedules() == [daily, weekly, foreign]
    assert store.list_schedules("tenant-a") == [daily, weekly]
    # A server's schedule and its server record share a partition on DynamoDB: they must not collide.
    store.put_server(server("srv-1"))
    assert store.get_schedule("srv-1") == daily
    assert store.list_servers("tenant-a") == [server("srv-1")]

    assert store.delete_schedule("srv-1") is True
    assert store.delete_schedule("srv-1") is False
    assert store.get_server("srv-1") == server("srv-1")
    with pytest.raises(NotFoundError):
        store.get_schedule("srv-1")


def test_a_schedule_window_is_claimed_once(
    store: StateStore, run_threads: Callable[[int, Callable[[int], object]], list[object]]
) -> None:
    store.put_schedule(schedule())
    window = datetime(2026, 3, 2, 2, 30, tzinfo=UTC)

    results = run_threads(10, lambda _: store.claim_schedule_window("srv-1", window))
    assert sorted(results, key=str) == [False] * 9 + [True]
    assert store.get_schedule("srv-1").last_window_started == window

    assert store.claim_schedule_window("srv-1", window) is False
    assert store.claim_schedule_window("srv-1", window - timedelta(days=1)) is False
    assert store.claim_schedule_window("srv-1", window + timedelta(days=1)) is True
    with pytest.raises(NotFoundError):
        store.claim_schedule_window("srv-404", window)


# API tokens


def test_tokens_are_found_by_hash_only(store: StateStore) -> None:
    secret, token = ApiToken.issue("tenant-a", at=T0)
    store.put_token(token)

    assert secret not in token.model_dump_json()
    assert store.find_token(hash_token(secret)) == token
    assert store.find_token(hash_token(secret + "x")) is None
    with pytest.raises(InvalidIdError):
        store.find_token(secret)


# Ids


@pytest.mark.parametrize("bad_id", JUNK_IDS)
def test_junk_ids_never_reach_a_key(store: StateStore, bad_id: str) -> None:
    lookups: list[Callable[[], object]] = [
        lambda: store.get_server(bad_id),
        lambda: store.list_servers(bad_id),
        lambda: store.delete_server(bad_id),
        lambda: store.get_job(bad_id),
        lambda: store.list_jobs(bad_id),
        lambda: store.get_image(bad_id),
        lambda: store.list_images(server_id=bad_id),
        lambda: store.list_images(tenant=bad_id),
        lambda: store.delete_image(bad_id),
        lambda: store.update_image_status(bad_id, Status.ACTIVE),
        lambda: store.get_schedule(bad_id),
        lambda: store.list_schedules(bad_id),
        lambda: store.delete_schedule(bad_id),
        lambda: store.claim_schedule_window(bad_id, T0),
        lambda: store.get_lock(bad_id),
        lambda: store.release_lock(bad_id, "job-1"),
        lambda: store.find_token(bad_id),
    ]
    for lookup in lookups:
        with pytest.raises(InvalidIdError) as rejected:
            lookup()
        assert rejected.value.value == bad_id
