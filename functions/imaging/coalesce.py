"""One bounded slice of coalescing a server's read-only layers (DESIGN §3), within the job's deadline.

vhdcore's `coalesce_step` does the journaled merging (a killed slice is finished or rolled back by the next); each
slice is bounded by the invocation's remaining time and, if configured, by a byte budget. An unregistered disk
(`--disk`) is imaged read-only, so it is never coalesced.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import vhdcore
from functions.imaging.errors import CoalesceTimeout, DiskCorruptError, DiskMissingError
from functions.imaging.services import ImagingServices
from functions.state import Job

SAFETY_MARGIN_S = 5.0
"""Time kept back from a slice's budget to record the result before the invocation's own limit."""
MIN_SLICE_S = 1.0


@dataclass(frozen=True)
class CoalesceSlice:
    done: bool
    bytes_copied: int
    merged: int
    depth: int | None


def coalesce_slice(services: ImagingServices, job: Job, deadline: datetime, remaining_s: float) -> CoalesceSlice:
    """Run one slice of at most `remaining_s` (less a margin); CoalesceTimeout once `deadline` has passed."""
    if job.server_id is None:
        return CoalesceSlice(done=True, bytes_copied=0, merged=0, depth=None)
    now = services.now()
    if now >= deadline:
        raise CoalesceTimeout(f"the chain of server {job.server_id} was not coalesced by {deadline.isoformat()}")
    budget_s = max(MIN_SLICE_S, min(remaining_s - SAFETY_MARGIN_S, (deadline - now).total_seconds()))
    leaf = services.state.get_server(job.server_id).disk
    try:
        step = vhdcore.coalesce_step(leaf, budget_bytes=services.config.coalesce_slice_bytes, budget_seconds=budget_s)
    except vhdcore.MissingParentError as error:
        raise DiskMissingError(str(error)) from error
    except vhdcore.VhdError as error:
        raise DiskCorruptError(str(error)) from error
    return CoalesceSlice(done=step.done, bytes_copied=step.bytes_copied, merged=len(step.merges), depth=step.depth)
