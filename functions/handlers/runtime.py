"""The services a handler uses, built once per process from the environment (functions.settings), and the
tunables operators may set (`IMAGING_CHUNK_SIZE`, `IMAGING_GROUP_BYTES`, `IMAGING_PART_SIZE`,
`IMAGING_COALESCE_DEADLINE_S`, `IMAGING_COALESCE_SLICE_BYTES`, `IMAGING_MAP_CONCURRENCY`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel

from functions.imaging.services import ImagingConfig, ImagingServices
from functions.settings import Settings
from functions.state import open_state_store
from functions.storage import open_object_store

SERVICE_NAME = "imaging"
METRICS_NAMESPACE = "CloudImaging"

# Module-level, as Powertools wants them: one logger, tracer and metrics set for every handler of the service.
logger = Logger(service=SERVICE_NAME)
tracer = Tracer(service=SERVICE_NAME)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)

EventT = TypeVar("EventT", bound=BaseModel)


def state_handler(
    model: type[EventT],
) -> Callable[[Callable[[EventT, LambdaContext], dict[str, Any]]], Callable[[Any, LambdaContext], dict[str, Any]]]:
    """What every state's handler wears: the Lambda context in its logs, a trace, its metrics flushed, and its event
    parsed into `model` (a malformed event fails the state before any work)."""

    def wrap(
        function: Callable[[EventT, LambdaContext], dict[str, Any]],
    ) -> Callable[[Any, LambdaContext], dict[str, Any]]:
        parsed = event_parser(model=model)(function)
        wrapped: Callable[[Any, LambdaContext], dict[str, Any]] = logger.inject_lambda_context(
            tracer.capture_lambda_handler(metrics.log_metrics(parsed))
        )
        return wrapped

    return wrap


def config_from_environment() -> ImagingConfig:
    config = ImagingConfig()
    overrides: dict[str, Any] = {}
    for variable, field, kind in (
        ("IMAGING_CHUNK_SIZE", "chunk_size", int),
        ("IMAGING_GROUP_BYTES", "group_bytes", int),
        ("IMAGING_PART_SIZE", "part_size", int),
        ("IMAGING_MAP_CONCURRENCY", "map_concurrency", int),
        ("IMAGING_COALESCE_DEADLINE_S", "coalesce_deadline_s", float),
        ("IMAGING_COALESCE_SLICE_BYTES", "coalesce_slice_bytes", int),
    ):
        text = os.environ.get(variable)
        if text:
            try:
                overrides[field] = kind(text)
            except ValueError:
                raise ValueError(f"{variable}={text!r} is not a number") from None
    return replace(config, **overrides)


@functools.cache
def _services_for(
    store_url: str, state_url: str, endpoint_url: str | None, config: ImagingConfig, disks_url: str | None = None
) -> ImagingServices:
    return ImagingServices(
        store=open_object_store(store_url, endpoint_url=endpoint_url),
        state=open_state_store(state_url, endpoint_url=endpoint_url),
        config=config,
        disks=open_object_store(disks_url, endpoint_url=endpoint_url) if disks_url else None,
    )


def services() -> ImagingServices:
    """The store, state and tunables named by the environment (cached: a warm Lambda reuses its clients)."""
    settings = Settings.resolve()
    return _services_for(
        settings.store_url, settings.state_url, settings.endpoint_url, config_from_environment(), settings.disks_url
    )
