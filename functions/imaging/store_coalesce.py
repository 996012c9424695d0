"""Coalescing a chain kept in object storage (issue 5, scope 1), where objects never change.

Merging read-only layer C into its parent B writes a new object B' (vhdcore's merge layout: B's unchanged ranges
copied inside the store by UploadPartCopy when a run is long enough, merged and added blocks uploaded). B' carries
C's UUID, so C's child reads it as its parent unchanged; the server's chain record (its layer keys, in state) is
then swapped conditionally from [.., C, B, ..] to [.., B', ..] with C and B moved to its garbage, which is deleted
after the swap. A crash at any point leaves either the old record (the old objects untouched; an unfinished upload
is aborted by the next slice) or the new one (its garbage deleted by the next slice): the chain stays whole.

Only layers under the server's own `sr/<server>/` that no other server of the tenant names are merged (a shared
golden base is left alone). One merge per slice: the Coalesce loop calls again until nothing is left to merge.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import vhdcore
from functions.imaging import keys
from functions.imaging.disks import open_disk
from functions.imaging.errors import DiskBusyError, DiskCorruptError
from functions.imaging.services import ImagingServices
from functions.state import PreconditionFailedError, Server
from functions.storage import ObjectStore, PartInfo, StorageError
from functions.storage.checksums import crc32c
from functions.storage.objects import MIN_PART_SIZE

UPLOAD_PART_BYTES = 16 * 1024**2
"""New bytes are uploaded in parts of about this size (memory: one part at a time)."""
MAX_COPY_PART = 1024**3
"""A copied range is split into parts of at most this size (S3 copies up to 5 GiB per part)."""


@dataclass(frozen=True)
class StoreMergeStep:
    merged: bool
    """False: nothing was left to merge."""
    bytes_copied: int
    depth: int


@dataclass(frozen=True)
class _Copy:
    """`length` bytes of the parent object at `offset`."""

    offset: int
    length: int


@dataclass(frozen=True)
class _Block:
    index: int
    length: int


Piece = _Copy | _Block | bytes


@dataclass(frozen=True)
class _CopyPart:
    offset: int
    length: int


@dataclass(frozen=True)
class _UploadPart:
    pieces: tuple[Piece, ...]


Part = _CopyPart | _UploadPart


def plan_parts(
    segments: Sequence[tuple[str, int, int, int | None, bytes | None]],
    *,
    min_part: int = MIN_PART_SIZE,
    upload_part: int = UPLOAD_PART_BYTES,
    max_copy: int = MAX_COPY_PART,
) -> list[Part]:
    """The multipart parts of a merged layer: copies of the parent's long runs, uploads of everything else; every
    part but the last is at least `min_part` (a copy too short alone tops up the upload before it, or is uploaded)."""
    parts: list[Part] = []
    pending: list[Piece] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        parts.append(_UploadPart(tuple(pending)))
        pending, pending_bytes = [], 0

    for kind, offset, length, index, data in segments:
        if kind == "copy" and length >= 2 * min_part:
            if pending:
                need = max(0, min_part - pending_bytes)
                if need:
                    pending.append(_Copy(offset, need))
                    offset, length = offset + need, length - need
                flush()
            count = -(-length // max_copy)
            size = -(-length // count)
            for start in range(offset, offset + length, size):
                parts.append(_CopyPart(start, min(size, offset + length - start)))
            continue
        if kind == "copy":
            pending.append(_Copy(offset, length))
        elif kind == "block" and index is not None:
            pending.append(_Block(index, length))
        elif kind == "bytes" and data is not None:
            pending.append(data)
        else:
            raise DiskCorruptError(f"unexpected merge segment {kind!r} at {offset}")
        pending_bytes += length
        if pending_bytes >= upload_part:
            flush()
    if pending:
        flush()
    return parts


def _mergeable(services: ImagingServices, server: Server, layers: list[str]) -> int | None:
    """The index of the read-only layer to merge into its parent (the one nearest the base), if any."""
    own = keys.server_disk_prefix(server.id)
    others: set[str] = set()
    for other in services.state.list_servers(server.tenant):
        if other.id != server.id:
            others.update(other.chain or (other.disk,))
    for index in range(len(layers) - 2, 0, -1):
        pair = layers[index : index + 2]
        if all(key.startswith(own) and key not in others for key in pair):
            return index
    return None


def collect_garbage(services: ImagingServices, server: Server) -> Server:
    """Delete the layers a stored merge took out of the chain, then clear them from the record."""
    if not server.garbage:
        return server
    for key in server.garbage:
        services.disk_store.delete(key)
    cleared = server.model_copy(update={"garbage": ()})
    return services.state.replace_server(server, cleared)


def abort_unfinished_merges(store: ObjectStore, server_id: str) -> None:
    """Multipart uploads under the server's disks are merges that died before completing: discard them."""
    for upload in store.list_multipart_uploads(keys.server_disk_prefix(server_id)):
        store.abort_multipart(upload.key, upload.upload_id)


