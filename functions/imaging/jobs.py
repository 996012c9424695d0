"""A job's life on the StateStore: created QUEUED with its image record, moved SAVING → UPLOADING → ACTIVE or to
ERROR with a code and hint, its bytes and ETA updated as work completes, and the per-server imaging lock."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from functions.imaging.errors import InvalidRequestError, JobCancelledError, JobInterruptedError, ServerBusyError
from functions.imaging.services import ImagingServices
from functions.state import (
    AlreadyExistsError,
    Image,
    ImageOrigin,
    InvalidIdError,
    Job,
    NotFoundError,
    Status,
    VersionConflictError,
    validate_id,
)
from functions.state.models import TERMINAL_STATUSES

MAX_UPDATE_ATTEMPTS = 50
"""Map workers update one job concurrently; each lost race re-reads and re-applies (bounded, never a livelock)."""


def _seconds_from_environment(name: str, default: float) -> float:
    try:
        value = float(os.environ[name])
    except (KeyError, ValueError):
        return default
    return value if value > 0 else default


HEARTBEAT_INTERVAL_S = _seconds_from_environment("IMAGING_HEARTBEAT_S", 10.0)
"""How often a runner says its job is alive (a write at most this often per job and process) [IMAGING_HEARTBEAT_S]."""
STALE_AFTER_S = _seconds_from_environment("IMAGING_JOB_STALE_S", 45.0)
"""A job not finished whose last sign of life is older than this has lost its runner (functions.imaging.recovery):
more than four missed heartbeats, so a busy machine never has a live job taken from it [IMAGING_JOB_STALE_S: keep
it several heartbeats long]."""
_STEP_ORDER = {Status.QUEUED: 0, Status.SAVING: 1, Status.UPLOADING: 2, Status.ACTIVE: 3}


def check_still_wanted(job: Job) -> None:
    """JobCancelledError if a cancel was requested; JobInterruptedError if the job ended meanwhile (recovery took
    it from a runner it believed dead): either way this runner must stop working on it."""
    if job.cancel_requested_at is not None:
        raise JobCancelledError(f"job {job.id} was cancelled at {job.cancel_requested_at:%Y-%m-%d %H:%M:%S} UTC")
    if job.status in TERMINAL_STATUSES:
        raise JobInterruptedError(f"job {job.id} already ended {job.status.value} ({job.error_code or 'done'})")


@dataclass(frozen=True)
class ImagingRequest:
    """What starts a job: a registered server or a leaf disk (read-only), and the ids the caller chose."""

    job_id: str
    image_id: str
    tenant: str
    name: str
    server_id: str | None = None
    disk: str | None = None
    origin: ImageOrigin = ImageOrigin.ON_DEMAND
    all_blocks: bool = False
    """Image every block (filesystem-aware imaging off); a server's own setting turns it on too."""


@dataclass(frozen=True)
class PreparedJob:
    """What the workflow carries from Prepare: the job, the deadline of its coalesce, and whether it is a run of a
    job frozen already (resumed after its runner died: it goes on from its stored snapshot and plan)."""

    job: Job
    coalesce_deadline: datetime

    @property
    def resumed(self) -> bool:
        return self.job.status is not Status.QUEUED


def prepare_job(services: ImagingServices, request: ImagingRequest) -> PreparedJob:
    """Prepare: `start_job`, and the deadline by which its chain must be coalesced (CoalesceTimeout after it)."""
    job = start_job(services, request)
    return PreparedJob(job, job.created_at + timedelta(seconds=services.config.coalesce_deadline_s))


