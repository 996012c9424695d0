"""Finalize: the manifest, the image ACTIVE (100%), staging removed, the lock released."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import FinalizeEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.finalize import finalize_image


@state_handler(FinalizeEvent)
def handler(event: FinalizeEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    image = finalize_image(ctx, ctx.state.get_job(event.job.job_id))
    timings = image.manifest.get("timings", {})
    metrics.add_metric(name="ImagesCreated", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="JobSeconds", unit=MetricUnit.Seconds, value=sum(timings.get(s, 0.0) for s in timings))
    logger.info("image active", extra={"image_id": image.id, "object_url": image.object_url})
    return {"image_id": image.id, "object_url": image.object_url, "compressed_size": image.compressed_size}
