"""Estimate (size, time) and the chunk plan of a frozen chain, staged for the Map's workers (DESIGN §3).

The plan (reads per chunk, from metadata alone) is staged as one object; the Map's items are only ranges of chunk
indices, so the execution's payload stays small whatever the disk's size.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import vhdcore
from functions.imaging import keys
from functions.imaging.disks import open_disk
from functions.imaging.errors import FlavorTooSlowError
from functions.imaging.jobs import hold_server_lock, set_progress
from functions.imaging.layout import Layout, choose_layout, record_layout
from functions.imaging.prediction import JobTime, compress_ratio, predict_job
from functions.imaging.progress import flavor_class
from functions.imaging.services import ImagingServices
from functions.imaging.snapshot import FrozenChain
from functions.imaging.store_chains import is_store_key
from functions.state import Job
from functions.storage import FileObjectStore
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


@dataclass
class _AheadSlot:
    """The one estimate made ahead of its Estimate step in this process (see estimate_ahead)."""

    done: threading.Event
    fingerprint: tuple[object, ...] | None = None
    estimate: vhdcore.Estimate | None = None


_ahead: _AheadSlot | None = None
_ahead_lock = threading.Lock()


def chain_fingerprint(chain: vhdcore.Chain, level: int, chunk_size: int) -> tuple[object, ...] | None:
    """What an estimate of a chain of local files depends on: each layer's path, UUID, size and modification time,
    and the estimate's parameters (None for a chain that is not all local files)."""
    layers: list[object] = []
    for layer in chain.layers:
        try:
            info = Path(layer.path).stat()
        except OSError:
            return None
        layers.append((layer.path, layer.uuid, info.st_size, info.st_mtime_ns))
    return (tuple(layers), level, chunk_size)


def estimate_ahead(services: ImagingServices, leaf: str) -> None:
    """Start estimating the chain of the local file `leaf` on a thread of its own, for the Estimate step of a job
    about to run in this process: a command starts it before it imports the embedded engine, whose imports keep
    one core busy and leave the other idle (vhdcore releases the GIL). The step uses it only if the chain is still
    the one estimated (see chain_fingerprint); any failure here is left for the step to meet and report."""
    global _ahead
    if is_store_key(leaf):
        return
    config = services.config
    slot = _AheadSlot(threading.Event())

    def run() -> None:
        try:
            chain = vhdcore.open_chain(leaf)
            slot.fingerprint = chain_fingerprint(chain, config.level, config.chunk_size)
            if slot.fingerprint is not None:
                slot.estimate = chain.estimate(level=config.level, chunk_size=config.chunk_size)
        except Exception:
            slot.estimate = None
        finally:
            slot.done.set()

    with _ahead_lock:
        _ahead = slot
    threading.Thread(target=run, name="estimate-ahead", daemon=True).start()


def _estimate(chain: vhdcore.Chain, level: int, chunk_size: int) -> vhdcore.Estimate:
    """The chain's estimate: the one made ahead if it is of this very chain, else made now."""
    global _ahead
    with _ahead_lock:
        slot, _ahead = _ahead, None
    if slot is not None:
        slot.done.wait()
        fingerprint = chain_fingerprint(chain, level, chunk_size)
        if slot.estimate is not None and fingerprint is not None and slot.fingerprint == fingerprint:
            return slot.estimate
    return chain.estimate(level=level, chunk_size=chunk_size)


def plan_image(services: ImagingServices, job: Job, frozen: FrozenChain) -> StagedPlan:
    """Estimate the image, stage its chunk plan, and set the job's ETA; FlavorTooSlowError if it cannot finish."""
    hold_server_lock(services, job)
    config = services.config
    chain = open_disk(services.disk_store, frozen.leaf, frozen.layers)
    estimate = _estimate(chain, config.level, config.chunk_size)
    plan = chain.plan(config.chunk_size)
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
            }
        ).encode(),
    )
    record_layout(services, job.id, layout)
    # In place, one Map item writes the whole image (frames in order, on all cores): offsets follow one another.
    group_bytes = plan.virtual_size if layout is Layout.IN_PLACE else config.group_bytes
    groups = group_chunks([chunk.length for chunk in plan.chunks], max(1, group_bytes))
    set_progress(services, job.id, done=0, total=plan.virtual_size, eta_seconds=predicted)
    return StagedPlan(
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
