"""CompressChunks (a Map item): compress one group of chunks into staged zstd frames."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import CompressEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.compress import compress_group


@state_handler(CompressEvent)
def handler(event: CompressEvent, context: LambdaContext) -> dict[str, Any]:
    ctx = services()
    started = ctx.monotonic()
    job = ctx.state.get_job(event.job.job_id)
    result = compress_group(ctx, job, event.plan, event.group.first, event.group.count)
    seconds = ctx.monotonic() - started
    metrics.add_metric(name="VirtualBytes", unit=MetricUnit.Bytes, value=result.virtual_bytes)
    metrics.add_metric(name="CompressedBytes", unit=MetricUnit.Bytes, value=result.compressed_bytes)
    metrics.add_metric(name="CompressSeconds", unit=MetricUnit.Seconds, value=seconds)
    if result.compressed_bytes:
        ratio = result.virtual_bytes / result.compressed_bytes
        metrics.add_metric(name="CompressionRatio", unit=MetricUnit.NoUnit, value=ratio)
    logger.info(
        "group compressed",
        extra={
            "job_id": job.id,
            "first": event.group.first,
            "count": event.group.count,
            "compressed": result.compressed,
            "reused": result.reused,
        },
    )
    return {"compressed": result.compressed, "reused": result.reused, "compressed_bytes": result.compressed_bytes}
