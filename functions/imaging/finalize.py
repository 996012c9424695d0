"""Finalize (100%): the manifest of DESIGN §5 beside the image, the image record ACTIVE, staging removed, the
server's lock released."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import vhdcore
from functions.imaging import keys
from functions.imaging.content import METHOD, content_tree_sha256
from functions.imaging.disks import open_disk
from functions.imaging.errors import ImageVerificationError
from functions.imaging.jobs import advance_job, release_server_lock
from functions.imaging.layout import Layout
from functions.imaging.planning import estimate_key, live_data
from functions.imaging.retention import keep_scheduled_images
from functions.imaging.services import ImagingServices
from functions.imaging.snapshot import FrozenChain, snapshot_key
from functions.imaging.upload import ObjectFrame, load_upload
from functions.state import Image, ImageOrigin, Job, Status

MANIFEST_VERSION = 1
BULKY_FIELDS = frozenset({"parts", "frames"})
"""Kept in the manifest object only: the image record must stay small (a DynamoDB item is at most 400 KB)."""


def _content_hash(frames: list[ObjectFrame]) -> str:
    digests = []
    for frame in frames:
        if frame.index is None:
            continue  # the head: no disk content
        if frame.content_sha256 is None:
            raise ImageVerificationError(f"chunk {frame.index} was staged without a content digest")
        digests.append(frame.content_sha256)
    return content_tree_sha256(digests)


def step_timings(job: Job) -> dict[str, float]:
    """Seconds spent in each status, from the job's history."""
    timings: dict[str, float] = {}
    for event, following in zip(job.history, job.history[1:], strict=False):
        timings[event.status.value] = (following.at - event.at).total_seconds()
    return timings


def finalize_image(services: ImagingServices, job: Job) -> Image:
    """Write the manifest, mark the image and the job ACTIVE, delete staging and release the lock."""
    store = services.store
    frozen = FrozenChain(**json.loads(store.get(snapshot_key(job.id))))
    estimate = json.loads(store.get(estimate_key(job.id)))
    uploaded = load_upload(services, job.id)
    chain = open_disk(services.disk_store, frozen.leaf, frozen.layers)
    # The content hash comes from the digests the Map's workers made; only the object is read again.
    content_hash = _content_hash(uploaded.frames)
    job = advance_job(
        services, job.id, Status.ACTIVE, detail=f"{uploaded.size} bytes at {uploaded.key}", update_image=False
    )
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "image_id": job.image_id,
        "job_id": job.id,
        "tenant": job.tenant,
        "server_id": job.server_id,
        "object_key": uploaded.key,
        "object_url": f"{store.url.rstrip('/')}/{uploaded.key}",
        "source_chain": [
            {"path": layer.path, "uuid": layer.uuid, "file_size": layer.file_size, "type": layer.disk_type}
            for layer in chain.layers
        ],
        "virtual_size": chain.virtual_size,
        "vhd_physical_size": uploaded.image_bytes,
        "allocated_bytes": estimate["allocated_bytes"],
        "nonzero_bytes": estimate["estimated_nonzero_bytes"],
        "estimated_compressed_size": {
            "point": estimate["compressed_bytes"],
            "low": estimate["low"],
            "high": estimate["high"],
        },
        "compressed_size": uploaded.size,
        "compression_ratio": chain.virtual_size / uploaded.size if uploaded.size else None,
        "block_size": vhdcore.DEFAULT_BLOCK_SIZE,
        "chunk_size": services.config.chunk_size,
        "object_layout": uploaded.layout,
        "part_size": services.config.part_size if uploaded.layout == Layout.STAGED else None,
        "part_count": len(uploaded.parts),
        "parts_copied": uploaded.parts_copied,
        "content_sha256": content_hash,
        "content_hash": METHOD,
        "object_sha256": uploaded.object_sha256,
        "object_etag": uploaded.etag,
        "parts": [asdict(part) for part in uploaded.parts],
        "frames": [asdict(frame) for frame in uploaded.frames],
        "timings": {**step_timings(job), "upload_seconds": uploaded.seconds},
        "predicted_seconds": estimate["predicted_seconds"],
        # Planned before filesystem-aware imaging existed: every block was imaged.
        "live_data": estimate.get("live_data") or live_data(None),
        "history": [event.model_dump(mode="json") for event in job.history],
    }
    store.put(keys.manifest_key(job.image_id), json.dumps(manifest, indent=2).encode())
    image = services.state.get_image(job.image_id).model_copy(
        update={
            "status": Status.ACTIVE,
            "object_url": manifest["object_url"],
            "manifest": {name: value for name, value in manifest.items() if name not in BULKY_FIELDS},
            "virtual_size": chain.virtual_size,
            "compressed_size": uploaded.size,
        }
    )
    services.state.put_image(image)
    delete_staging(services, job.id)
    release_server_lock(services, job)
    if image.origin is ImageOrigin.SCHEDULED and image.server_id is not None:
        keep_scheduled_images(services, image.server_id)
    return image


def delete_staging(services: ImagingServices, job_id: str) -> int:
    """Remove everything the job staged; returns how many objects were deleted."""
    doomed = [info.key for info in services.store.list_objects(keys.staging_prefix(job_id))]
    services.store.delete_many(doomed)
    return len(doomed)
