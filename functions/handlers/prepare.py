"""Prepare: validate the request, take the server's lock, record the job at 0% (QUEUED)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import JobRef, PrepareEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.jobs import ImagingRequest, start_job
from functions.state import Status


@state_handler(PrepareEvent)
def handler(event: PrepareEvent, context: LambdaContext) -> dict[str, Any]:
    request = event.request
    ctx = services()
    job = start_job(ctx, ImagingRequest(**request.model_dump()))
    metrics.add_metric(name="JobsStarted", unit=MetricUnit.Count, value=1)
    logger.info("job queued", extra={"job_id": job.id, "server_id": job.server_id, "disk": job.disk})
    deadline = job.created_at + timedelta(seconds=ctx.config.coalesce_deadline_s)
    ref = JobRef(
        job_id=job.id,
        image_id=job.image_id,
        server_id=job.server_id,
        coalesce_deadline=deadline,
        resumed=job.status is not Status.QUEUED,  # frozen already: a resumed run
    )
    return ref.model_dump(mode="json")
