"""Snapshot: freeze the chain (a registered server continues on a new empty leaf); the job moves to 25% (SAVING)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import JobEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.snapshot import freeze


@state_handler(JobEvent)
def handler(event: JobEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    frozen = freeze(ctx, ctx.state.get_job(event.job.job_id))
    metrics.add_metric(name="VirtualBytes", unit=MetricUnit.Bytes, value=frozen.virtual_size)
    metrics.add_metric(name="ChainDepth", unit=MetricUnit.Count, value=len(frozen.layers))
    logger.info("chain frozen", extra={"job_id": event.job.job_id, "leaf": frozen.leaf, "new_leaf": frozen.new_leaf})
    return frozen.to_json()
