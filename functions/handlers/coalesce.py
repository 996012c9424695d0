"""Coalesce: one bounded slice of merging the chain's read-only layers, within the invocation's remaining time;
CoalesceTimeout past the job's deadline."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import JobEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.coalesce import coalesce_slice


@state_handler(JobEvent)
def handler(event: JobEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    job = ctx.state.get_job(event.job.job_id)
    remaining_s = context.get_remaining_time_in_millis() / 1000
    result = coalesce_slice(ctx, job, event.job.coalesce_deadline, remaining_s)
    metrics.add_metric(name="CoalescedBytes", unit=MetricUnit.Bytes, value=result.bytes_copied)
    logger.info("coalesce slice", extra={"job_id": job.id, "done": result.done, "bytes": result.bytes_copied})
    return {"done": result.done, "bytes_copied": result.bytes_copied, "merged": result.merged, "depth": result.depth}
