"""The services a handler uses, built once per process from the environment (functions.settings), and the
tunables operators may set (`IMAGING_CHUNK_SIZE`, `IMAGING_GROUP_BYTES`, `IMAGING_PART_SIZE`,
`IMAGING_COALESCE_DEADLINE_S`, `IMAGING_MAP_CONCURRENCY`)."""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import Any

from functions.imaging.services import ImagingConfig, ImagingServices
from functions.settings import Settings
from functions.state import open_state_store
from functions.storage import open_object_store

SERVICE_NAME = "imaging"
METRICS_NAMESPACE = "CloudImaging"


def config_from_environment() -> ImagingConfig:
    config = ImagingConfig()
    overrides: dict[str, Any] = {}
    for variable, field, kind in (
        ("IMAGING_CHUNK_SIZE", "chunk_size", int),
        ("IMAGING_GROUP_BYTES", "group_bytes", int),
        ("IMAGING_PART_SIZE", "part_size", int),
        ("IMAGING_MAP_CONCURRENCY", "map_concurrency", int),
        ("IMAGING_COALESCE_DEADLINE_S", "coalesce_deadline_s", float),
    ):
        text = os.environ.get(variable)
        if text:
            try:
                overrides[field] = kind(text)
            except ValueError:
                raise ValueError(f"{variable}={text!r} is not a number") from None
    return replace(config, **overrides)


@functools.cache
def _services_for(store_url: str, state_url: str, endpoint_url: str | None, config: ImagingConfig) -> ImagingServices:
    return ImagingServices(
        store=open_object_store(store_url, endpoint_url=endpoint_url),
        state=open_state_store(state_url, endpoint_url=endpoint_url),
        config=config,
    )


def services() -> ImagingServices:
    """The store, state and tunables named by the environment (cached: a warm Lambda reuses its clients)."""
    settings = Settings.resolve()
    return _services_for(settings.store_url, settings.state_url, settings.endpoint_url, config_from_environment())
