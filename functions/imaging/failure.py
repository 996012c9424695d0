"""The failure path (DESIGN §3): the job ERROR with a reason code and an operator hint, the multipart upload
aborted, staging removed, and the server's lock released if this job holds it. Safe to repeat."""

from __future__ import annotations

import json

from functions.imaging import keys
from functions.imaging.compress import recorded_worker_failure
from functions.imaging.errors import MAP_FAILURE_NAMES, Failure, JobCancelledError, failure_for
from functions.imaging.finalize import delete_staging
from functions.imaging.jobs import release_server_lock, revise_job
from functions.imaging.services import ImagingServices
from functions.state import Job, NotFoundError, Status
from functions.state.models import TERMINAL_STATUSES
from functions.storage.upload import abort_upload, find_resumable_upload

MAX_DETAIL = 1024


def fail_execution(services: ImagingServices, job_id: str | None, error_name: str, cause: str) -> Failure:
    """The Failed state: the job's failure recorded and cleaned up after (`fail_job`) when the execution got as far
    as naming its job, else only the code and hint of `error_name` (its request was refused before any job)."""
    if job_id is None:
        return failure_for(error_name)
    return fail_job(services, job_id, error_name, cause)


def fail_job(services: ImagingServices, job_id: str, error_name: str, cause: str) -> Failure:
    """Record the failure `error_name` (the Lambda error's name) on the job and clean up after it."""
    try:
        job = services.state.get_job(job_id)
    except NotFoundError:
        return failure_for(error_name)  # the job was never recorded (e.g. its request was invalid or the server busy)
    if error_name in MAP_FAILURE_NAMES:
        recorded = recorded_worker_failure(services, job_id)
        if recorded is not None:
            error_name, cause = recorded
    failure = failure_for(error_name)
    at = services.now()
    cause = error_message(cause)

    cancelled = Failure.of(JobCancelledError)

    def mark(current: Job) -> Job | None:
        if current.status in TERMINAL_STATUSES:
            return None
        detail = f"{error_name}: {cause}"
        ending = failure
        if current.cancel_requested_at is not None and failure != cancelled:
            # Asked to stop, it ended otherwise meanwhile (a step failing as it was interrupted): what was asked.
            ending, detail = cancelled, f"cancelled on request; it ended with {detail}"
        return current.transition(
            Status.ERROR, at=at, detail=detail[:MAX_DETAIL], error_code=ending.code, error_hint=ending.hint
        )

    job = revise_job(services, job_id, mark)
    if job.status is Status.ERROR:
        services.state.update_image_status(job.image_id, Status.ERROR)
        if job.error_code == cancelled.code:
            failure = cancelled
    _abort_uploads(services, job)
    delete_staging(services, job.id)
    release_server_lock(services, job)
    return failure


def error_message(cause: str) -> str:
    """The message of a Lambda error's cause (a JSON payload with `errorMessage` and a stack trace), else `cause`."""
    try:
        payload = json.loads(cause)
    except ValueError:
        return cause
    if isinstance(payload, dict) and isinstance(payload.get("errorMessage"), str):
        return str(payload["errorMessage"])
    return cause


def _abort_uploads(services: ImagingServices, job: Job) -> None:
    """Abort the job's recorded upload and any other left on its image's key (an Upload that died before
    recording its id)."""
    key = keys.image_key(job.image_id)
    aborted: set[str] = set()
    upload_id = job.upload_id or find_resumable_upload(services.store, key)
    while upload_id is not None and upload_id not in aborted:
        abort_upload(services.store, key, upload_id, services.config.retry)
        aborted.add(upload_id)
        upload_id = find_resumable_upload(services.store, key)
