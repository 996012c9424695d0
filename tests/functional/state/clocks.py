"""A clock that tests move forward instead of sleeping (the state layer's injected clock)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class ManualClock:
    """A clock that only moves when a test moves it (thread-safe)."""

    def __init__(self, start: datetime = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)) -> None:
        self._now = start
        self._guard = threading.Lock()

    def __call__(self) -> datetime:
        with self._guard:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._guard:
            self._now += timedelta(seconds=seconds)
