"""Upload (50%): the head frame and the compressed frames become the image object.

In place (a file store, functions.imaging.layout): the frames already sit where they belong in the image file; the
head is compressed into the room kept for it and the file is published under the image's key by a rename. Its
parts, for the manifest and `imaging image verify`, are the head's room and each frame, with the CRC32C the workers
computed; the object's checksum is their composite, as S3 forms a multipart object's.

Staged (S3, or a chain read by ranged GETs): one multipart upload.

Parts follow frame boundaries (plan_frame_parts). A part that is exactly one staged frame of at least 5 MiB is
copied inside the store (upload_part_copy); the others are assembled and sent with their CRC32C. The upload id is
recorded on the job first, so a retried Upload resumes (parts already stored with the right size and checksum are
kept) and a failed job can abort it. The completed object's size and composite checksum (or multipart ETag) are
verified against the parts. Meanwhile one thread reads the staged frames in order for the object's sha256 (the
manifest's), so Finalize need not read the object again.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import vhdcore
from functions.imaging import keys
from functions.imaging.compress import load_frame, load_plan
from functions.imaging.errors import ChunksNotCompressedError, ImageVerificationError, StorageUnavailableError
from functions.imaging.jobs import (
    advance_job,
    check_still_wanted,
    hold_server_lock,
    record_progress,
    revise_job,
    set_progress,
)
from functions.imaging.layout import Layout, StagedFrame, load_layout, load_written, spool_key
from functions.imaging.progress import flavor_class, measured_eta
from functions.imaging.services import ImagingServices
from functions.state import Job, Status
from functions.storage import FileObjectStore, ObjectNotFoundError, StorageError
from functions.storage.bandwidth import bucket_for_flavor_class
from functions.storage.checksums import composite_crc32c, crc32c, md5_etag, multipart_etag, same_object_checksum
from functions.storage.objects import MIN_PART_SIZE, ObjectInfo, PartInfo
from functions.storage.parts import PartPlan, plan_frame_parts
from functions.storage.retry import call_with_retries
from functions.storage.upload import find_resumable_upload

UPLOAD_CONCURRENCY = 4


@dataclass(frozen=True)
class ObjectFrame:
    """A frame's place in the image object; `index` None is the head."""

    index: int | None
    offset: int
    compressed_bytes: int
    crc32c: int
    sha256: str | None
    """Of the frame's decompressed bytes: the head's only (a chunk's are guarded by zstd's content checksum)."""
    logical_bytes: int
    content_sha256: str | None
    """Of the chunk's disk content (see functions.imaging.content); None for the head."""


@dataclass(frozen=True)
class StoredPart:
    number: int
    offset: int
    length: int
    crc32c: int
    etag: str
    copied: bool
    kept: bool = False
    """Found stored by an earlier attempt of the job (resumed), not sent again."""


@dataclass(frozen=True)
class UploadedImage:
    key: str
    upload_id: str
    size: int
    etag: str
    image_bytes: int
    frames: list[ObjectFrame]
    parts: list[StoredPart]
    parts_copied: int
    seconds: float
    object_sha256: str | None
    """Of the bytes sent, frame by frame; the store vouches for what it keeps by the parts' CRC32C. None for an
    image written in place: no step reads its bytes again (the parts' CRC32C, from the workers, vouch for it)."""
    layout: str = Layout.STAGED.value
    parts_kept: int = 0
    """Parts an earlier attempt of the job had stored (a resumed upload sends only the others)."""


def upload_record_key(job_id: str) -> str:
    return f"{keys.staging_prefix(job_id)}upload.json"


def load_upload(services: ImagingServices, job_id: str) -> UploadedImage:
    raw = json.loads(services.store.get(upload_record_key(job_id)))
    raw["frames"] = [ObjectFrame(**frame) for frame in raw["frames"]]
    raw["parts"] = [StoredPart(**part) for part in raw["parts"]]
    return UploadedImage(**raw)


