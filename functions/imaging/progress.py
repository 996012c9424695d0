"""ETAs: before work starts, from the estimate and the flavor's bandwidth; while chunks complete, from the measured
throughput of the step so far."""

from __future__ import annotations

from datetime import datetime

from functions.state import Job, Status
from functions.storage.bandwidth import DEFAULT_FLAVOR_CLASS, FLAVOR_CLASS_BANDWIDTH


def flavor_class(flavor: str | None) -> str:
    """The bandwidth class of a server flavor: the flavor's own name when it is a class, else the default."""
    return flavor if flavor in FLAVOR_CLASS_BANDWIDTH else DEFAULT_FLAVOR_CLASS


def step_started(job: Job, status: Status) -> datetime | None:
    """When the job last entered `status`."""
    return next((event.at for event in reversed(job.history) if event.status is status), None)


def measured_eta(done: int, total: int, elapsed_s: float, fallback_s: float | None) -> float | None:
    """Remaining seconds of a step at the rate measured so far; `fallback_s` until something was measured."""
    if done <= 0 or elapsed_s <= 0:
        return fallback_s
    return max(0.0, (total - done) * elapsed_s / done)
