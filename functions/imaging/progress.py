"""ETAs: before work starts, from the estimate and the flavor's bandwidth; while chunks complete, from the measured
throughput of the step so far."""

from __future__ import annotations

from datetime import datetime

from functions.state import Job, Status
from functions.storage.bandwidth import FLAVOR_CLASS_BANDWIDTH

DEFAULT_FLAVOR_CLASS = "standard"


def flavor_class(flavor: str | None) -> str:
    """The bandwidth class of a server flavor: the flavor's own name when it is a class, else the default."""
    return flavor if flavor in FLAVOR_CLASS_BANDWIDTH else DEFAULT_FLAVOR_CLASS


def upload_seconds(compressed_bytes: int, flavor: str | None) -> float:
    """Time to send `compressed_bytes` at the flavor class's bandwidth (0 when the class is unlimited)."""
    rate = FLAVOR_CLASS_BANDWIDTH[flavor_class(flavor)]
    return 0.0 if rate is None else compressed_bytes / rate


def step_started(job: Job, status: Status) -> datetime | None:
    """When the job last entered `status`."""
    return next((event.at for event in reversed(job.history) if event.status is status), None)


def measured_eta(done: int, total: int, elapsed_s: float, fallback_s: float | None) -> float | None:
    """Remaining seconds of a step at the rate measured so far; `fallback_s` until something was measured."""
    if done <= 0 or elapsed_s <= 0:
        return fallback_s
    return max(0.0, (total - done) * elapsed_s / done)