def upload_image(services: ImagingServices, job: Job, plan_key: str) -> UploadedImage:
    """Assemble, upload, complete and verify the image object (at the bandwidth of the server's flavor);
    StorageUnavailableError if the store fails."""
    hold_server_lock(services, job)
    flavor = services.state.get_server(job.server_id).flavor if job.server_id is not None else None
    started = services.monotonic()
    job = advance_job(services, job.id, Status.UPLOADING)
    try:
        if load_layout(services, job.id) is Layout.IN_PLACE:
            return _publish_in_place(services, job, plan_key, started)
        return _upload(services, job, plan_key, flavor, started)
    except StorageError as error:
        raise StorageUnavailableError(str(error)) from error


def _upload(services: ImagingServices, job: Job, plan_key: str, flavor: str | None, started: float) -> UploadedImage:
    store, retry = services.store, services.config.retry
    plan = load_plan(services, plan_key)
    staged = _staged_frames(services, job.id, plan)
    head = vhdcore.compress_head(
        plan, [(frame.stored_blocks, frame.logical_bytes) for frame in staged], services.config.level
    )
    frames = _layout(head, staged)
    parts = plan_frame_parts([frame.compressed_bytes for frame in frames], services.config.part_size)
    size = sum(frame.compressed_bytes for frame in frames)
    key = keys.image_key(job.image_id)

    # The upload recorded on the job, or one its first attempt opened and died before recording: resumed.
    upload_id = job.upload_id or find_resumable_upload(store, key)
    stored: dict[int, PartInfo] = {}
    if upload_id is not None:
        resumed = upload_id
        try:
            stored = {part.number: part for part in call_with_retries(lambda: store.list_parts(key, resumed), retry)}
        except StorageError:
            upload_id = None  # gone (aborted or expired): start again
    if upload_id is None:
        upload_id = call_with_retries(lambda: store.create_multipart(key), retry)
    if upload_id != job.upload_id:
        recorded = upload_id
        revise_job(services, job.id, lambda current: current.revised(upload_id=recorded))

    bucket = bucket_for_flavor_class(flavor_class(flavor)) if flavor is not None else None

    def send(part: PartPlan) -> StoredPart:
        check_still_wanted(services.state.get_job(job.id))  # a cancelled job sends no more parts
        members = _frames_in(part, frames)
        copy_index = members[0].index if len(members) == 1 and members[0].compressed_bytes >= MIN_PART_SIZE else None
        kept = False
        if copy_index is not None:
            expected_crc = members[0].crc32c
            have = stored.get(part.number)
            if have is not None and _is_copy_of(services, have, part.length, expected_crc, job.id, copy_index):
                info, kept = have, True
            else:
                source = keys.frame_key(job.id, copy_index)
                info = call_with_retries(
                    lambda: store.upload_part_copy(key, upload_id, part.number, source, 0, part.length), retry
                )
            copied = True
        else:
            data = b"".join(
                head.frame if frame.index is None else store.get(keys.frame_key(job.id, frame.index))
                for frame in members
            )
            expected_crc = crc32c(data)
            have = stored.get(part.number)
            if (
                have is not None
                and have.size == len(data)
                and (have.crc32c == expected_crc or have.etag == md5_etag(data))
            ):
                info, kept = have, True
            else:
                if bucket is not None:
                    bucket.acquire(len(data))
                info = call_with_retries(
                    lambda: store.upload_part(key, upload_id, part.number, data, expected_crc), retry
                )
            copied = False
        if info.crc32c is not None and info.crc32c != expected_crc:
            raise ImageVerificationError(
                f"part {part.number} was stored with CRC32C {info.crc32c}, expected {expected_crc}"
            )
        elapsed = services.monotonic() - started
        current = services.state.get_job(job.id)
        eta = measured_eta(current.bytes_done + part.length, size, elapsed, None)
        record_progress(services, job.id, add_bytes=part.length, total=size, eta_seconds=eta)
        return StoredPart(part.number, part.offset, part.length, expected_crc, info.etag, copied, kept)

    # The object's sha256 is taken from the staged frames, in order, while the parts go and the store assembles
    # them: a second read of the finished object would only add its time (hashlib releases the GIL).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-sha256") as hasher:
        object_digest = hasher.submit(_object_sha256, services, job.id, head, frames)
        with ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY, thread_name_prefix="image-part") as pool:
            sent = list(pool.map(send, parts))
        infos = [PartInfo(part.number, part.length, part.etag, part.crc32c) for part in sent]
        completed = call_with_retries(lambda: store.complete_multipart(key, upload_id, infos), retry)
        _verify_object(services, key, size, sent, completed)
        object_sha256 = object_digest.result()
    result = UploadedImage(
        key=key,
        upload_id=upload_id,
        size=size,
        etag=completed.etag,
        image_bytes=sum(frame.logical_bytes for frame in frames),
        frames=frames,
        parts=sent,
        parts_copied=sum(part.copied for part in sent),
        seconds=services.monotonic() - started,
        object_sha256=object_sha256,
        parts_kept=sum(part.kept for part in sent),
    )
    store.put(upload_record_key(job.id), json.dumps(asdict(result)).encode())
    return result


