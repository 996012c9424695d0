"""Estimate (size, time) and the chunk plan of a frozen chain, staged for the Map's workers (DESIGN §3).

The plan (reads per chunk, from metadata alone) is staged as one object; the Map's items are only ranges of chunk
indices, so the execution's payload stays small whatever the disk's size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import vhdcore
from functions.imaging import head_start, keys
from functions.imaging.disks import open_disk
from functions.imaging.errors import FlavorTooSlowError
from functions.imaging.jobs import hold_server_lock, set_progress
from functions.imaging.layout import Layout, choose_layout, record_layout
from functions.imaging.prediction import JobTime, compress_ratio, predict_job
from functions.imaging.progress import flavor_class
from functions.imaging.services import ImagingServices
from functions.imaging.snapshot import FrozenChain
from functions.state import Job
from functions.storage import FileObjectStore, ObjectNotFoundError
from functions.storage.bandwidth import FLAVOR_CLASS_BANDWIDTH


@dataclass(frozen=True)
class ChunkGroup:
    """One Map item: chunks first .. first + count - 1."""

    first: int
    count: int


@dataclass(frozen=True)
class StagedPlan:
    plan_key: str
    groups: list[ChunkGroup]
    concurrency: int
    chunks: int
    virtual_size: int
    estimated_compressed_bytes: int
    estimated_low: int
    estimated_high: int
    predicted_seconds: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def estimate_key(job_id: str) -> str:
    return f"{keys.staging_prefix(job_id)}estimate.json"


def staged_plan_key(job_id: str) -> str:
    """The Estimate step's result, written last: a resumed (or retried) job finds its plan there and keeps it."""
    return f"{keys.staging_prefix(job_id)}staged-plan.json"


def load_staged_plan(services: ImagingServices, job_id: str) -> StagedPlan | None:
    try:
        raw = json.loads(services.store.get(staged_plan_key(job_id)))
    except ObjectNotFoundError:
        return None
    raw["groups"] = [ChunkGroup(**group) for group in raw["groups"]]
    return StagedPlan(**raw)


def group_chunks(lengths: list[int], group_bytes: int) -> list[ChunkGroup]:
    """Consecutive chunks, at most `group_bytes` of virtual disk per group (at least one chunk each)."""
    groups: list[ChunkGroup] = []
    first = size = 0
    for index, length in enumerate(lengths):
        if index > first and size + length > group_bytes:
            groups.append(ChunkGroup(first, index - first))
            first, size = index, 0
        size += length
    if lengths:
        groups.append(ChunkGroup(first, len(lengths) - first))
    return groups


def predict_job_of(
    services: ImagingServices, estimate: vhdcore.Estimate, layout: Layout, flavor: str | None, *, fixed_s: float
) -> JobTime:
    """The job's time from its estimate, with the store's write rate and the flavor's upload bandwidth."""
    store = services.store
    return predict_job(
        estimate,
        in_place=layout is Layout.IN_PLACE,
        write_rate=store.write_rate() if isinstance(store, FileObjectStore) else None,
        upload_rate=FLAVOR_CLASS_BANDWIDTH[flavor_class(flavor)],
        fixed_s=fixed_s,
        compress_ratio=compress_ratio(store),
    )


def _estimate(chain: vhdcore.Chain, level: int, chunk_size: int, usage: vhdcore.DiskUsage | None) -> vhdcore.Estimate:
    """The chain's estimate (of the live data only with `usage`): the head start's if it is of this very chain and
    mode (functions.imaging.head_start), else made now."""
    ahead = head_start.estimate_for(chain, level, chunk_size, all_blocks=usage is None)
    return ahead if ahead is not None else chain.estimate(level=level, chunk_size=chunk_size, usage=usage)


