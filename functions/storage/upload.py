"""The resumable parallel uploader: a local file (the compressed image) to one key as a multipart upload.

- Parallel and bounded: `concurrency` worker threads, each holding at most one part read by `os.pread`, so at most
  concurrency * largest part bytes of file data are buffered whatever the file's size.
- Each part carries its CRC32C; transient errors (throttling, 5xx, resets, a checksum damaged in transit) are
  retried with capped exponential backoff and full jitter; sleep, randomness and clock are injectable.
- Resume: given an upload id, ListParts, keep every stored part whose size and checksum (CRC32C when the store
  reports it, else the MD5 ETag) match the local bytes, and send only the missing or mismatching ones.
- Verify after completion: the object's size; its composite CRC32C when the store reports one; its multipart ETag
  when every part ETag is an MD5; and the bytes of sampled ranges re-read and compared with the file: the first and
  the last MiB always, plus `verify_samples` seeded random ranges when the store reported no checksum. Any mismatch
  is VerificationFailedError (the object stays, for inspection).
- On failure the multipart upload is kept (UploadFailedError carries its id) so the caller resumes or aborts it.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from functions.storage.bandwidth import TokenBucket
from functions.storage.checksums import composite_crc32c, crc32c, md5_etag, multipart_etag, same_object_checksum
from functions.storage.errors import StorageError, UploadFailedError, UploadNotFoundError, VerificationFailedError
from functions.storage.objects import ObjectInfo, ObjectStore, PartInfo
from functions.storage.parts import PartPlan, check_plan, plan_fixed_parts
from functions.storage.retry import RetryPolicy, call_with_retries

_MD5_HEX = re.compile(r"[0-9a-f]{32}")

ProgressCallback = Callable[[int, int], None]
PhaseCallback = Callable[[str], None]


@dataclass(frozen=True)
class UploadOptions:
    concurrency: int = 4
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    bandwidth: TokenBucket | None = None
    progress: ProgressCallback | None = None
    """Called with (bytes done, bytes total) after each part is stored or found stored."""
    phase: PhaseCallback | None = None
    """Called with "created"/"resumed", "completing", "verifying", "done"."""
    verify_samples: int = 4
    """Random ranges re-read after completion, besides the first and the last, when the store has no checksum."""
    sample_size: int = 1024**2
    seed: int | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class UploadedPart:
    number: int
    offset: int
    length: int
    crc32c: int
    etag: str
    sent: bool
    """False when a resumed upload found this part already stored with the right bytes."""


@dataclass(frozen=True)
class Verification:
    size: int
    checksum_crc32c: str | None
    """The composite CRC32C compared with the store's, or None when the store did not report one."""
    etag: str | None
    """The multipart ETag compared with the store's, or None when the part ETags are not MD5s."""
    sampled_ranges: tuple[tuple[int, int], ...]
    """(offset, length) of each range re-read and compared byte for byte."""


@dataclass(frozen=True)
class UploadResult:
    key: str
    upload_id: str
    size: int
    etag: str
    parts: tuple[UploadedPart, ...]
    verification: Verification
    seconds_parts: float
    seconds_complete: float
    seconds_verify: float

    @property
    def parts_sent(self) -> int:
        return sum(part.sent for part in self.parts)

    @property
    def bytes_sent(self) -> int:
        return sum(part.length for part in self.parts if part.sent)


def find_resumable_upload(store: ObjectStore, key: str) -> str | None:
    """The newest multipart upload in progress for exactly `key`, if any."""
    uploads = [upload for upload in store.list_multipart_uploads(key) if upload.key == key]
    return max(uploads, key=lambda upload: upload.initiated).upload_id if uploads else None


