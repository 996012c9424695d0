"""One bounded slice of coalescing a server's read-only layers (DESIGN §3), within the job's deadline.

vhdcore's `coalesce_step` does the journaled merging (a killed slice is finished or rolled back by the next); each
slice is bounded by the invocation's remaining time and, if configured, by a byte budget. An unregistered disk
(`--disk`) is imaged read-only, so it is never coalesced. A chain kept in object storage is merged by writing new
objects (store_coalesce), one merge per slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import vhdcore
from functions.imaging.chain_files import disk_files_in
from functions.imaging.disks import open_disk
from functions.imaging.errors import CoalesceInterruptedError, CoalesceTimeout, vhd_errors
from functions.imaging.jobs import hold_server_lock
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import is_store_key
from functions.imaging.store_coalesce import merge_step
from functions.state import Job
from functions.storage import FileObjectStore

SAFETY_MARGIN_S = 5.0
"""Time kept back from a slice's budget to record the result before the invocation's own limit."""
MIN_SLICE_S = 1.0


@dataclass(frozen=True)
class CoalesceSlice:
    done: bool
    bytes_copied: int
    merged: int
    depth: int | None


def sibling_candidates(services: ImagingServices, leaf: str) -> list[str]:
    """Files that may be other children of the chain's layers, which a merge must never strand: everything beside
    each layer of the chain (beside the leaf only while a merge is pending) and every server disk under the store's
    `sr/` (other servers' leaves, which may share a golden base)."""
    try:
        folders = {Path(layer.path).parent for layer in open_disk(services.disk_store, leaf).layers}
    except CoalesceInterruptedError:
        folders = {Path(leaf).absolute().parent}
    found = {str(path.absolute()) for folder in folders for path in disk_files_in(folder)}
    if isinstance(services.store, FileObjectStore):
        found.update(str(path) for path in services.local_path("sr").rglob("*.vhd") if path.is_file())
    return sorted(found)


def coalesce_slice(services: ImagingServices, job: Job, deadline: datetime, remaining_s: float) -> CoalesceSlice:
    """Run one slice of at most `remaining_s` (less a margin); CoalesceTimeout once `deadline` has passed."""
    hold_server_lock(services, job)
    if job.server_id is None:
        return CoalesceSlice(done=True, bytes_copied=0, merged=0, depth=None)
    now = services.now()
    if now >= deadline:
        raise CoalesceTimeout(f"the chain of server {job.server_id} was not coalesced by {deadline.isoformat()}")
    budget_s = max(MIN_SLICE_S, min(remaining_s - SAFETY_MARGIN_S, (deadline - now).total_seconds()))
    leaf = services.state.get_server(job.server_id).disk
    if is_store_key(leaf):
        merge = merge_step(services, job.server_id, budget_s)
        return CoalesceSlice(
            done=merge.finished, bytes_copied=merge.bytes_copied, merged=int(merge.merged), depth=merge.depth
        )
    with vhd_errors():
        step = vhdcore.coalesce_step(
            leaf,
            sibling_candidates(services, leaf),
            budget_bytes=services.config.coalesce_slice_bytes,
            budget_seconds=budget_s,
        )
    return CoalesceSlice(done=step.done, bytes_copied=step.bytes_copied, merged=len(step.merges), depth=step.depth)
