"""A Map worker: compress a group of chunks into zstd frames (DESIGN §3), in place in the image file or staged
(functions.imaging.layout says which).

vhdcore reads each chunk's planned source ranges from the frozen layer files (prefetched), merges the layers through
their bitmaps and compresses one independent frame, the GIL released. A frame is staged before its result record, so
a record's presence means the frame is whole: a retried worker (after a crash) skips those chunks. A chain kept in
the object store is read otherwise: each chunk's planned reads are fetched by ranged GETs and handed to vhdcore.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import vhdcore
from functions.imaging import head_start, keys
from functions.imaging.disks import open_disk
from functions.imaging.errors import DiskCorruptError, vhd_errors
from functions.imaging.jobs import check_still_wanted, hold_server_lock, record_progress
from functions.imaging.layout import (
    SYNC_BYTES,
    Layout,
    StagedFrame,
    load_layout,
    load_written,
    record_written,
    spool_key,
)
from functions.imaging.planning import estimate_key
from functions.imaging.prediction import learn_compress_time
from functions.imaging.progress import measured_eta, step_started
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import StoreChunkReads, is_store_key
from functions.state import Job, Status
from functions.storage import FileObjectStore, ObjectNotFoundError


@dataclass(frozen=True)
class GroupResult:
    compressed: int
    reused: int
    virtual_bytes: int
    read_bytes: int
    compressed_bytes: int


def load_plan(services: ImagingServices, plan_key: str) -> vhdcore.ImagePlan:
    return vhdcore.ImagePlan.from_json(services.store.get(plan_key).decode())


def load_frame(services: ImagingServices, job_id: str, index: int) -> StagedFrame:
    return StagedFrame(**json.loads(services.store.get(keys.frame_result_key(job_id, index))))


def _open_planned_chain(services: ImagingServices, plan: vhdcore.ImagePlan) -> vhdcore.Chain | StoreChunkReads:
    """The frozen chain the plan was made from: vhdcore reads each chunk's planned ranges itself (pread, prefetched
    with posix_fadvise), so no byte passes through Python before it is compressed."""
    paths = plan.layer_paths
    if not paths:
        raise DiskCorruptError("the chunk plan names no layer")
    if is_store_key(paths[0]):
        return StoreChunkReads(services.disk_store, plan)
    chain = open_disk(services.disk_store, paths[0])
    if [layer.path for layer in chain.layers] != paths or chain.virtual_size != plan.virtual_size:
        raise DiskCorruptError(f"the chain of {paths[0]} is no longer the one that was planned")
    return chain


def worker_failure_key(job_id: str, first: int) -> str:
    return f"{keys.staging_prefix(job_id)}failures/{first:06d}.json"


def recorded_worker_failure(services: ImagingServices, job_id: str) -> tuple[str, str] | None:
    """The (error name, message) of a Map item that failed, if one did and none of its retries succeeded.

    A Distributed Map that fails reports States.ExceedToleratedFailureThreshold, not its item's error; this keeps
    the item's reason for the failure path (and catches an engine that lets a failed item pass unnoticed).
    """
    for info in services.store.list_objects(f"{keys.staging_prefix(job_id)}failures/"):
        recorded = json.loads(services.store.get(info.key))
        return str(recorded["error"]), str(recorded["message"])
    return None


def compress_group(services: ImagingServices, job: Job, plan_key: str, first: int, count: int) -> GroupResult:
    """Compress chunks first .. first + count - 1 of the staged plan (into the image file or into staging, as the
    job's layout says), updating the job's progress.

    A failure is recorded (see recorded_worker_failure) before it propagates; a later success clears it.
    """
    failure_key = worker_failure_key(job.id, first)
    compress = _compress_in_place if load_layout(services, job.id) is Layout.IN_PLACE else _compress_group
    try:
        result = compress(services, job, plan_key, first, count)
    except Exception as error:
        record = {"error": type(error).__name__, "message": str(error)}
        services.store.put(failure_key, json.dumps(record).encode())
        raise
    services.store.delete(failure_key)
    return result


def _checked_group(plan: vhdcore.ImagePlan, first: int, count: int) -> list[vhdcore.ChunkPlan]:
    chunks = plan.chunks
    if first < 0 or count < 1 or first + count > len(chunks):
        raise DiskCorruptError(f"chunk group {first}+{count} is outside the plan's {len(chunks)} chunks")
    return chunks[first : first + count]


def _count_progress(services: ImagingServices, job: Job, plan: vhdcore.ImagePlan, length: int) -> None:
    """`length` more virtual bytes compressed, with the ETA measured since the step began (also the job's heartbeat,
    and where it sees a cancel). A resumed job already uploading only looks for a cancel."""
    started = step_started(job, Status.SAVING) or services.now()
    elapsed = (services.now() - started).total_seconds()
    current = services.state.get_job(job.id)
    if current.status is not Status.SAVING:
        check_still_wanted(current)
        return
    eta = measured_eta(current.bytes_done + length, plan.virtual_size, elapsed, current.eta_seconds)
    record_progress(services, job.id, add_bytes=length, total=plan.virtual_size, eta_seconds=eta)


def _compress_in_place(services: ImagingServices, job: Job, plan_key: str, first: int, count: int) -> GroupResult:
    """Every chunk's frame written once, where it belongs in the image file (after the head's room), resuming
    after the frames a previous attempt recorded as durable."""
    hold_server_lock(services, job)
    store = services.store
    if not isinstance(store, FileObjectStore):
        raise RuntimeError(f"an image is written in place only in a file store, not {store.url}")
    plan = load_plan(services, plan_key)
    chunks = _checked_group(plan, first, count)
    if first != 0 or count != len(plan.chunks):
        raise RuntimeError(f"an image written in place is compressed by one Map item, not chunks {first}+{count}")
    chain = _open_planned_chain(services, plan)
    if not isinstance(chain, vhdcore.Chain):
        raise RuntimeError("an image is written in place only from a chain of local files")
    ahead = head_start.take_frames(services, job.id, plan, chain)  # written before the engine was up, if any
    if ahead:
        _count_progress(services, job, plan, sum(frame.virtual_bytes for frame in ahead))
    done = load_written(services, job.id)
    offset = done[-1].offset + done[-1].compressed_bytes if done and done[-1].offset is not None else plan.head_room
    batch: list[StagedFrame] = []
    fresh: list[StagedFrame] = []

    def on_frame(frame: vhdcore.ChunkFrame) -> None:
        staged = StagedFrame.of(frame, offset=frame.object_offset)
        batch.append(staged)
        fresh.append(staged)
        _count_progress(services, job, plan, staged.virtual_bytes)

    def on_durable(end: int) -> None:
        record_written(services, job.id, batch)
        batch.clear()

    remaining = len(chunks) - len(done)
    started = services.monotonic()
    if remaining:
        with vhd_errors():
            chain.compress_chunks_into(
                plan,
                len(done),
                remaining,
                str(store.spool_path(spool_key(job.id))),
                offset,
                level=services.config.level,
                digest="content",
                sync_bytes=SYNC_BYTES,
                on_frame=on_frame,
                on_durable=on_durable,
            )
    if not done and job.runs == 1:  # a whole run, not a resumed one: what the estimate's compress time should have been
        predicted = json.loads(store.get(estimate_key(job.id))).get("estimate_compress_seconds")
        if predicted is not None:
            learn_compress_time(store, float(predicted), services.monotonic() - started)
    frames = done + fresh
    return GroupResult(
        compressed=len(fresh),
        reused=len(done),
        virtual_bytes=sum(frame.virtual_bytes for frame in frames),
        read_bytes=sum(frame.read_bytes for frame in frames),
        compressed_bytes=sum(frame.compressed_bytes for frame in frames),
    )


def _compress_group(services: ImagingServices, job: Job, plan_key: str, first: int, count: int) -> GroupResult:
    hold_server_lock(services, job)
    plan = load_plan(services, plan_key)
    chunks = _checked_group(plan, first, count)
    chain = _open_planned_chain(services, plan)

    def stage(frame: vhdcore.ChunkFrame, chunk: vhdcore.ChunkPlan) -> StagedFrame:
        try:
            staged = _stage_frame(services, job, frame)
        finally:
            pending.release()
        _count_progress(services, job, plan, chunk.length)
        return staged

    def one(chunk: vhdcore.ChunkPlan) -> Future[StagedFrame] | StagedFrame:
        try:
            return load_frame(services, job.id, chunk.index)
        except ObjectNotFoundError:
            pass
        frame = _compress_chunk(services, chain, plan, chunk)
        pending.acquire()
        return stager.submit(stage, frame, chunk)

    # vhdcore releases the GIL while it merges and compresses: one thread per core keeps every core busy, and a
    # stager writes the frames (and waits on their fsyncs) meanwhile, at most one frame per core behind.
    threads = services.config.compress_threads
    pending = threading.BoundedSemaphore(threads)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage") as stager:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chunk") as pool:
            outcomes = list(pool.map(one, chunks))
        done = [(o.result(), True) if isinstance(o, Future) else (o, False) for o in outcomes]
    frames = [staged for staged, _ in done]
    compressed = sum(fresh for _, fresh in done)
    return GroupResult(
        compressed=compressed,
        reused=len(done) - compressed,
        virtual_bytes=sum(frame.virtual_bytes for frame in frames),
        read_bytes=sum(frame.read_bytes for frame in frames),
        compressed_bytes=sum(frame.compressed_bytes for frame in frames),
    )


def _compress_chunk(
    services: ImagingServices,
    chain: vhdcore.Chain | StoreChunkReads,
    plan: vhdcore.ImagePlan,
    chunk: vhdcore.ChunkPlan,
) -> vhdcore.ChunkFrame:
    level = services.config.level
    with vhd_errors():
        if isinstance(chain, StoreChunkReads):
            return vhdcore.compress_fetched_chunk(plan, chunk.index, chain.fetch(chunk), level, digest="content")
        return chain.compress_chunk(plan, chunk.index, level, digest="content")


def _stage_frame(services: ImagingServices, job: Job, frame: vhdcore.ChunkFrame) -> StagedFrame:
    """The frame, then its record (whose presence says the frame is whole)."""
    staged = StagedFrame.of(frame)
    services.store.put(keys.frame_key(job.id, staged.index), frame.frame)
    services.store.put(keys.frame_result_key(job.id, staged.index), json.dumps(asdict(staged)).encode())
    return staged
