"""A store wrapper for tests: counts part uploads and can inject failures, delegating everything else."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from functions.storage import ObjectStore, PartInfo


class HookedStore:
    def __init__(self, inner: ObjectStore, before_part: Callable[[int, int], None] | None = None) -> None:
        """`before_part(number, attempt)` runs before each upload_part and may raise to simulate a failure."""
        self.inner = inner
        self.before_part = before_part
        self.part_calls: Counter[int] = Counter()
        self.stored_parts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes, crc32c: int) -> PartInfo:
        with self._lock:
            self.part_calls[number] += 1
            attempt = self.part_calls[number]
        if self.before_part is not None:
            self.before_part(number, attempt)
        info = self.inner.upload_part(key, upload_id, number, data, crc32c)
        with self._lock:
            self.stored_parts[number] += 1
        return info
