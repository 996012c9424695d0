"""`imaging image cancel` (DESIGN §3): a running job stops through the same failure path as any failure: the job
ERROR with code CANCELLED, its multipart upload aborted, its staging removed, its server's lock released.

The cancel is a flag on the job (`cancel_requested_at`). A runner that is alive sees it where it next reads its
job (each frame's or part's progress write, each step's start: functions.imaging.jobs.check_still_wanted), raises
JobCancelledError, and the ASL's Catch runs the Failed state. A job whose runner is gone (its heartbeat stale, or
handed over) is failed here, by the canceller, through that same failure path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from functions.imaging.errors import JobCancelledError
from functions.imaging.failure import fail_job
from functions.imaging.jobs import is_stale, revise_job
from functions.imaging.services import ImagingServices
from functions.state import Job, NotFoundError, Status
from functions.state.models import TERMINAL_STATUSES

RUNNER_WAIT_S = 30.0
"""How long a cancel waits for a live runner to stop its job (it looks at least every heartbeat interval)."""
POLL_S = 0.1


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel request found and did."""

    image_id: str
    job_id: str | None
    status: Status
    """The job's (or, without a job, the image's) status when the request returned."""
    error_code: str | None
    requested: bool
    """The job was running and is now asked to stop."""
    stopped_by: str | None
    """"runner" (it saw the request), "canceller" (its runner was gone: failed here) or None (not yet, or it had
    ended before the request)."""

    @property
    def cancelled(self) -> bool:
        return self.status is Status.ERROR and self.error_code == "CANCELLED"

    def to_json(self) -> dict[str, object]:
        return {
            "image_id": self.image_id,
            "job_id": self.job_id,
            "status": self.status.value,
            "error_code": self.error_code,
            "requested": self.requested,
            "stopped_by": self.stopped_by,
            "cancelled": self.cancelled,
        }


def mark_cancel(services: ImagingServices, job_id: str) -> Job:
    """Flag the job as asked to stop (once; a job that has ended is left as it is)."""
    at = services.now()

    def change(job: Job) -> Job | None:
        if job.status in TERMINAL_STATUSES or job.cancel_requested_at is not None:
            return None
        return job.revised(cancel_requested_at=at)

    return revise_job(services, job_id, change)


def request_cancel(
    services: ImagingServices, image_id: str, *, wait_s: float = RUNNER_WAIT_S, idle: threading.Event | None = None
) -> CancelOutcome:
    """Ask the job making `image_id` to stop and wait (up to `wait_s`) until it has: by its live runner, or here
    when its runner is gone (or goes silent while we wait). NotFoundError if there is no such image."""
    image = services.state.get_image(image_id)
    try:
        job = services.state.get_job(image.job_id) if image.job_id is not None else None
    except NotFoundError:
        job = None
    if job is None:
        return CancelOutcome(image_id, None, image.status, None, requested=False, stopped_by=None)
    if job.status in TERMINAL_STATUSES:
        return CancelOutcome(image_id, job.id, job.status, job.error_code, requested=False, stopped_by=None)
    job = mark_cancel(services, job.id)
    pause = idle or threading.Event()
    deadline = services.monotonic() + wait_s
    while job.status not in TERMINAL_STATUSES:
        if is_stale(job, services.now()):
            cancel_without_runner(services, job.id)
            job = services.state.get_job(job.id)
            return CancelOutcome(image_id, job.id, job.status, job.error_code, requested=True, stopped_by="canceller")
        if services.monotonic() >= deadline:
            break
        pause.wait(POLL_S)
        job = services.state.get_job(job.id)
    stopped_by = "runner" if job.status in TERMINAL_STATUSES else None
    return CancelOutcome(image_id, job.id, job.status, job.error_code, requested=True, stopped_by=stopped_by)


def cancel_without_runner(services: ImagingServices, job_id: str) -> None:
    """The failure path for a cancelled job that nothing runs any more."""
    fail_job(services, job_id, JobCancelledError.__name__, "cancelled on request; its runner had stopped")
