"""Where the embedded default keeps its data, and the store/state URLs chosen by the user (DESIGN §4, §6).

Precedence: an explicit argument (the CLI's `--store`, `--state`, `--endpoint-url`), then the environment
(`IMAGING_STORE`, `IMAGING_STATE`, `IMAGING_DATA_DIR`, `AWS_ENDPOINT_URL`), then the defaults under the data
directory (`file://<data>/store`, `sqlite:///<data>/state.sqlite3`). Server disks that live in object storage are
keys of `IMAGING_DISKS` when set (on AWS, a bucket of its own), else of the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

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
