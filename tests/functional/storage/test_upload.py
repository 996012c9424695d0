"""The uploader against every backend: exact bytes, parallel parts, retries, resume, verification, abort."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from functions.storage import (
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    PartInfo,
    StorageError,
    TransientStorageError,
    UploadFailedError,
    VerificationFailedError,
)
from functions.storage.checksums import composite_crc32c, crc32c
from functions.storage.parts import plan_fixed_parts, plan_frame_parts
from functions.storage.retry import RetryPolicy
from functions.storage.upload import UploadOptions, abort_upload, find_resumable_upload, upload_file

from .wrappers import HookedStore

MiB = 1024**2
FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05)


def no_sleep(_: float) -> None:
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_upload_parallel_parts_exact_bytes(store: ObjectStore, make_file: Callable[[int, int], Path]) -> None:
    path = make_file(23 * MiB + 123, 1)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def progress(done: int, total: int) -> None:
        with lock:
            seen.append((done, total))

    parts = plan_fixed_parts(path.stat().st_size, 5 * MiB)
    result = upload_file(
        store, path, "images/1/image.vhd.zst", parts, options=UploadOptions(concurrency=3, progress=progress)
    )

    data = path.read_bytes()
    assert sha256(store.get("images/1/image.vhd.zst")) == sha256(data)
    assert result.size == len(data)
    assert [(p.number, p.offset, p.length) for p in result.parts] == [(p.number, p.offset, p.length) for p in parts]
    assert all(p.crc32c == crc32c(data[p.offset : p.offset + p.length]) for p in result.parts)
    assert result.parts_sent == len(parts)
    # the composite CRC32C and the multipart ETag were both compared with the store's
    assert result.verification.checksum_crc32c == composite_crc32c([p.crc32c for p in result.parts])
    assert result.verification.etag == result.etag
    assert (0, 1 * MiB) in result.verification.sampled_ranges
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (len(data), len(data))
    assert store.list_multipart_uploads() == []


def test_upload_along_frame_boundaries(store: ObjectStore, make_file: Callable[[int, int], Path]) -> None:
    rng = random.Random(3)
    frames = [rng.choice([50, 4000, 3 * MiB, 7 * MiB]) for _ in range(12)]
    path = make_file(sum(frames), 2)
    parts = plan_frame_parts(frames, 5 * MiB)
    result = upload_file(store, path, "framed", parts, options=UploadOptions(concurrency=2))
    assert store.get("framed") == path.read_bytes()
    assert len(result.parts) == len(parts) > 1


def test_transient_failures_are_retried(store: ObjectStore, make_file: Callable[[int, int], Path]) -> None:
    path = make_file(16 * MiB, 4)
    delays: list[float] = []

    def fail_first_two_attempts(number: int, attempt: int) -> None:
        if number in (1, 3) and attempt <= 2:
            raise TransientStorageError(f"injected failure of part {number}")

    hooked = HookedStore(store, fail_first_two_attempts)
    options = UploadOptions(concurrency=2, retry=FAST_RETRY, sleep=delays.append, seed=5)
    result = upload_file(hooked, path, "retried", plan_fixed_parts(16 * MiB, 5 * MiB), options=options)
    assert store.get("retried") == path.read_bytes()
    assert hooked.part_calls == {1: 3, 2: 1, 3: 3, 4: 1}
    assert len(delays) == 4 and all(0 <= delay <= FAST_RETRY.max_delay for delay in delays)
    assert result.parts_sent == 4


def test_failure_keeps_the_upload_and_resume_sends_only_missing_parts(
    store: ObjectStore, make_file: Callable[[int, int], Path]
) -> None:
    path = make_file(26 * MiB, 5)
    parts = plan_fixed_parts(26 * MiB, 5 * MiB)  # 6 parts

    def part_four_is_down(number: int, attempt: int) -> None:
        if number == 4:
            raise TransientStorageError("injected outage")

    broken = HookedStore(store, part_four_is_down)
    with pytest.raises(UploadFailedError) as caught:
        upload_file(
            broken, path, "resumed", parts, options=UploadOptions(concurrency=1, retry=FAST_RETRY, sleep=no_sleep)
        )
    upload_id = caught.value.upload_id
    assert upload_id is not None and find_resumable_upload(store, "resumed") == upload_id
    with pytest.raises(ObjectNotFoundError):
        store.head("resumed")  # no partial object
    stored = {part.number for part in store.list_parts("resumed", upload_id)}
    assert stored == {1, 2, 3}  # concurrency 1: parts after the failed one were never started

    counting = HookedStore(store)
    result = upload_file(counting, path, "resumed", parts, upload_id=upload_id)
    assert set(counting.part_calls) == {4, 5, 6}
    assert [p.sent for p in result.parts] == [False, False, False, True, True, True]
    assert result.upload_id == upload_id
    assert sha256(store.get("resumed")) == sha256(path.read_bytes())


def test_resume_resends_a_stored_part_whose_bytes_differ(
    store: ObjectStore, make_file: Callable[[int, int], Path]
) -> None:
    path = make_file(11 * MiB, 6)
    data = path.read_bytes()
    parts = plan_fixed_parts(len(data), 5 * MiB)
    upload_id = store.create_multipart("mixed")
    good = data[: 5 * MiB]
    stale = bytes(5 * MiB)  # same size, other bytes: e.g. an earlier attempt with another image
    store.upload_part("mixed", upload_id, 1, good, crc32c(good))
    store.upload_part("mixed", upload_id, 2, stale, crc32c(stale))

    counting = HookedStore(store)
    result = upload_file(counting, path, "mixed", parts, upload_id=upload_id)
    assert set(counting.part_calls) == {2, 3}
    assert store.get("mixed") == data
    assert result.bytes_sent == len(data) - 5 * MiB


class LyingStore(HookedStore):
    """Reports a completed object that differs from what was sent."""

    def __init__(self, inner: ObjectStore, lie: str) -> None:
        super().__init__(inner)
        self.lie = lie

    def head(self, key: str) -> ObjectInfo:
        info = self.inner.head(key)
        if self.lie == "size":
            return replace(info, size=info.size - 1)
        if self.lie == "checksum":
            return replace(info, checksum_crc32c="AAAAAA==-3")
        if self.lie == "no-checksum":
            return replace(info, checksum_crc32c=None)
        return info

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = self.inner.get_range(key, start, length)
        if self.lie == "bytes":
            return bytes([data[0] ^ 1]) + data[1:]
        return data


@pytest.mark.parametrize("lie", ["size", "checksum", "bytes"])
def test_verification_catches_a_wrong_object(
    store: ObjectStore, make_file: Callable[[int, int], Path], lie: str
) -> None:
    path = make_file(12 * MiB, 7)
    with pytest.raises(VerificationFailedError) as caught:
        upload_file(LyingStore(store, lie), path, "checked", plan_fixed_parts(12 * MiB, 5 * MiB))
    assert "upload again" in caught.value.hint


def test_abort_upload_leaves_nothing(store: ObjectStore, make_file: Callable[[int, int], Path]) -> None:
    path = make_file(15 * MiB, 8)

    def stop_at_part_three(number: int, attempt: int) -> None:
        if number == 3:
            raise StorageError("injected permanent failure")

    with pytest.raises(UploadFailedError) as caught:
        upload_file(
            HookedStore(store, stop_at_part_three),
            path,
            "gone",
            plan_fixed_parts(15 * MiB, 5 * MiB),
            options=UploadOptions(concurrency=1),
        )
    upload_id = caught.value.upload_id
    assert upload_id is not None and store.list_parts("gone", upload_id)
    abort_upload(store, "gone", upload_id)
    abort_upload(store, "gone", upload_id)  # idempotent
    assert store.list_multipart_uploads() == []
    assert find_resumable_upload(store, "gone") is None
    with pytest.raises(ObjectNotFoundError):
        store.head("gone")
    assert list(store.list_objects()) == []


def test_bandwidth_limit_paces_the_parts(store: ObjectStore, make_file: Callable[[int, int], Path]) -> None:
    from functions.storage.bandwidth import TokenBucket

    path = make_file(20 * MiB, 9)
    waited: list[float] = []
    clock = [0.0]

    def fake_sleep(seconds: float) -> None:
        waited.append(seconds)
        clock[0] += seconds

    bucket = TokenBucket(rate=5 * MiB, burst=5 * MiB, clock=lambda: clock[0], sleep=fake_sleep)
    upload_file(
        store,
        path,
        "paced",
        plan_fixed_parts(20 * MiB, 5 * MiB),
        options=UploadOptions(concurrency=2, bandwidth=bucket),
    )
    assert sum(waited) == pytest.approx(3.0)  # 20 MiB at 5 MiB/s after a 5 MiB burst
    assert store.get("paced") == path.read_bytes()


def test_without_a_store_checksum_more_ranges_are_reread(
    store: ObjectStore, make_file: Callable[[int, int], Path]
) -> None:
    path = make_file(12 * MiB, 10)
    options = UploadOptions(verify_samples=3, seed=11)
    result = upload_file(
        LyingStore(store, "no-checksum"), path, "sampled", plan_fixed_parts(12 * MiB, 5 * MiB), options=options
    )
    assert result.verification.checksum_crc32c is None
    ranges = result.verification.sampled_ranges
    assert ranges[0] == (0, MiB) and ranges[-1] == (12 * MiB - MiB, MiB)
    assert len(ranges) == 5  # first, last and three seeded random ones
    with_checksum = upload_file(store, path, "sampled-2", plan_fixed_parts(12 * MiB, 5 * MiB), options=options)
    assert with_checksum.verification.sampled_ranges == ((0, MiB), (12 * MiB - MiB, MiB))


def test_empty_file(store: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    result = upload_file(store, path, "empty")
    assert result.size == 0 and len(result.parts) == 1
    assert store.head("empty").size == 0
    assert result.verification.sampled_ranges == ()


class LostCompletionReply(HookedStore):
    """The first completion succeeds on the store but its reply is lost (a cut connection)."""

    completions = 0

    def complete_multipart(self, key: str, upload_id: str, parts: list[PartInfo]) -> ObjectInfo:
        self.completions += 1
        info = self.inner.complete_multipart(key, upload_id, parts)
        if self.completions == 1:
            raise TransientStorageError("injected: reply lost after the store completed the upload")
        return info


def test_a_completion_whose_reply_was_lost_is_recognised(
    store: ObjectStore, make_file: Callable[[int, int], Path]
) -> None:
    path = make_file(11 * MiB, 12)
    lossy = LostCompletionReply(store)
    parts = plan_fixed_parts(11 * MiB, 5 * MiB)
    result = upload_file(lossy, path, "lost-reply", parts, options=UploadOptions(sleep=no_sleep))
    assert lossy.completions == 2
    assert store.get("lost-reply") == path.read_bytes()
    assert result.verification.size == 11 * MiB
