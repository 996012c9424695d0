"""One bounded slice of coalescing a server's read-only layers (DESIGN §3), within the job's deadline.

An unregistered disk (`--disk`) is imaged read-only, so it is never coalesced. vhdcore's `coalesce_step` does the
journaled merging; a build without it fails the job with COALESCE_UNAVAILABLE rather than skipping the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import vhdcore
from functions.imaging.errors import CoalesceTimeout, CoalesceUnavailableError, DiskCorruptError
from functions.imaging.services import ImagingServices
from functions.state import Job

SAFETY_MARGIN_S = 5.0
"""Time kept back from a slice's budget to record the result before the invocation's own limit."""


@dataclass(frozen=True)
class CoalesceSlice:
    done: bool
    bytes_copied: int
    depth: int | None


def coalesce_slice(services: ImagingServices, job: Job, deadline: datetime, remaining_s: float) -> CoalesceSlice:
    """Run one slice of at most `remaining_s` (less a margin); CoalesceTimeout once `deadline` has passed."""
    if job.server_id is None:
        return CoalesceSlice(done=True, bytes_copied=0, depth=None)
    now = services.now()
    if now >= deadline:
        raise CoalesceTimeout(f"the chain of server {job.server_id} was not coalesced by {deadline.isoformat()}")
    step: Any = getattr(vhdcore, "coalesce_step", None)
    if step is None:
        raise CoalesceUnavailableError("vhdcore.coalesce_step is not in this build of vhdcore")
    budget = max(1.0, min(remaining_s - SAFETY_MARGIN_S, (deadline - now).total_seconds()))
    leaf = services.state.get_server(job.server_id).disk
    try:
        report = step(leaf, budget_seconds=budget)
    except vhdcore.VhdError as error:
        raise DiskCorruptError(str(error)) from error
    return CoalesceSlice(done=bool(report.done), bytes_copied=int(report.bytes_copied), depth=int(report.depth))
