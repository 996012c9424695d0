"""Upload: job at 50% (UPLOADING); the staged frames become the image object (multipart), completed and verified."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import UploadEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.upload import upload_image


@state_handler(UploadEvent)
def handler(event: UploadEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    job = ctx.state.get_job(event.job.job_id)
    uploaded = upload_image(ctx, job, event.plan.plan_key)
    metrics.add_metric(name="ImageBytes", unit=MetricUnit.Bytes, value=uploaded.size)
    metrics.add_metric(name="UploadSeconds", unit=MetricUnit.Seconds, value=uploaded.seconds)
    if uploaded.size:
        ratio = event.plan.virtual_size / uploaded.size
        metrics.add_metric(name="CompressionRatio", unit=MetricUnit.NoUnit, value=ratio)
    logger.info("image uploaded", extra={"job_id": job.id, "key": uploaded.key, "parts": len(uploaded.parts)})
    return {"key": uploaded.key, "size": uploaded.size, "parts": len(uploaded.parts), "copied": uploaded.parts_copied}
