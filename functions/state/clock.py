"""Where the state layer gets the time: injected, so tests move it forward instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""


def system_clock() -> datetime:
    return datetime.now(UTC)


def epoch_seconds(moment: datetime) -> float:
    return moment.timestamp()