def abort_upload(
    store: ObjectStore,
    key: str,
    upload_id: str,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Abort an upload and make sure no part survives (S3 may keep a part whose upload raced the abort: abort again
    until ListParts says the upload is gone). Aborting an upload that is already gone succeeds."""
    policy = retry or RetryPolicy()
    for _ in range(policy.attempts):
        try:
            call_with_retries(lambda: store.abort_multipart(key, upload_id), policy, sleep=sleep)
            call_with_retries(lambda: store.list_parts(key, upload_id), policy, sleep=sleep)
        except UploadNotFoundError:
            return
    raise StorageError(f"multipart upload {upload_id} still lists parts after {policy.attempts} aborts", key=key)


class _Progress:
    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self._done = 0
        self._callback = callback
        self._lock = threading.Lock()

    def add(self, amount: int) -> None:
        with self._lock:
            self._done += amount
            if self._callback is not None:
                self._callback(self._done, self.total)


class _PartSender:
    """Reads, checks and sends the parts of one upload; one instance is shared by the worker threads."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        upload_id: str,
        fd: int,
        stored: dict[int, PartInfo],
        options: UploadOptions,
        progress: _Progress,
    ) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.fd = fd
        self.stored = stored
        self.options = options
        self.progress = progress
        self._rng_lock = threading.Lock()
        self._rng = random.Random(options.seed)

    def _read(self, plan: PartPlan) -> bytes:
        data = os.pread(self.fd, plan.length, plan.offset)
        if len(data) != plan.length:
            raise StorageError(f"the local file shrank: part {plan.number} read {len(data)} of {plan.length} bytes")
        return data

    def run(self, plan: PartPlan) -> UploadedPart:
        data = self._read(plan)
        checksum = crc32c(data)
        have = self.stored.get(plan.number)
        if have is not None and _is_same_part(have, data, checksum):
            self.progress.add(plan.length)
            return UploadedPart(plan.number, plan.offset, plan.length, checksum, have.etag, sent=False)
        bandwidth = self.options.bandwidth

        def send() -> PartInfo:
            if bandwidth is not None:  # every attempt puts the bytes on the wire again
                bandwidth.acquire(plan.length)
            return self.store.upload_part(self.key, self.upload_id, plan.number, data, checksum)

        with self._rng_lock:
            rng = random.Random(self._rng.random())
        info = call_with_retries(send, self.options.retry, sleep=self.options.sleep, rng=rng)
        self.progress.add(plan.length)
        return UploadedPart(plan.number, plan.offset, plan.length, checksum, info.etag, sent=True)


def _is_same_part(stored: PartInfo, data: bytes, checksum: int) -> bool:
    if stored.size != len(data):
        return False
    if stored.crc32c is not None:
        return stored.crc32c == checksum
    return stored.etag == md5_etag(data)


