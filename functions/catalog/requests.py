"""Asking for an image: record the job and its image (QUEUED, the server's lock taken) and start its execution.

The records exist before the call returns, so a client polling the image right after `202 Accepted` finds it; the
workflow's Prepare state finds the job already there (same ids) and carries on. Starting an execution is idempotent
for a job id (the execution is named after it), so a retried request never runs twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from functions.imaging.errors import ServerBeingImagedError, ServerBusyError, ServerNotFoundError
from functions.imaging.failure import fail_job
from functions.imaging.jobs import ImagingRequest, start_job
from functions.imaging.services import ImagingServices
from functions.state import ImageOrigin, Job, NotFoundError, Server

Launcher = Callable[[ImagingRequest], None]
"""Starts the imaging execution of a recorded job (the embedded engine, or Step Functions on AWS)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def server_of_tenant(services: ImagingServices, tenant: str, server_id: str) -> Server:
    try:
        server = services.state.get_server(server_id)
    except NotFoundError as error:
        raise ServerNotFoundError(server_id) from error
    if server.tenant != tenant:
        raise ServerNotFoundError(server_id)
    return server


def request_image(
    services: ImagingServices,
    launch: Launcher,
    *,
    tenant: str,
    server_id: str,
    name: str | None = None,
    job_id: str | None = None,
    image_id: str | None = None,
    origin: ImageOrigin = ImageOrigin.ON_DEMAND,
    all_blocks: bool = False,
) -> Job:
    """Record and start an image of a tenant's server; ServerBeingImagedError (with the running job) if busy."""
    server = server_of_tenant(services, tenant, server_id)
    request = ImagingRequest(
        job_id=job_id or new_id("job"),
        image_id=image_id or new_id("img"),
        tenant=tenant,
        name=name or f"{server.name} {services.now():%Y-%m-%d %H:%M} UTC",
        server_id=server.id,
        origin=origin,
        all_blocks=all_blocks,
    )
    try:
        job = start_job(services, request)
    except ServerBusyError as error:
        lock = services.state.get_lock(server.id)
        raise ServerBeingImagedError(server.id, lock.owner if lock else None) from error
    try:
        launch(request)
    except Exception as error:
        # Nothing runs for this job: record why and free the server rather than hold it until the lock expires.
        fail_job(services, job.id, type(error).__name__, str(error))
        raise
    return job
