"""Where a job's compressed frames go (issue 13: one write of the image).

- In place: on a file store, with a chain of local files, the Map's one item has vhdcore write every frame where it
  belongs in the image file (a spool under the job's staging), after room kept for the head; Upload compresses the
  head into that room and publishes the file under the image's key by a rename. No byte is written twice, and the
  checksums come from the compress step.
- Staged: everywhere else (S3, or a chain read by ranged GETs), each Map item stages its frames as objects on
  machines of its own, and Upload assembles them by a multipart upload with part copies.

In place, the workers' progress is made durable in batches (`written/` records, each naming the frames that an
`fdatasync` put on the device): a retried or resumed compress starts after the last one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum

import vhdcore
from functions.imaging import keys
from functions.imaging.errors import InvalidRequestError
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import is_store_key
from functions.storage import FileObjectStore, ObjectNotFoundError

SYNC_BYTES = 256 * 1024**2
"""Compressed bytes written in place between two durable points (fdatasync and a record of the frames): what a
crash may cost to redo, against one sync per 256 MiB."""


@dataclass(frozen=True)
class StagedFrame:
    """What Upload and the manifest need of a compressed chunk: its frame is staged beside this record, or, in
    place, at `offset` of the image file."""

    index: int
    logical_bytes: int
    content_sha256: str
    crc32c: int
    stored_blocks: list[int]
    virtual_bytes: int
    read_bytes: int
    compressed_bytes: int
    offset: int | None = None

    @classmethod
    def of(cls, frame: vhdcore.ChunkFrame, offset: int | None = None) -> StagedFrame:
        """The record of a chunk's frame as vhdcore compressed it (with its content digest: asked for by every
        worker), at `offset` of the image file when written in place."""
        if frame.index is None:
            raise RuntimeError("the head frame is not compressed by a worker")
        if frame.content_sha256 is None:
            raise RuntimeError(f"vhdcore gave chunk {frame.index} no content digest though asked for one")
        return cls(
            index=frame.index,
            logical_bytes=frame.logical_bytes,
            content_sha256=frame.content_sha256,
            crc32c=frame.crc32c,
            stored_blocks=list(frame.stored_blocks),
            virtual_bytes=frame.virtual_bytes,
            read_bytes=frame.read_bytes,
            compressed_bytes=frame.compressed_bytes,
            offset=offset,
        )


class Layout(StrEnum):
    IN_PLACE = "in_place"
    STAGED = "staged"


def choose_layout(services: ImagingServices, leaf: str) -> Layout:
    """In place when the image lives in a file store and the chain is local files (the config may ask for staged
    frames anyway, the S3 way); InvalidRequestError when it asks for in place where that cannot be."""
    possible = isinstance(services.store, FileObjectStore) and not is_store_key(leaf)
    wanted = services.config.object_layout
    if wanted == "auto":
        return Layout.IN_PLACE if possible else Layout.STAGED
    try:
        layout = Layout(wanted)
    except ValueError:
        raise InvalidRequestError(f"unknown object layout {wanted!r}: use auto, in_place or staged") from None
    if layout is Layout.IN_PLACE and not possible:
        raise InvalidRequestError("an image is written in place only in a file store, from a chain of local files")
    return layout


def layout_key(job_id: str) -> str:
    return f"{keys.staging_prefix(job_id)}layout.json"


def record_layout(services: ImagingServices, job_id: str, layout: Layout) -> None:
    services.store.put(layout_key(job_id), json.dumps({"layout": layout.value}).encode())


def load_layout(services: ImagingServices, job_id: str) -> Layout:
    """The layout the Estimate step chose (staged when it recorded none: a job planned before layouts existed)."""
    try:
        return Layout(json.loads(services.store.get(layout_key(job_id)))["layout"])
    except ObjectNotFoundError:
        return Layout.STAGED


def spool_key(job_id: str) -> str:
    """The image file being written in place, until Upload publishes it."""
    return f"{keys.staging_prefix(job_id)}image.vhd.zst"


def written_prefix(job_id: str) -> str:
    return f"{keys.staging_prefix(job_id)}written/"


def record_written(services: ImagingServices, job_id: str, frames: list[StagedFrame]) -> None:
    """Record a batch of frames that are on the device (in chunk order)."""
    if frames:
        key = f"{written_prefix(job_id)}{frames[0].index:06d}.json"
        services.store.put(key, json.dumps([asdict(frame) for frame in frames]).encode())


def load_written(services: ImagingServices, job_id: str) -> list[StagedFrame]:
    """Every frame recorded as written, in chunk order from chunk 0 up to the first gap."""
    frames: list[StagedFrame] = []
    for info in services.store.list_objects(written_prefix(job_id)):
        frames.extend(StagedFrame(**frame) for frame in json.loads(services.store.get(info.key)))
    frames.sort(key=lambda frame: frame.index)
    contiguous: list[StagedFrame] = []
    for position, frame in enumerate(frames):
        if frame.index != position:
            break
        contiguous.append(frame)
    return contiguous
