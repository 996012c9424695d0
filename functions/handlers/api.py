"""API: the HTTP API (functions.api.app) behind API Gateway; the same resolver `imaging serve` runs locally."""

from __future__ import annotations

import functools
import os
from typing import Any

import boto3
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.api.app import ApiDependencies, ImagingApi, build_app
from functions.catalog.launch import step_functions_launcher
from functions.handlers.runtime import logger, services, tracer
from functions.settings import Settings
from functions.state import persistence_layer_for


@functools.cache
def _app() -> ImagingApi:
    """Built on the first request (a module import must not need the deployment's environment)."""
    settings = Settings.resolve()
    machine = os.environ["IMAGING_STATE_MACHINE_ARN"]
    return build_app(
        ApiDependencies(
            services=services(),
            launch=step_functions_launcher(boto3.client("stepfunctions"), machine),
            idempotency=persistence_layer_for(settings.state_url, endpoint_url=settings.endpoint_url),
        )
    )


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return _app().resolve(event, context)
