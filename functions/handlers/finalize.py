"""Finalize: the manifest, the image ACTIVE (100%), staging removed, the lock released."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import FinalizeEvent
from functions.handlers.runtime import METRICS_NAMESPACE, SERVICE_NAME, services
from functions.imaging.finalize import finalize_image

logger = Logger(service=SERVICE_NAME)
tracer = Tracer(service=SERVICE_NAME)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=FinalizeEvent)
def handler(event: FinalizeEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    image = finalize_image(ctx, ctx.state.get_job(event.job.job_id))
    timings = image.manifest.get("timings", {})
    metrics.add_metric(name="ImagesCreated", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="JobSeconds", unit=MetricUnit.Seconds, value=sum(timings.get(s, 0.0) for s in timings))
    logger.info("image active", extra={"image_id": image.id, "object_url": image.object_url})
    return {"image_id": image.id, "object_url": image.object_url, "compressed_size": image.compressed_size}