def merge_step(services: ImagingServices, server_id: str) -> StoreMergeStep:
    """Finish what a crashed step left, then merge one read-only layer of the server's chain into its parent."""
    store = services.disk_store
    server = collect_garbage(services, services.state.get_server(server_id))
    abort_unfinished_merges(store, server_id)
    chain = open_disk(store, server.disk, server.chain)
    layers = [layer.path for layer in chain.layers]
    index = _mergeable(services, server, layers)
    if index is None:
        return StoreMergeStep(merged=False, bytes_copied=0, depth=len(layers))
    new_key = keys.server_disk_key(server_id, str(uuid.uuid4()))
    copied = write_merged(store, chain, index, layers[index + 1], new_key)
    merged = [*layers[:index], new_key, *layers[index + 2 :]]
    new = server.model_copy(update={"chain": tuple(merged), "garbage": (layers[index], layers[index + 1])})
    try:
        services.state.replace_server(server, new)
    except PreconditionFailedError as error:
        store.delete(new_key)
        raise DiskBusyError(f"server {server_id}'s chain changed while it was merged: {error}") from error
    collect_garbage(services, new)
    return StoreMergeStep(merged=True, bytes_copied=copied, depth=len(merged))


def write_merged(store: ObjectStore, chain: vhdcore.Chain, index: int, parent_key: str, new_key: str) -> int:
    """Write layer `index` merged into its parent (`parent_key`) as the new object `new_key`; the bytes of merged
    and added blocks. An upload that fails is aborted."""
    try:
        layout = chain.merge_layout(index)
    except vhdcore.VhdError as error:
        raise DiskCorruptError(str(error)) from error
    upload_id = store.create_multipart(new_key)
    try:
        infos: list[PartInfo] = []
        for number, part in enumerate(plan_parts(layout.segments), start=1):
            if isinstance(part, _CopyPart):
                infos.append(store.upload_part_copy(new_key, upload_id, number, parent_key, part.offset, part.length))
            else:
                data = b"".join(_materialize(store, chain, index, parent_key, part.pieces))
                infos.append(store.upload_part(new_key, upload_id, number, data, crc32c(data)))
        store.complete_multipart(new_key, upload_id, infos)
    except BaseException:
        with contextlib.suppress(StorageError):  # else the next slice aborts it (abort_unfinished_merges)
            store.abort_multipart(new_key, upload_id)
        raise
    return int(layout.added_bytes + layout.merged_bytes)


def _materialize(
    store: ObjectStore, chain: vhdcore.Chain, index: int, parent_key: str, pieces: Sequence[Piece]
) -> Iterator[bytes]:
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece
        elif isinstance(piece, _Copy):
            data = store.get_range(parent_key, piece.offset, piece.length)
            if len(data) != piece.length:
                raise DiskCorruptError(f"{parent_key}: read {len(data)} of {piece.length} bytes at {piece.offset}")
            yield data
        else:
            yield chain.merged_block(index, piece.index)
