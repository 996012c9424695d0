"""The real imaging ASL on the embedded engine with the real handlers, on a file store and SQLite in tmp_path.

References: the image is checked with `zstd -d` and `qemu-img convert -f vpc -O raw` against the chain flattened by
tests/support/pyvhd (an implementation independent of vhdcore); state is read back from the real SQLite store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import crc32c
import pytest

import vhdcore
from functions.imaging.images import verify_image
from functions.imaging.layout import StagedFrame
from functions.state import Status
from functions.storage import FileObjectStore, StorageError
from tests.support.files import chunk_content_sha256, content_tree_sha256, snapshot_files
from tests.support.pyvhd import flatten
from tests.support.workflow import (
    CHUNK,
    DISK_SIZE,
    MIB,
    Env,
    assert_cleaned_up,
    build_sample_chain,
    image_raw,
    opened_services,
    register_server,
    request,
    run,
)


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Every test here checks images with the outside tools."""


def test_a_disk_becomes_a_verified_image_through_staged_frames_and_a_multipart_upload(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGING_OBJECT_LAYOUT", "staged")  # as on S3: several Map items, frames staged as objects
    leaf = build_sample_chain(env.root / "disks")
    chain_files = [env.root / "disks" / name for name in ("base.vhd", "middle.vhd", "leaf.vhd")]
    before = snapshot_files(chain_files)
    expected = flatten(leaf)

    result = run(request("job1", disk=leaf))

    assert result.succeeded, (result.error, result.cause)
    assert result.states_entered()[:5] == ["Prepare", "Resuming?", "Coalesce", "Coalesced?", "Snapshot"]
    assert result.output["plan"]["groups"] == [
        {"first": 0, "count": 2},
        {"first": 2, "count": 2},
        {"first": 4, "count": 2},
    ]
    raw = image_raw(env, "img-job1")
    assert raw == expected
    manifest = json.loads(env.store.get("images/img-job1/manifest.json"))
    assert manifest["content_sha256"] == content_tree_sha256(expected, manifest["chunk_size"])
    assert [frame["content_sha256"] for frame in manifest["frames"][1:]] == [
        chunk_content_sha256(expected[start : start + manifest["chunk_size"]])
        for start in range(0, len(expected), manifest["chunk_size"])
    ]
    stored = env.store.get("images/img-job1/image.vhd.zst")
    assert manifest["object_sha256"] == hashlib.sha256(stored).hexdigest()
    assert manifest["compressed_size"] == len(stored)
    assert manifest["virtual_size"] == DISK_SIZE
    assert [layer["path"] for layer in manifest["source_chain"]] == [str(p) for p in reversed(chain_files)]
    assert manifest["parts_copied"] >= 1  # whole-frame parts of 5 MiB or more were copied inside the store
    assert manifest["estimated_compressed_size"]["low"] <= manifest["estimated_compressed_size"]["high"]
    assert [event["status"] for event in manifest["history"]] == ["QUEUED", "SAVING", "UPLOADING", "ACTIVE"]
    job = env.state.get_job("job1")
    assert (job.status, job.progress, job.bytes_done, job.bytes_total) == (Status.ACTIVE, 100, len(stored), len(stored))
    image = env.state.get_image("img-job1")
    assert image.status is Status.ACTIVE
    assert image.object_url == (env.store.root / "images/img-job1/image.vhd.zst").as_uri()
    assert list(env.store.list_objects("staging/")) == []
    assert env.store.list_multipart_uploads() == []
    assert snapshot_files(chain_files) == before  # an unregistered disk is imaged read-only


def test_a_registered_server_is_snapshotted_and_keeps_running_on_a_new_leaf(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    register_server(env, leaf)

    result = run(request("job2", server="web1"))

    assert result.succeeded, (result.error, result.cause)
    assert image_raw(env, "img-job2") == expected
    server = env.state.get_server("web1")
    new_leaf = Path(server.disk)
    assert new_leaf.parent == leaf.parent, "the new leaf goes beside the chain, which stays where it was registered"
    assert not (env.store.root / "sr").exists(), "nothing of the server's chain moves into the data directory"
    chain = vhdcore.open_chain(str(new_leaf))
    assert Path(chain.layers[1].path).resolve() == leaf.resolve()
    assert chain.layers[0].allocated_blocks == 0
    assert flatten(new_leaf) == expected
    assert env.state.get_lock("web1") is None


def test_a_corrupt_disk_fails_the_job_with_a_code_and_a_hint(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    middle = env.root / "disks" / "middle.vhd"
    with middle.open("r+b") as disk:  # the dynamic header's checksum (offset 512 + 36)
        disk.seek(512 + 36)
        disk.write(b"\xde\xad\xbe\xef")

    result = run(request("job3", disk=leaf))

    assert result.status == "FAILED"
    assert result.error == "DISK_CORRUPT"
    assert result.cause is not None and "imaging vhd check" in result.cause
    job = env.state.get_job("job3")
    assert job.status is Status.ERROR
    assert job.error_code == "DISK_CORRUPT"
    assert job.error_hint == result.cause
    assert "ChecksumError" in (job.history[-1].detail or "") or "DiskCorruptError" in (job.history[-1].detail or "")
    assert env.state.get_image("img-job3").status is Status.ERROR
    assert_cleaned_up(env, "job3", "img-job3")


def test_a_layer_lost_inside_the_map_fails_and_cleans_staging(env: Env) -> None:
    """The chain loses a layer after the plan is staged: the Map's worker fails, staged frames are removed."""
    leaf = build_sample_chain(env.root / "disks")
    from functions.handlers import estimate

    def estimate_then_lose_a_layer(event: Any, context: Any) -> Any:
        answer = estimate.handler(event, context)
        (env.root / "disks" / "base.vhd").rename(env.root / "disks" / "base.moved")
        return answer

    result = run(request("job4", disk=leaf), {"EstimateFunctionArn": estimate_then_lose_a_layer})

    job = env.state.get_job("job4")
    assert job.error_code == "DISK_MISSING", job.history[-1].detail
    assert (result.status, result.error) == ("FAILED", "DISK_MISSING")
    assert_cleaned_up(env, "job4", "img-job4")


def test_a_storage_failure_mid_upload_aborts_the_upload_and_releases_the_lock(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGING_OBJECT_LAYOUT", "staged")
    leaf = build_sample_chain(env.root / "disks")
    register_server(env, leaf)
    original = FileObjectStore.upload_part
    calls: list[int] = []

    def failing_upload_part(self: FileObjectStore, key: str, upload_id: str, number: int, *args: Any) -> Any:
        calls.append(number)
        if len(calls) > 1:
            raise StorageError("the store refused the write: device is full", key=key)
        return original(self, key, upload_id, number, *args)

    monkeypatch.setattr(FileObjectStore, "upload_part", failing_upload_part)

    result = run(request("job5", server="web1"))

    assert result.status == "FAILED"
    assert result.error == "STORAGE_UNAVAILABLE"
    assert result.cause is not None and "check the storage service" in result.cause
    assert len(calls) >= 2
    job = env.state.get_job("job5")
    assert (job.status, job.error_code) == (Status.ERROR, "STORAGE_UNAVAILABLE")
    assert job.upload_id is not None
    assert_cleaned_up(env, "job5", "img-job5")
    assert env.state.get_lock("web1") is None


class WorkerCrashed(Exception):  # noqa: N818 - the Lambda error name the ASL retries
    """What the engine reports when a worker dies; raised here in the middle of a Map item."""


def test_a_worker_crash_inside_the_map_is_retried_and_reuses_staged_frames(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGING_OBJECT_LAYOUT", "staged")
    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    original_put = FileObjectStore.put
    crashes: list[str] = []
    frames_written: list[str] = []

    def put_that_crashes_once(self: FileObjectStore, key: str, data: bytes, **kwargs: Any) -> Any:
        if key.endswith("/frames/000003.zst") and not crashes:
            crashes.append(key)  # the worker dies after staging chunk 2 of its group (chunks 2 and 3)
            raise WorkerCrashed("worker process exited")
        if key.endswith(".zst"):
            frames_written.append(key.rsplit("/", 1)[-1])
        return original_put(self, key, data, **kwargs)

    monkeypatch.setattr(FileObjectStore, "put", put_that_crashes_once)
    from functions.handlers import compress

    invocations: list[tuple[int, str]] = []

    def observed_compress(event: Any, context: Any) -> Any:
        try:
            answer = compress.handler(event, context)
        except Exception as error:
            invocations.append((event["group"]["first"], type(error).__name__))
            raise
        invocations.append((event["group"]["first"], "ok"))
        return answer

    result = run(request("job6", disk=leaf), {"CompressFunctionArn": observed_compress})

    assert result.succeeded, (result.error, result.cause)
    assert crashes == ["staging/job6/frames/000003.zst"]
    assert sorted(invocations) == [(0, "ok"), (2, "WorkerCrashed"), (2, "ok"), (4, "ok")]
    assert frames_written.count("000002.zst") == 1  # staged before the crash, reused by the retry
    assert image_raw(env, "img-job6") == expected


def test_on_a_file_store_the_image_is_written_once_where_it_lives(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    original_put = FileObjectStore.put
    staged_frames: list[str] = []

    def observed_put(self: FileObjectStore, key: str, data: bytes, **kwargs: Any) -> Any:
        if "/frames/" in key:
            staged_frames.append(key)
        return original_put(self, key, data, **kwargs)

    def no_multipart(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an image written in place is not uploaded again")

    monkeypatch.setattr(FileObjectStore, "put", observed_put)
    for method in ("create_multipart", "upload_part", "upload_part_copy", "complete_multipart"):
        monkeypatch.setattr(FileObjectStore, method, no_multipart)

    result = run(request("job20", disk=leaf))

    assert result.succeeded, (result.error, result.cause)
    assert result.output["plan"]["groups"] == [{"first": 0, "count": DISK_SIZE // CHUNK}]  # one item, all cores
    assert staged_frames == []
    assert image_raw(env, "img-job20") == expected
    manifest = json.loads(env.store.get("images/img-job20/manifest.json"))
    stored = env.store.get("images/img-job20/image.vhd.zst")
    assert (manifest["object_layout"], manifest["compressed_size"]) == ("in_place", len(stored))
    assert manifest["content_sha256"] == content_tree_sha256(expected, manifest["chunk_size"])
    # The parts' CRC32C (the workers') hold for the bytes stored, and cover the whole object without a gap.
    assert [part["offset"] for part in manifest["parts"]] == [0] + [
        frame["offset"] for frame in manifest["frames"][1:] if frame["compressed_bytes"]
    ]
    end = 0
    for part in manifest["parts"]:
        assert part["offset"] == end
        assert crc32c.crc32c(stored[part["offset"] : part["offset"] + part["length"]]) == part["crc32c"]
        end += part["length"]
    assert end == len(stored)
    assert env.store.head("images/img-job20/image.vhd.zst").checksum_crc32c is not None
    job = env.state.get_job("job20")
    assert (job.status, job.bytes_done, job.bytes_total) == (Status.ACTIVE, len(stored), len(stored))
    assert list(env.store.list_objects("staging/")) == []
    with opened_services(env) as services:
        assert verify_image(services, "img-job20").ok


def test_a_crash_while_writing_in_place_resumes_after_the_durable_frames(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from functions.imaging import compress

    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    monkeypatch.setattr(compress, "SYNC_BYTES", 1)  # every frame is a durable point
    original_record, original_staged = compress.record_written, StagedFrame.of
    recorded: list[int] = []
    compressed: list[int] = []

    def record_then_crash(services: Any, job_id: str, frames: list[Any]) -> None:
        if len(recorded) == 2:
            recorded.append(-1)
            raise WorkerCrashed("worker process exited")  # chunk 2 is written, but not recorded as durable
        recorded.extend(frame.index for frame in frames)
        original_record(services, job_id, frames)

    def observed_staged(cls: type[StagedFrame], frame: Any, offset: int | None = None) -> StagedFrame:
        compressed.append(frame.index)
        return original_staged(frame, offset)

    monkeypatch.setattr(compress, "record_written", record_then_crash)
    monkeypatch.setattr(StagedFrame, "of", classmethod(observed_staged))

    result = run(request("job21", disk=leaf))

    assert result.succeeded, (result.error, result.cause)
    assert recorded == [0, 1, -1, 2, 3, 4, 5]
    assert compressed == [0, 1, 2, 2, 3, 4, 5]  # the retry started after the durable frames 0 and 1
    assert image_raw(env, "img-job21") == expected


def test_an_upload_retried_after_it_published_the_image_in_place_keeps_the_image(env: Env) -> None:
    from functions.handlers import upload

    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    answers: list[Any] = []

    def upload_that_dies_after_publishing(event: Any, context: Any) -> Any:
        answers.append(upload.handler(event, context))
        env.store.delete("staging/job22/upload.json")  # the record lost: the retry finds the spool gone
        answers.append(upload.handler(event, context))
        return answers[-1]

    result = run(request("job22", disk=leaf), {"UploadFunctionArn": upload_that_dies_after_publishing})

    assert result.succeeded, (result.error, result.cause)
    assert answers[0] == answers[1]
    assert image_raw(env, "img-job22") == expected


def test_coalesce_past_the_deadline_fails_with_coalesce_timeout(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = build_sample_chain(env.root / "disks")
    register_server(env, leaf)
    monkeypatch.setenv("IMAGING_COALESCE_DEADLINE_S", "0")

    result = run(request("job7", server="web1"))

    assert result.status == "FAILED"
    assert result.error == "COALESCE_TIMEOUT"
    assert result.cause == "the chain could not be merged in time: wait and issue the image again"
    assert env.state.get_job("job7").error_code == "COALESCE_TIMEOUT"
    assert env.state.get_server("web1").disk == str(leaf)  # never snapshotted
    assert env.state.get_lock("web1") is None
    assert_cleaned_up(env, "job7", "img-job7")


def test_a_second_job_on_a_busy_server_fails_without_taking_the_lock(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    register_server(env, leaf)
    assert env.state.acquire_lock("web1", "job-running", 600)

    result = run(request("job8", server="web1"))

    assert result.status == "FAILED"
    assert result.error == "SERVER_BUSY"
    lock = env.state.get_lock("web1")
    assert lock is not None and lock.owner == "job-running"


def test_a_servers_chain_is_coalesced_in_slices_before_the_snapshot(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    register_server(env, leaf)
    monkeypatch.setenv("IMAGING_COALESCE_SLICE_BYTES", str(1 * MIB))

    result = run(request("job9", server="web1"))

    assert result.succeeded, (result.error, result.cause)
    assert result.states_entered().count("Coalesce") >= 2  # the Choice looped over bounded slices
    assert not (env.root / "disks" / "middle.vhd").exists()  # merged into the base, the leaf relinked to it
    manifest = json.loads(env.store.get("images/img-job9/manifest.json"))
    assert [Path(layer["path"]).name for layer in manifest["source_chain"]] == ["leaf.vhd", "base.vhd"]
    assert image_raw(env, "img-job9") == expected
    assert flatten(Path(env.state.get_server("web1").disk)) == expected


def test_failures_from_outside_the_domain_get_the_operators_codes() -> None:
    from functions.imaging.errors import failure_for

    assert failure_for("MissingParentError").code == "DISK_MISSING"
    assert failure_for("ChecksumError").code == "DISK_CORRUPT"
    assert failure_for("UploadFailedError").hint.endswith("check the storage service, then image again")
    assert (
        failure_for("CoalesceTimeout").hint == "the chain could not be merged in time: wait and issue the image again"
    )
    assert failure_for("States.Timeout").code == "WORKER_CRASHED"
    assert failure_for("SomethingNew").code == "INTERNAL_ERROR"


def test_coalesce_leaves_a_layer_that_another_disk_still_needs(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    other = env.root / "disks" / "other-server.vhd"
    vhdcore.snapshot(str(env.root / "disks" / "middle.vhd"), str(other))  # a second child of the middle layer
    vhdcore.write(str(other), 5 * MIB, b"another server" * 1000)
    expected, other_before = flatten(leaf), flatten(other)
    register_server(env, leaf)

    result = run(request("job10", server="web1"))

    assert result.succeeded, (result.error, result.cause)
    assert (env.root / "disks" / "middle.vhd").exists()
    assert flatten(other) == other_before
    assert image_raw(env, "img-job10") == expected