def _is_copy_of(services: ImagingServices, have: PartInfo, length: int, crc: int, job_id: str, index: int) -> bool:
    """Whether a stored part is the copy of a staged frame: its size, and its CRC32C where the store lists one, else
    its ETag against the frame object's (a part copied from a whole object carries that object's MD5 ETag)."""
    if have.size != length:
        return False
    if have.crc32c is not None:
        return have.crc32c == crc
    try:
        return (
            have.etag
            == call_with_retries(
                partial(services.store.head, keys.frame_key(job_id, index)), services.config.retry
            ).etag
        )
    except ObjectNotFoundError:
        return False


def _publish_in_place(services: ImagingServices, job: Job, plan_key: str, started: float) -> UploadedImage:
    """The head into its room, the file published under the image's key (a rename), its size and checksum checked.
    Safe to repeat: the head is the same every time, and a file already published is checked, not written."""
    store = services.store
    if not isinstance(store, FileObjectStore):
        raise RuntimeError(f"an image is written in place only in a file store, not {store.url}")
    plan = load_plan(services, plan_key)
    staged = load_written(services, job.id)
    if len(staged) != len(plan.chunks):
        missing = len(plan.chunks) - len(staged)
        raise ChunksNotCompressedError(f"{missing} chunks were not written, from chunk {len(staged)} on")
    head = vhdcore.compress_head(
        plan, [(frame.stored_blocks, frame.logical_bytes) for frame in staged], services.config.level
    )
    room = plan.head_room
    region = vhdcore.head_region(head.frame, room).ljust(room, b"\0")
    unplaced = [frame.index for frame in staged if frame.offset is None]
    if unplaced:
        raise ImageVerificationError(f"chunks {unplaced[:10]} were written in place without an offset")
    frames = _layout(head, staged)
    size = frames[-1].offset + frames[-1].compressed_bytes if staged else room
    parts = [StoredPart(1, 0, room, crc32c(region), "", False)]
    for frame in frames[1:]:
        if frame.compressed_bytes:
            parts.append(StoredPart(len(parts) + 1, frame.offset, frame.compressed_bytes, frame.crc32c, "", False))
    checksum = composite_crc32c([part.crc32c for part in parts])
    key, spool = keys.image_key(job.image_id), spool_key(job.id)
    try:
        path = store.spool_path(spool, create=False)  # never a new, empty spool over a published image
        with path.open("r+b") as image:
            image.write(region)
            image.truncate(size)
        info = store.publish(spool, key, checksum)
    except (FileNotFoundError, ObjectNotFoundError):
        info = store.head(key)  # published by an attempt that died before recording it
    if info.size != size or info.checksum_crc32c is None or not same_object_checksum(info.checksum_crc32c, checksum):
        raise ImageVerificationError(
            f"the image file has {info.size} bytes and checksum {info.checksum_crc32c}, expected {size} and {checksum}"
        )
    set_progress(services, job.id, done=size, total=size, eta_seconds=0.0)
    result = UploadedImage(
        key=key,
        upload_id="",
        size=size,
        etag=info.etag,
        image_bytes=sum(frame.logical_bytes for frame in frames),
        frames=frames,
        parts=parts,
        parts_copied=0,
        seconds=services.monotonic() - started,
        object_sha256=None,
        layout=Layout.IN_PLACE.value,
    )
    store.put(upload_record_key(job.id), json.dumps(asdict(result)).encode())
    return result


