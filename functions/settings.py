"""Settings and tunables from one place: where the embedded default keeps its data, the store/state URLs chosen by
the user (DESIGN §4, §6), and the imaging tunables operators may set in the environment.

Precedence: an explicit argument (the CLI's `--store`, `--state`, `--endpoint-url`), then the environment
(`IMAGING_STORE`, `IMAGING_STATE`, `IMAGING_DATA_DIR`, `AWS_ENDPOINT_URL`), then the defaults under the data
directory (`file://<data>/store`, `sqlite:///<data>/state.sqlite3`). Server disks that live in object storage are
keys of `IMAGING_DISKS` when set (on AWS, a bucket of its own), else of the store.

Tunables (`config_from_environment`): `IMAGING_CHUNK_SIZE`, `IMAGING_GROUP_BYTES`, `IMAGING_PART_SIZE`,
`IMAGING_MAP_CONCURRENCY`, `IMAGING_COALESCE_DEADLINE_S`, `IMAGING_COALESCE_SLICE_BYTES` override the defaults of
`ImagingConfig`.

This module stays light (no boto3, Powertools or the imaging domain at import): the CLI reads it at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs

if TYPE_CHECKING:
    from functions.imaging.services import ImagingConfig

APP_NAME = "cloud-imaging"


def data_dir() -> Path:
    """The project's data directory: `IMAGING_DATA_DIR`, else the platform's user data dir (XDG on Linux)."""
    configured = os.environ.get("IMAGING_DATA_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_store_url() -> str:
    return (data_dir() / "store").as_uri()


def default_state_url() -> str:
    return f"sqlite:///{data_dir() / 'state.sqlite3'}"


@dataclass(frozen=True)
class Settings:
    """The resolved locations of one run."""

    store_url: str
    state_url: str
    endpoint_url: str | None
    disks_url: str | None = None
    """Where server disks kept as objects live; None: in the store."""

    @classmethod
    def resolve(cls, store: str | None = None, state: str | None = None, endpoint_url: str | None = None) -> Settings:
        return cls(
            store_url=store or os.environ.get("IMAGING_STORE") or default_store_url(),
            state_url=state or os.environ.get("IMAGING_STATE") or default_state_url(),
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            disks_url=os.environ.get("IMAGING_DISKS") or None,
        )


TUNABLES: tuple[tuple[str, str, type[int] | type[float] | type[str]], ...] = (
    ("IMAGING_CHUNK_SIZE", "chunk_size", int),
    ("IMAGING_GROUP_BYTES", "group_bytes", int),
    ("IMAGING_PART_SIZE", "part_size", int),
    ("IMAGING_MAP_CONCURRENCY", "map_concurrency", int),
    ("IMAGING_COALESCE_DEADLINE_S", "coalesce_deadline_s", float),
    ("IMAGING_COALESCE_SLICE_BYTES", "coalesce_slice_bytes", int),
    ("IMAGING_OBJECT_LAYOUT", "object_layout", str),
)
"""The environment variables operators may set, the `ImagingConfig` field each one sets, and its type."""


def config_from_environment() -> ImagingConfig:
    """`ImagingConfig` with the tunables set in the environment (a malformed number is a ValueError naming it)."""
    from functions.imaging.services import ImagingConfig  # the imaging domain only when a config is asked for

    overrides: dict[str, Any] = {}
    for variable, field, kind in TUNABLES:
        text = os.environ.get(variable)
        if text:
            try:
                overrides[field] = kind(text)
            except ValueError:
                raise ValueError(f"{variable}={text!r} is not a number") from None
    return replace(ImagingConfig(), **overrides)