def start_job(services: ImagingServices, request: ImagingRequest) -> Job:
    """Validate the request, take the server's lock, and record the job (QUEUED, 0%) and its image.

    Repeating the call for the same job id (a retried Prepare) returns the stored job. ServerBusyError if another
    job holds the server's lock.
    """
    try:
        validate_id("job", request.job_id)
        validate_id("image", request.image_id)
        validate_id("tenant", request.tenant)
        if request.server_id is not None:
            validate_id("server", request.server_id)
    except InvalidIdError as error:
        raise InvalidRequestError(str(error)) from error
    if (request.server_id is None) == (request.disk is None):
        raise InvalidRequestError("an image is made of a server or of a disk, exactly one of the two")
    state = services.state
    try:
        existing = state.get_job(request.job_id)
    except NotFoundError:
        existing = None
    if existing is not None:
        # A retried Prepare, or a resumed job's new execution: the same job, its lock taken again.
        if existing.image_id != request.image_id:
            raise InvalidRequestError(f"job {request.job_id} exists for another image")
        check_still_wanted(existing)
        if existing.server_id is not None and not state.acquire_lock(
            existing.server_id, existing.id, services.config.lock_ttl_s
        ):
            raise ServerBusyError(f"server {existing.server_id} is being imaged by another job")
        return existing
    all_blocks = request.all_blocks
    if request.server_id is not None:
        try:
            server = state.get_server(request.server_id)
        except NotFoundError as error:
            raise InvalidRequestError(f"server {request.server_id!r} is not registered") from error
        if server.tenant != request.tenant:
            raise InvalidRequestError(f"server {request.server_id!r} is not registered")
        if not _take_server_lock(services, request.server_id, request.job_id):
            raise ServerBusyError(f"server {request.server_id} is being imaged by another job")
        all_blocks = all_blocks or server.all_blocks
    now = services.now()
    job = Job.queued(
        at=now,
        id=request.job_id,
        tenant=request.tenant,
        server_id=request.server_id,
        disk=request.disk,
        image_id=request.image_id,
        execution_name=request.job_id,
        heartbeat_at=now,
        all_blocks=all_blocks,
    )
    image = Image(
        id=request.image_id,
        tenant=request.tenant,
        server_id=request.server_id,
        job_id=request.job_id,
        name=request.name,
        origin=request.origin,
        created_at=now,
    )
    state.put_image(image)
    try:
        return state.create_job(job)
    except AlreadyExistsError:
        return state.get_job(request.job_id)


def revise_job(services: ImagingServices, job_id: str, change: Callable[[Job], Job | None]) -> Job:
    """Apply `change` to the stored job with optimistic concurrency; `change` returning None means nothing to do."""
    for _ in range(MAX_UPDATE_ATTEMPTS):
        current = services.state.get_job(job_id)
        revised = change(current)
        if revised is None:
            return current
        try:
            return services.state.update_job(revised)
        except VersionConflictError:
            continue
    raise VersionConflictError("job", job_id, -1, None)


def advance_job(
    services: ImagingServices, job_id: str, status: Status, detail: str | None = None, *, update_image: bool = True
) -> Job:
    """Move the job to its next step (idempotent: a job already there stays as it is); the image follows unless
    the caller writes the image record itself (Finalize, so that ACTIVE is never seen without its sizes)."""
    at = services.now()

    def change(job: Job) -> Job | None:
        if job.status is status or (
            status in _STEP_ORDER
            and job.status not in TERMINAL_STATUSES
            and _STEP_ORDER[job.status] > _STEP_ORDER[status]
        ):
            return None  # there already (a retried step), or past it (a resumed job going through its steps again)
        moved = job.transition(status, at=at, detail=detail)
        if status is Status.ACTIVE:  # the last step's bytes stay, all done
            total = job.bytes_total if job.bytes_total is not None else job.bytes_done
            return moved.revised(bytes_done=total, bytes_total=total)
        return moved.revised(bytes_done=0, bytes_total=None)

    job = revise_job(services, job_id, change)
    if update_image:
        services.state.update_image_status(job.image_id, status)
    return job


def record_progress(
    services: ImagingServices, job_id: str, *, add_bytes: int, total: int, eta_seconds: float | None
) -> Job:
    """Count `add_bytes` more bytes done of `total` in the job's current step, with a new ETA. The write is also the
    job's heartbeat, and the read before it is where a running job sees a cancel (check_still_wanted)."""
    at = services.now()

    def change(job: Job) -> Job:
        check_still_wanted(job)
        done = min(total, job.bytes_done + add_bytes)
        return job.revised(bytes_done=done, bytes_total=total, eta_seconds=eta_seconds, heartbeat_at=at)

    return revise_job(services, job_id, change)


