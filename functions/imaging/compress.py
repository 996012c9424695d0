"""A Map worker: compress a group of chunks into staged zstd frames (DESIGN §3).

Each chunk's source reads are fetched (pread from the frozen layer files, or ranged GETs when the chain lives in the
object store) and handed to vhdcore, which merges the layers through their bitmaps and compresses one independent
frame. A frame is staged before its result record, so a record's presence means the frame is whole: a retried worker
(after a crash) skips those chunks.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import vhdcore
from functions.imaging import keys
from functions.imaging.errors import DiskCorruptError, DiskMissingError
from functions.imaging.jobs import record_progress
from functions.imaging.progress import measured_eta, step_started
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import FETCH_CONCURRENCY, StoreChunkReads, is_store_key
from functions.state import Job, Status
from functions.storage import NotFoundError


@dataclass(frozen=True)
class StagedFrame:
    """What Upload and the manifest need of a compressed chunk (the frame's bytes are staged beside it)."""

    index: int
    logical_bytes: int
    sha256: str
    crc32c: int
    stored_blocks: list[int]
    virtual_bytes: int
    read_bytes: int
    compressed_bytes: int


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


class _LayerFiles:
    """The frozen chain's layer files, opened once per group, shared by the worker threads (pread has no offset)."""

    def __init__(self, plan: vhdcore.ImagePlan, stack: ExitStack) -> None:
        self._plan = plan
        self._stack = stack
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def fd(self, layer: int) -> int:
        with self._lock:
            fd = self._fds.get(layer)
            if fd is None:
                path = self._plan.layer_paths[layer]
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError as error:
                    raise DiskMissingError(f"layer {path} of the frozen chain is gone") from error
                self._stack.callback(os.close, fd)
                self._fds[layer] = fd
            return fd

    def fetch(self, chunk: vhdcore.ChunkPlan) -> list[bytes]:
        """The chunk's source reads, in plan order."""
        reads = []
        for read in chunk.reads:
            data = os.pread(self.fd(read.layer), read.length, read.file_offset)
            if len(data) != read.length:
                path = self._plan.layer_paths[read.layer]
                raise DiskCorruptError(f"{path}: read {len(data)} of {read.length} bytes at offset {read.file_offset}")
            reads.append(data)
        return reads


def _chunk_fetcher(
    services: ImagingServices, plan: vhdcore.ImagePlan, stack: ExitStack
) -> _LayerFiles | StoreChunkReads:
    """pread for a chain of local files, ranged GETs (side by side) for a chain in the store."""
    if any(is_store_key(path) for path in plan.layer_paths):
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=FETCH_CONCURRENCY, thread_name_prefix="fetch"))
        return StoreChunkReads(services.disk_store, plan, pool)
    return _LayerFiles(plan, stack)


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
    """Compress chunks first .. first + count - 1 of the staged plan into staging, updating the job's progress.

    A failure is recorded (see recorded_worker_failure) before it propagates; a later success clears it.
    """
    failure_key = worker_failure_key(job.id, first)
    try:
        result = _compress_group(services, job, plan_key, first, count)
    except Exception as error:
        record = {"error": type(error).__name__, "message": str(error)}
        services.store.put(failure_key, json.dumps(record).encode())
        raise
    services.store.delete(failure_key)
    return result


def _compress_group(services: ImagingServices, job: Job, plan_key: str, first: int, count: int) -> GroupResult:
    plan = load_plan(services, plan_key)
    chunks = plan.chunks
    if first < 0 or count < 1 or first + count > len(chunks):
        raise DiskCorruptError(f"chunk group {first}+{count} is outside the plan's {len(chunks)} chunks")
    started = step_started(job, Status.SAVING) or services.now()
    with ExitStack() as stack:
        files = _chunk_fetcher(services, plan, stack)

        def one(chunk: vhdcore.ChunkPlan) -> tuple[StagedFrame, bool]:
            try:
                return load_frame(services, job.id, chunk.index), False
            except NotFoundError:
                pass
            staged = _compress_chunk(services, job, plan, chunk, files.fetch(chunk))
            elapsed = (services.now() - started).total_seconds()
            current = services.state.get_job(job.id)
            eta = measured_eta(current.bytes_done + chunk.length, plan.virtual_size, elapsed, current.eta_seconds)
            record_progress(services, job.id, add_bytes=chunk.length, total=plan.virtual_size, eta_seconds=eta)
            return staged, True

        # vhdcore releases the GIL while it merges and compresses: one thread per core keeps every core busy.
        with ThreadPoolExecutor(max_workers=services.config.compress_threads, thread_name_prefix="chunk") as pool:
            done = list(pool.map(one, chunks[first : first + count]))
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
    services: ImagingServices, job: Job, plan: vhdcore.ImagePlan, chunk: vhdcore.ChunkPlan, reads: list[bytes]
) -> StagedFrame:
    try:
        frame = vhdcore.compress_fetched_chunk(plan, chunk.index, reads, services.config.level)
    except vhdcore.VhdError as error:
        raise DiskCorruptError(str(error)) from error
    staged = StagedFrame(
        index=chunk.index,
        logical_bytes=frame.logical_bytes,
        sha256=frame.sha256,
        crc32c=frame.crc32c,
        stored_blocks=list(frame.stored_blocks),
        virtual_bytes=frame.virtual_bytes,
        read_bytes=frame.read_bytes,
        compressed_bytes=len(frame.frame),
    )
    services.store.put(keys.frame_key(job.id, chunk.index), frame.frame)
    services.store.put(keys.frame_result_key(job.id, chunk.index), json.dumps(asdict(staged)).encode())
    return staged
