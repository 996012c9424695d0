"""Prepare: validate the request, take the server's lock, record the job at 0% (QUEUED)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import JobRef, PrepareEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.jobs import ImagingRequest, prepare_job


@state_handler(PrepareEvent)
def handler(event: PrepareEvent, context: LambdaContext) -> dict[str, Any]:
    prepared = prepare_job(services(), ImagingRequest(**event.request.model_dump()))
    job = prepared.job
    metrics.add_metric(name="JobsStarted", unit=MetricUnit.Count, value=1)
    logger.info("job queued", extra={"job_id": job.id, "server_id": job.server_id, "disk": job.disk})
    ref = JobRef(
        job_id=job.id,
        image_id=job.image_id,
        server_id=job.server_id,
        coalesce_deadline=prepared.coalesce_deadline,
        resumed=prepared.resumed,
    )
    return ref.model_dump(mode="json")
