"""Failed: the job ERROR with a reason code and an operator hint, the upload aborted, staging removed, the lock
released if this job holds it. Returns `{"error": CODE, "cause": HINT}` for the execution's Fail state."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.handlers.events import FailedEvent
from functions.handlers.runtime import logger, metrics, services, state_handler
from functions.imaging.failure import fail_execution


@state_handler(FailedEvent)
def handler(event: FailedEvent, context: LambdaContext) -> dict[str, Any]:
    state = event.request
    job_id = state.failed_job_id
    error = state.failure.Error
    failure = fail_execution(services(), job_id, error, state.failure.Cause)
    metrics.add_metric(name="ImagesFailed", unit=MetricUnit.Count, value=1)
    logger.warning("job failed", extra={"job_id": job_id, "error": error, "code": failure.code})
    return {"error": failure.code, "cause": failure.hint}