def _object_sha256(services: ImagingServices, job_id: str, head: vhdcore.ChunkFrame, frames: list[ObjectFrame]) -> str:
    digest, retry = hashlib.sha256(head.frame), services.config.retry
    for frame in frames:
        if frame.index is not None and frame.compressed_bytes:
            digest.update(call_with_retries(partial(services.store.get, keys.frame_key(job_id, frame.index)), retry))
    return digest.hexdigest()


def _staged_frames(services: ImagingServices, job_id: str, plan: vhdcore.ImagePlan) -> list[StagedFrame]:
    """Every chunk's staged frame; ChunksNotCompressedError naming the missing chunks if a Map item failed."""
    frames, missing = [], []
    for chunk in plan.chunks:
        try:
            frames.append(load_frame(services, job_id, chunk.index))
        except ObjectNotFoundError:
            missing.append(chunk.index)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ChunksNotCompressedError(f"{len(missing)} chunks were not compressed: {shown}")
    return frames


def _layout(head: vhdcore.ChunkFrame, staged: list[StagedFrame]) -> list[ObjectFrame]:
    """The head, then each frame at the offset it was written to in place, or right after the one before."""
    frames = [ObjectFrame(None, 0, len(head.frame), head.crc32c, head.sha256, head.logical_bytes, None)]
    offset = len(head.frame)
    for frame in staged:
        offset = frame.offset if frame.offset is not None else offset
        frames.append(
            ObjectFrame(
                frame.index,
                offset,
                frame.compressed_bytes,
                frame.crc32c,
                None,
                frame.logical_bytes,
                frame.content_sha256,
            )
        )
        offset += frame.compressed_bytes
    return frames


def _frames_in(part: PartPlan, frames: list[ObjectFrame]) -> list[ObjectFrame]:
    """The frames with bytes in `part` (empty frames, of all-unallocated chunks, add nothing)."""
    return [frame for frame in frames if frame.compressed_bytes > 0 and part.offset <= frame.offset < part.end]


def _verify_object(
    services: ImagingServices, key: str, size: int, parts: list[StoredPart], completed: ObjectInfo
) -> None:
    info = call_with_retries(lambda: services.store.head(key), services.config.retry)
    if info.size != size:
        raise ImageVerificationError(f"the image object has {info.size} bytes, expected {size}")
    if info.checksum_crc32c is not None:
        expected = composite_crc32c([part.crc32c for part in parts])
        if not same_object_checksum(info.checksum_crc32c, expected):
            raise ImageVerificationError(f"the image object's CRC32C is {info.checksum_crc32c}, expected {expected}")
    elif all(len(part.etag) == 32 for part in parts):
        expected_etag = multipart_etag([part.etag for part in parts])
        if info.etag != expected_etag:
            raise ImageVerificationError(f"the image object's ETag is {info.etag}, expected {expected_etag}")
    if completed.etag != info.etag:
        raise ImageVerificationError(f"the image object changed after completion ({completed.etag} → {info.etag})")
