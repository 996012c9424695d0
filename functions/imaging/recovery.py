"""Jobs outlive their runners (DESIGN §3): a job whose runner died (process killed, `imaging serve` restarted, a
Lambda timed out outside the ASL's Catch) is found by the next start or call, and resumed from what it stored or
failed as INTERRUPTED, its lock released and its staging removed.

A runner shows it is alive by the job's heartbeat (functions.imaging.jobs.heartbeat, the progress writes, the
embedded engine's pump). A job not finished whose last sign of life is older than STALE_AFTER_S, or that its runner
handed over on purpose (`abandoned_at`: a server shutting down, a command interrupted), has lost its runner.

Who recovers: a caller that can run the workflow (`imaging image create`, `imaging serve` at its start) passes a
`resume` launcher, and such a job runs again under its own id and image (a new execution): its stored frames,
parts and open multipart upload are kept and only what is missing is done (Snapshot and Estimate find their
records, Compress skips the frames it finds, Upload lists the parts stored). A caller that cannot run it
(`imaging image list`, `imaging image cancel`) fails it INTERRUPTED. A job asked to stop is failed CANCELLED, and
a job that was resumed MAX_RUNS times already is failed INTERRUPTED: a job that kills its runner is not run
forever.

Claiming a job is a conditional write of its record (its version): of several recoverers at once, one acts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from functions.imaging.errors import JobCancelledError, JobInterruptedError
from functions.imaging.failure import fail_job
from functions.imaging.finalize import delete_staging
from functions.imaging.jobs import STALE_AFTER_S, ImagingRequest, is_stale, revise_job
from functions.imaging.services import ImagingServices
from functions.state import InvalidIdError, Job, NotFoundError, VersionConflictError
from functions.state.models import TERMINAL_STATUSES
from functions.storage import FileObjectStore
from functions.storage.upload import abort_upload

MAX_RUNS = 3
"""Executions a job may have: its first and two resumes."""
ORPHAN_AFTER_S = 900.0
"""Staging of a job that was never recorded is an orphan once nothing wrote to it for this long."""

Resume = Callable[[ImagingRequest, str], None]
"""Starts a new execution of a recorded job: its request and the execution's name."""

Action = Literal["resumed", "failed"]


@dataclass(frozen=True)
class Recovered:
    """What recovery did with one job whose runner was gone."""

    job_id: str
    image_id: str
    server_id: str | None
    action: Action
    code: str | None
    """The job's error code when it was failed (INTERRUPTED or CANCELLED)."""


def execution_name(job: Job, run: int) -> str:
    """The name of a job's `run`-th execution: the job id for the first, then `<job id>-run<n>` (names are unique
    per state machine on Step Functions, and at most 80 characters)."""
    if run <= 1:
        return job.id
    suffix = f"-run{run}"
    return job.id[: 80 - len(suffix)] + suffix


def request_of(services: ImagingServices, job: Job) -> ImagingRequest:
    """The request that started the job, rebuilt from its records (a resumed run is the same request)."""
    image = services.state.get_image(job.image_id)
    return ImagingRequest(
        job_id=job.id,
        image_id=job.image_id,
        tenant=job.tenant,
        name=image.name,
        server_id=job.server_id,
        disk=job.disk,
        origin=image.origin,
        all_blocks=job.all_blocks,
    )


def recover_jobs(
    services: ImagingServices,
    *,
    resume: Resume | None = None,
    stale_after_s: float = STALE_AFTER_S,
    which: Callable[[Job], bool] | None = None,
) -> list[Recovered]:
    """Find the jobs whose runner is gone (of those `which` accepts, default all) and resume or fail each."""
    now = services.now()
    recovered: list[Recovered] = []
    for job in services.state.list_unfinished_jobs():
        if (which is None or which(job)) and is_stale(job, now, stale_after_s):
            outcome = recover_job(services, job, resume=resume)
            if outcome is not None:
                recovered.append(outcome)
    return recovered


