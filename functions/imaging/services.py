"""What the imaging domain is handed: the object store, the state store, clocks and tunables (injected, never built
here, so tests and both engines choose them)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import vhdcore
from functions.imaging.errors import InvalidRequestError
from functions.state import StateStore
from functions.state.clock import system_clock
from functions.storage import FileObjectStore, ObjectStore
from functions.storage.parts import DEFAULT_PART_SIZE
from functions.storage.retry import RetryPolicy

DEFAULT_CHUNK_SIZE = 64 * 1024**2
"""One zstd frame per 64 MiB of virtual disk: big enough to compress well, small enough for a Lambda's memory."""
DEFAULT_GROUP_BYTES = 2 * 1024**3
"""Virtual bytes per Map item: keeps the item list small (a 2 TiB disk is 1,024 items) and each item short."""


@dataclass(frozen=True)
class ImagingConfig:
    level: int = vhdcore.DEFAULT_LEVEL
    chunk_size: int = DEFAULT_CHUNK_SIZE
    group_bytes: int = DEFAULT_GROUP_BYTES
    part_size: int = DEFAULT_PART_SIZE
    map_concurrency: int = 2
    compress_threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """Chunks a Map item compresses at once (vhdcore releases the GIL; memory: about 2 chunks per thread)."""
    lock_ttl_s: float = 6 * 3600.0
    coalesce_deadline_s: float = 1800.0
    coalesce_slice_bytes: int | None = None
    """Bytes one Coalesce invocation may copy (None: bounded by its remaining time only)."""
    object_layout: str = "auto"
    """Where compressed frames go (functions.imaging.layout): "auto" (in place in the image file on a file store
    with a local chain, else staged), "staged" (staged objects and a multipart upload, as on S3), or "in_place"."""
    max_job_s: float = 12 * 3600.0
    """A job predicted to run longer than this (at its flavor's bandwidth) fails with FLAVOR_TOO_SLOW."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class ImagingServices:
    store: ObjectStore
    state: StateStore
    disks: ObjectStore | None = None
    """The store of server disks kept as objects (`sr/<server>/...`), when not the store itself."""
    config: ImagingConfig = field(default_factory=ImagingConfig)
    now: Callable[[], datetime] = system_clock
    monotonic: Callable[[], float] = time.monotonic

    @property
    def disk_store(self) -> ObjectStore:
        """Where a server disk given as a key lives."""
        return self.disks if self.disks is not None else self.store

    def local_path(self, key: str) -> Path:
        """The file behind a store key; server disks must be files that vhdcore can open."""
        if not isinstance(self.store, FileObjectStore):
            raise InvalidRequestError(f"server disks need a file store, not {self.store.url}")
        return self.store.root / key