def live_data(usage: vhdcore.DiskUsage | None) -> dict[str, object]:
    """What the manifest records of filesystem-aware imaging (DESIGN §5): the mode and, per partition, its table
    entry, filesystem, size, used and dropped bytes and any reason it was kept whole."""
    if usage is None:
        return {"mode": "all_blocks", "dropped_bytes": 0, "partitions": [], "warnings": []}
    return {
        "mode": "live",
        "dropped_bytes": usage.free_bytes,
        "table": usage.table,
        "partitions": [
            {
                "index": p.index,
                "start": p.start,
                "size": p.length,
                "type": p.type_id,
                "filesystem": p.filesystem,
                "decision": p.decision,
                "reason": p.reason,
                "used_bytes": p.used_bytes,
                "dropped_bytes": p.free_bytes,
            }
            for p in usage.partitions
        ],
        "warnings": list(usage.warnings),
    }


def plan_image(services: ImagingServices, job: Job, frozen: FrozenChain) -> StagedPlan:
    """Estimate the image, stage its chunk plan, and set the job's ETA; FlavorTooSlowError if it cannot finish.
    A job planned already (resumed or retried) keeps its plan: the frames it stored were cut by it."""
    hold_server_lock(services, job)
    planned = load_staged_plan(services, job.id)
    if planned is not None:
        return planned
    config = services.config
    chain = open_disk(services.disk_store, frozen.leaf, frozen.layers)
    # Live data only unless the request or the server asked for every block: the ranges the disk's filesystems
    # prove free are stored as zeros and never read (DESIGN §5, §7b).
    usage = None if job.all_blocks else chain.usage()
    estimate = _estimate(chain, config.level, config.chunk_size, usage)
    plan = head_start.plan_for(job.id, chain, config.level, config.chunk_size, all_blocks=usage is None) or chain.plan(
        config.chunk_size, usage=usage
    )
    flavor = services.state.get_server(job.server_id).flavor if job.server_id is not None else None
    layout = choose_layout(services, frozen.leaf)
    timing = predict_job_of(services, estimate, layout, flavor, fixed_s=0.0)
    predicted = timing.after_estimate
    if predicted > config.max_job_s:
        raise FlavorTooSlowError(
            f"imaging would take about {predicted:.0f} s on a {flavor_class(flavor)} host, "
            f"more than the {config.max_job_s:.0f} s a job may run"
        )
    key = keys.plan_key(job.id)
    services.store.put(key, plan.to_json().encode())
    services.store.put(
        estimate_key(job.id),
        json.dumps(
            {
                "virtual_size": estimate.virtual_size,
                "allocated_bytes": estimate.allocated_bytes,
                "unallocated_bytes": estimate.unallocated_bytes,
                "estimated_nonzero_bytes": estimate.estimated_nonzero_bytes,
                "compressed_bytes": estimate.compressed_bytes,
                "low": estimate.low,
                "high": estimate.high,
                "predicted_seconds": predicted,
                "predicted": timing.to_json(),
                "estimate_compress_seconds": estimate.predicted_seconds,
                "flavor_class": flavor_class(flavor),
                "live_data": live_data(usage),
            }
        ).encode(),
    )
    record_layout(services, job.id, layout)
    # In place, one Map item writes the whole image (frames in order, on all cores): offsets follow one another.
    group_bytes = plan.virtual_size if layout is Layout.IN_PLACE else config.group_bytes
    groups = group_chunks([chunk.length for chunk in plan.chunks], max(1, group_bytes))
    set_progress(services, job.id, done=0, total=plan.virtual_size, eta_seconds=predicted)
    staged = StagedPlan(
        plan_key=key,
        groups=groups,
        concurrency=config.map_concurrency,
        chunks=len(plan),
        virtual_size=plan.virtual_size,
        estimated_compressed_bytes=estimate.compressed_bytes,
        estimated_low=estimate.low,
        estimated_high=estimate.high,
        predicted_seconds=predicted,
    )
    services.store.put(staged_plan_key(job.id), json.dumps(staged.to_json()).encode())
    return staged
