"""Schedule: the EventBridge timer. Starts each due scheduled image once per window (duplicates and late
deliveries included) on Step Functions; retention runs when a scheduled image becomes ACTIVE (Finalize)."""

from __future__ import annotations

import functools
import os
from typing import Any

import boto3
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.catalog.launch import step_functions_launcher
from functions.catalog.requests import Launcher
from functions.catalog.schedules import start_due_images
from functions.handlers.runtime import logger, metrics, services, tracer


@functools.cache
def _launcher() -> Launcher:
    return step_functions_launcher(boto3.client("stepfunctions"), os.environ["IMAGING_STATE_MACHINE_ARN"])


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    outcome = start_due_images(services(), _launcher())
    metrics.add_metric(name="ScheduledImagesStarted", unit=MetricUnit.Count, value=len(outcome.started))
    metrics.add_metric(name="ScheduledImagesFailedToStart", unit=MetricUnit.Count, value=len(outcome.failed))
    for due, reason in outcome.failed:
        logger.warning("scheduled image not started", extra={"server_id": due.server_id, "reason": reason})
    return {
        "started": [due.image_id for due in outcome.started],
        "failed": [{"server_id": due.server_id, "reason": reason} for due, reason in outcome.failed],
    }
