"""Coalesce: one bounded slice of merging the chain's read-only layers, within the invocation's remaining time;
CoalesceTimeout past the job's deadline."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import JobEvent
from functions.handlers.runtime import METRICS_NAMESPACE, SERVICE_NAME, services
from functions.imaging.coalesce import coalesce_slice

logger = Logger(service=SERVICE_NAME)
tracer = Tracer(service=SERVICE_NAME)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=JobEvent)
def handler(event: JobEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    job = ctx.state.get_job(event.job.job_id)
    remaining_s = context.get_remaining_time_in_millis() / 1000
    result = coalesce_slice(ctx, job, event.job.coalesce_deadline, remaining_s)
    metrics.add_metric(name="CoalescedBytes", unit=MetricUnit.Bytes, value=result.bytes_copied)
    logger.info("coalesce slice", extra={"job_id": job.id, "done": result.done, "bytes": result.bytes_copied})
    return {"done": result.done, "bytes_copied": result.bytes_copied, "depth": result.depth}