def upload_file(
    store: ObjectStore,
    path: Path,
    key: str,
    parts: Sequence[PartPlan] | None = None,
    *,
    upload_id: str | None = None,
    options: UploadOptions | None = None,
) -> UploadResult:
    """Upload `path` to `key` as the multipart upload `upload_id` (resumed) or a new one, complete and verify it.

    `parts` defaults to plan_fixed_parts(file size); pass plan_frame_parts(...) for an image so parts follow its
    zstd frames. Raises UploadFailedError (with the upload id) if parts cannot be stored or completion fails, and
    VerificationFailedError if the completed object differs from the file.
    """
    opts = options or UploadOptions()
    if opts.concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {opts.concurrency}")
    with open(path, "rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        plan = list(parts) if parts is not None else plan_fixed_parts(size)
        check_plan(plan, size)
        retry = opts.retry
        started = opts.clock()
        stored: dict[int, PartInfo] = {}
        if upload_id is None:
            upload_id = call_with_retries(lambda: store.create_multipart(key), retry, sleep=opts.sleep)
            _report_phase(opts, "created")
        else:
            resumed = upload_id
            listed = call_with_retries(lambda: store.list_parts(key, resumed), retry, sleep=opts.sleep)
            stored = {part.number: part for part in listed}
            _report_phase(opts, "resumed")
        sender = _PartSender(store, key, upload_id, fd, stored, opts, _Progress(size, opts.progress))
        uploaded = _send_parts(sender, plan, opts.concurrency)
        parts_done = opts.clock()

        _report_phase(opts, "completing")
        completed = _complete(store, key, upload_id, uploaded, retry, opts.sleep)
        completed_at = opts.clock()

        _report_phase(opts, "verifying")
        verification = _verify(store, key, fd, size, uploaded, completed, opts)
        verified_at = opts.clock()
    _report_phase(opts, "done")
    return UploadResult(
        key=key,
        upload_id=upload_id,
        size=size,
        etag=completed.etag,
        parts=tuple(uploaded),
        verification=verification,
        seconds_parts=parts_done - started,
        seconds_complete=completed_at - parts_done,
        seconds_verify=verified_at - completed_at,
    )


def _report_phase(options: UploadOptions, phase: str) -> None:
    if options.phase is not None:
        options.phase(phase)


def _send_parts(sender: _PartSender, plan: Sequence[PartPlan], concurrency: int) -> list[UploadedPart]:
    """Run every part through the sender; after the first error no new part starts (those running finish), and
    the upload is kept for a resume."""
    failed = threading.Event()

    def run(part: PartPlan) -> UploadedPart | None:
        if failed.is_set():
            return None
        try:
            return sender.run(part)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload-part") as pool:
        futures = [pool.submit(run, part) for part in plan]
    error = next((future.exception() for future in futures if future.exception() is not None), None)
    if error is not None:
        raise UploadFailedError(
            f"storing parts of multipart upload {sender.upload_id} failed: {error}",
            key=sender.key,
            upload_id=sender.upload_id,
        ) from error
    results = [future.result() for future in futures]
    return [result for result in results if result is not None]


def _complete(
    store: ObjectStore,
    key: str,
    upload_id: str,
    uploaded: Sequence[UploadedPart],
    retry: RetryPolicy,
    sleep: Callable[[float], None],
) -> ObjectInfo:
    infos = [PartInfo(part.number, part.length, part.etag, part.crc32c) for part in uploaded]
    attempts = 0

    def complete() -> ObjectInfo:
        nonlocal attempts
        attempts += 1
        try:
            return store.complete_multipart(key, upload_id, infos)
        except UploadNotFoundError:
            if attempts == 1:
                raise
            # An earlier attempt completed the upload and its answer was lost: the object is checked next.
            return store.head(key)

    try:
        return call_with_retries(complete, retry, sleep=sleep)
    except StorageError as error:
        raise UploadFailedError(
            f"completing multipart upload {upload_id} failed: {error}", key=key, upload_id=upload_id
        ) from error


def _verify(
    store: ObjectStore,
    key: str,
    fd: int,
    size: int,
    uploaded: Sequence[UploadedPart],
    completed: ObjectInfo,
    options: UploadOptions,
) -> Verification:
    info = call_with_retries(lambda: store.head(key), options.retry, sleep=options.sleep)
    if info.size != size:
        raise VerificationFailedError(f"the object has {info.size} bytes, the file {size}", key=key)
    checked_checksum = None
    if info.checksum_crc32c is not None:
        expected = composite_crc32c([part.crc32c for part in uploaded])
        if not same_object_checksum(info.checksum_crc32c, expected):
            raise VerificationFailedError(
                f"the object's CRC32C is {info.checksum_crc32c}, the parts' composite {expected}", key=key
            )
        checked_checksum = expected
    checked_etag = None
    if all(_MD5_HEX.fullmatch(part.etag) for part in uploaded):
        expected_etag = multipart_etag([part.etag for part in uploaded])
        if info.etag != expected_etag:
            raise VerificationFailedError(f"the object's ETag is {info.etag}, expected {expected_etag}", key=key)
        checked_etag = expected_etag
    # The composite CRC32C already covers every byte the store received; without it, re-read more of the object.
    samples = 0 if checked_checksum is not None else options.verify_samples
    ranges = _sample_ranges(size, options.sample_size, samples, random.Random(options.seed))
    for start, length in ranges:
        stored = call_with_retries(partial(store.get_range, key, start, length), options.retry, sleep=options.sleep)
        if stored != os.pread(fd, length, start):
            raise VerificationFailedError(f"bytes {start}..{start + length} differ from the file", key=key)
    return Verification(size, checked_checksum, checked_etag, tuple(ranges))


def _sample_ranges(size: int, sample: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """The first and last `sample` bytes plus `count` random ranges (one range when the file is small)."""
    if size == 0:
        return []
    if size <= sample:
        return [(0, size)]
    starts = {0, size - sample, *(rng.randrange(0, size - sample + 1) for _ in range(count))}
    return [(start, sample) for start in sorted(starts)]
