"""Estimate: predicted size and time of the image, the chunk plan staged for the Map, the job's first ETA."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import EstimateEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.planning import plan_image
from functions.imaging.snapshot import FrozenChain


@state_handler(EstimateEvent)
def handler(event: EstimateEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    staged = plan_image(ctx, ctx.state.get_job(event.job.job_id), FrozenChain(**event.snapshot))
    metrics.add_metric(name="EstimatedCompressedBytes", unit=MetricUnit.Bytes, value=staged.estimated_compressed_bytes)
    metrics.add_metric(name="PredictedSeconds", unit=MetricUnit.Seconds, value=staged.predicted_seconds)
    logger.info(
        "plan staged", extra={"job_id": event.job.job_id, "chunks": staged.chunks, "groups": len(staged.groups)}
    )
    return staged.to_json()
