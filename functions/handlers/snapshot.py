"""Snapshot: freeze the chain (a registered server continues on a new empty leaf); the job moves to 25% (SAVING)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import JobEvent
from functions.handlers.runtime import METRICS_NAMESPACE, SERVICE_NAME, services
from functions.imaging.snapshot import freeze

logger = Logger(service=SERVICE_NAME)
tracer = Tracer(service=SERVICE_NAME)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=JobEvent)
def handler(event: JobEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    frozen = freeze(ctx, ctx.state.get_job(event.job.job_id))
    metrics.add_metric(name="VirtualBytes", unit=MetricUnit.Bytes, value=frozen.virtual_size)
    metrics.add_metric(name="ChainDepth", unit=MetricUnit.Count, value=len(frozen.layers))
    logger.info("chain frozen", extra={"job_id": event.job.job_id, "leaf": frozen.leaf, "new_leaf": frozen.new_leaf})
    return frozen.to_json()