def recover_job(services: ImagingServices, job: Job, *, resume: Resume | None = None) -> Recovered | None:
    """Resume or fail `job` (read as stale by the caller); None if another recoverer or its runner got there first."""
    resuming = resume is not None and job.cancel_requested_at is None and job.runs < MAX_RUNS
    run = job.runs + 1 if resuming else job.runs
    claimed = job.revised(
        heartbeat_at=services.now(),
        abandoned_at=None,
        runs=run,
        execution_name=execution_name(job, run) if resuming else job.execution_name,
    )
    try:
        claimed = services.state.update_job(claimed)
    except (VersionConflictError, NotFoundError):
        return None  # changed since it was read: a runner, a canceller or another recoverer has it
    if resuming and resume is not None:
        try:
            resume(request_of(services, claimed), execution_name(claimed, run))
        except Exception as error:  # nothing runs it after all: fail it as its runner would have been
            failure = fail_job(services, job.id, JobInterruptedError.__name__, f"could not be resumed: {error}")
            return Recovered(job.id, job.image_id, job.server_id, "failed", failure.code)
        return Recovered(job.id, job.image_id, job.server_id, "resumed", None)
    if job.cancel_requested_at is not None:
        error_name, cause = JobCancelledError.__name__, "cancelled on request; its runner had stopped"
    else:
        error_name = JobInterruptedError.__name__
        why = "handed over by its runner" if job.abandoned_at is not None else "no heartbeat"
        cause = f"its runner stopped ({why} since {job.last_sign_of_life:%Y-%m-%d %H:%M:%S} UTC)"
        if job.runs >= MAX_RUNS:
            cause += f" after {job.runs} runs"
    failure = fail_job(services, job.id, error_name, cause)
    return Recovered(job.id, job.image_id, job.server_id, "failed", failure.code)


def resumable_job_of(services: ImagingServices, *, server_id: str | None = None, disk: str | None = None) -> Job | None:
    """The newest job of this server (or of this disk) that lost its runner and may be resumed, if any: what an
    `imaging image create` of the same server or disk runs again instead of starting anew."""
    now = services.now()
    candidates = [
        job
        for job in services.state.list_unfinished_jobs()
        if is_stale(job, now)
        and job.cancel_requested_at is None
        and job.runs < MAX_RUNS
        and ((server_id is not None and job.server_id == server_id) or (disk is not None and job.disk == disk))
    ]
    return candidates[-1] if candidates else None


def hand_over(services: ImagingServices, job_ids: list[str]) -> list[str]:
    """Mark jobs whose runner is stopping on purpose (a server shutting down, an interrupted command) so that the
    next recovery takes them at once rather than after STALE_AFTER_S; returns the ids of those marked."""
    marked: list[str] = []
    at = services.now()

    def abandon(job: Job) -> Job | None:
        if job.status in TERMINAL_STATUSES or job.abandoned_at is not None:
            return None
        return job.revised(abandoned_at=at)

    for job_id in job_ids:
        try:
            # Retried on a conflict: the job's own steps still write its progress while it is handed over.
            job = revise_job(services, job_id, abandon)
        except (NotFoundError, VersionConflictError):
            continue  # not recorded yet, or never still: the heartbeat threshold covers it
        if job.abandoned_at == at:
            marked.append(job_id)
    return marked


def remove_orphans(services: ImagingServices, *, unrecorded_after_s: float = ORPHAN_AFTER_S) -> int:
    """Staging of jobs that ended, and multipart uploads of images that ended, left by runners that died during
    their failure path; staging of a job never recorded only once untouched for `unrecorded_after_s` on a file
    store (a command's head start writes a job's frames before its job is recorded). Returns how many staging
    folders and uploads were removed."""
    removed = 0
    jobs: set[str] = set()
    for info in services.store.list_objects("staging/"):
        jobs.add(info.key.split("/", 2)[1])
    for job_id in sorted(jobs):
        try:
            job = services.state.get_job(job_id)
        except NotFoundError:
            job = None
        except InvalidIdError:
            continue  # not a job id: not ours
        if (job is not None and job.status in TERMINAL_STATUSES) or (
            job is None and _untouched_for(services, f"staging/{job_id}/", unrecorded_after_s)
        ):
            delete_staging(services, job_id)
            removed += 1
    for upload in services.store.list_multipart_uploads("images/"):
        image_id = upload.key.split("/", 2)[1]
        try:
            image = services.state.get_image(image_id)
        except NotFoundError:
            image = None
        except InvalidIdError:
            continue
        if image is None or image.status in TERMINAL_STATUSES:
            abort_upload(services.store, upload.key, upload.upload_id, services.config.retry)
            removed += 1
    if isinstance(services.store, FileObjectStore):
        removed += services.store.sweep_leftovers()  # a killed writer's temp files, locks nobody holds
    return removed


def _untouched_for(services: ImagingServices, prefix: str, seconds: float) -> bool:
    """Whether nothing under `prefix` of a file store was modified for `seconds` (False on other stores: they
    keep no such time that we read, and their staging of unrecorded jobs is left to a bucket lifecycle rule)."""
    store = services.store
    if not isinstance(store, FileObjectStore):
        return False
    cutoff = time.time() - seconds
    folder = store.root / prefix
    try:
        return all(path.stat().st_mtime < cutoff for path in folder.rglob("*") if path.is_file())
    except FileNotFoundError:
        return True