def set_progress(services: ImagingServices, job_id: str, *, done: int, total: int, eta_seconds: float | None) -> Job:
    at = services.now()

    def change(job: Job) -> Job:
        check_still_wanted(job)
        return job.revised(bytes_done=min(done, total), bytes_total=total, eta_seconds=eta_seconds, heartbeat_at=at)

    return revise_job(services, job_id, change)


_beats: dict[str, float] = {}
"""Job id -> when (monotonic) this process last wrote its heartbeat."""
_beats_lock = threading.Lock()


def heartbeat(services: ImagingServices, job_id: str, *, force: bool = False) -> Job | None:
    """Say the job's runner is alive: `heartbeat_at` written, at most once per HEARTBEAT_INTERVAL_S per job in this
    process unless `force`d (None when nothing was written). Raises what check_still_wanted raises."""
    moment = services.monotonic()
    with _beats_lock:
        last = _beats.get(job_id)
        if not force and last is not None and moment - last < HEARTBEAT_INTERVAL_S:
            return None
        _beats[job_id] = moment
    at = services.now()

    def change(job: Job) -> Job:
        check_still_wanted(job)
        return job.revised(heartbeat_at=at)

    return revise_job(services, job_id, change)


def beat_quietly(services: ImagingServices, job_id: str) -> bool:
    """A heartbeat from outside the job's steps (the embedded engine's pump): written unless the job has ended or was
    asked to stop (its steps see that themselves). False once there is nothing left to beat for."""
    at = services.now()

    def change(job: Job) -> Job | None:
        if job.status in TERMINAL_STATUSES or job.cancel_requested_at is not None:
            return None
        return job.revised(heartbeat_at=at)

    try:
        job = revise_job(services, job_id, change)
    except NotFoundError:
        return True  # Prepare has not recorded it yet
    return job.status not in TERMINAL_STATUSES


def is_stale(job: Job, now: datetime, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the job lost its runner: not finished, and handed over (abandoned) or silent for too long."""
    if job.status in TERMINAL_STATUSES:
        return False
    return job.abandoned_at is not None or (now - job.last_sign_of_life).total_seconds() > stale_after_s


def _take_server_lock(services: ImagingServices, server_id: str, job_id: str) -> bool:
    """Take the server's lock for `job_id`. A lock still held by a job that has ended (its last step marks the
    image ACTIVE a moment before it releases the lock) is released first: a client that saw the image ACTIVE and
    asks again at once is not told the server is busy."""
    state, ttl = services.state, services.config.lock_ttl_s
    if state.acquire_lock(server_id, job_id, ttl):
        return True
    holder = state.get_lock(server_id)
    if holder is None:
        return state.acquire_lock(server_id, job_id, ttl)
    try:
        ended = state.get_job(holder.owner).status in TERMINAL_STATUSES
    except NotFoundError:
        ended = False  # a lock not taken by a job (e.g. `server remove`): never taken over
    if not ended:
        return False
    state.release_lock(server_id, holder.owner)  # only if that job still holds it
    return state.acquire_lock(server_id, job_id, ttl)


def hold_server_lock(services: ImagingServices, job: Job) -> None:
    """Renew the job's lock on its server for another TTL, at the start of each step: a job may run longer than one
    TTL (the lock's expiry only frees the server of a job that died). ServerBusyError if the lock expired meanwhile
    and another job took the server (this one must not go on imaging it). Also the step's heartbeat, and where it
    sees a cancel (check_still_wanted on the job the step just read)."""
    check_still_wanted(job)
    heartbeat(services, job.id)
    if job.server_id is None:
        return
    if not services.state.acquire_lock(job.server_id, job.id, services.config.lock_ttl_s):
        holder = services.state.get_lock(job.server_id)
        raise ServerBusyError(
            f"job {job.id} lost server {job.server_id}'s lock"
            + (f" to job {holder.owner}" if holder is not None else "")
            + " (it expired while the job was held up)"
        )


def release_server_lock(services: ImagingServices, job: Job) -> bool:
    """Release the server's lock if this job holds it (a job that failed to take it must not free another's)."""
    if job.server_id is None:
        return False
    return services.state.release_lock(job.server_id, job.id)
