"""Coalescing a chain kept in object storage (issue 5, scope 1), where objects never change.

Merging read-only layer C into its parent B writes a new object B' (vhdcore's merge layout: B's unchanged ranges
copied inside the store by UploadPartCopy when a run is long enough, merged and added blocks uploaded). B' carries
C's UUID, so C's child reads it as its parent unchanged; the server's chain record (its layer keys, in state) is
then swapped conditionally from [.., C, B, ..] to [.., B', ..] with C and B moved to its garbage, which is deleted
after the swap. The merge is recorded on the server (`merging`: C, B, B''s key and upload id) before any byte is
written, so a slice may stop when its time is up and the next resumes the upload without resending stored parts,
and a crash at any point leaves either the old record (old objects untouched; the recorded upload resumed, or
discarded with whatever it completed if the chain moved on) or the new one (its garbage deleted by the next slice):
the chain stays whole and nothing is orphaned.

Only layers under the server's own `sr/<server>/` that no other server of the tenant names are merged (a shared
golden base is left alone). One merge at a time: the Coalesce loop calls again until nothing is left to merge.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import vhdcore
from functions.imaging import keys
from functions.imaging.disks import open_disk
from functions.imaging.errors import DiskBusyError, DiskCorruptError, vhd_errors
from functions.imaging.services import ImagingServices
from functions.state import PendingMerge, PreconditionFailedError, Server
from functions.storage import ObjectNotFoundError, ObjectStore, PartInfo, UploadNotFoundError
from functions.storage.checksums import crc32c
from functions.storage.objects import MIN_PART_SIZE

UPLOAD_PART_BYTES = 16 * 1024**2
"""New bytes are uploaded in parts of about this size (memory: one part at a time)."""
MAX_COPY_PART = 1024**3
"""A copied range is split into parts of at most this size (S3 copies up to 5 GiB per part)."""


@dataclass(frozen=True)
class StoreMergeStep:
    merged: bool
    """A merge was completed (swapped into the record) by this slice."""
    finished: bool
    """Nothing is left to merge."""
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


def abort_unfinished_merges(store: ObjectStore, server_id: str, keep: str | None = None) -> None:
    """Multipart uploads under the server's disks, other than the recorded merge's (`keep`), are merges that died
    before their intent was recorded: discard them."""
    for upload in store.list_multipart_uploads(keys.server_disk_prefix(server_id)):
        if upload.upload_id != keep:
            store.abort_multipart(upload.key, upload.upload_id)


def _drop_merge(services: ImagingServices, server: Server) -> Server:
    """Discard the recorded merge (its upload and whatever object it completed), then clear the record."""
    pending = server.merging
    if pending is None:
        return server
    store = services.disk_store
    with contextlib.suppress(UploadNotFoundError):
        store.abort_multipart(pending.key, pending.upload_id)
    store.delete(pending.key)
    return services.state.replace_server(server, server.model_copy(update={"merging": None}))


class _MergeLostError(Exception):
    """The recorded merge's upload no longer exists and never completed."""


def _position(layers: list[str], pending: PendingMerge) -> int | None:
    """Where the recorded merge's layers still sit in the chain, leaf first (child, then its parent)."""
    for index in range(len(layers) - 1):
        if (layers[index], layers[index + 1]) == (pending.child, pending.parent):
            return index
    return None


def merge_step(services: ImagingServices, server_id: str, budget_s: float | None = None) -> StoreMergeStep:
    """Finish what an earlier slice left, then merge one read-only layer of the server's chain into its parent, for
    at most about `budget_s` seconds of part transfers (None: no limit); a slice that runs out of time returns with
    the merge recorded and its parts stored, and the next one goes on from there."""
    store = services.disk_store
    deadline = None if budget_s is None else services.monotonic() + budget_s
    server = collect_garbage(services, services.state.get_server(server_id))
    chain = open_disk(store, server.disk, server.chain)
    layers = [layer.path for layer in chain.layers]
    index = _position(layers, server.merging) if server.merging is not None else None
    if server.merging is not None and index is None:
        server = _drop_merge(services, server)  # the chain moved on (under the server's lock it should not)
    abort_unfinished_merges(store, server_id, keep=server.merging.upload_id if server.merging else None)
    if server.merging is None:
        index = _mergeable(services, server, layers)
        if index is None:
            return StoreMergeStep(merged=False, finished=True, bytes_copied=0, depth=len(layers))
        server = _record_merge(services, server, layers[index], layers[index + 1])
    pending = server.merging
    if pending is None or index is None:
        raise DiskBusyError(f"server {server_id}'s merge was not recorded")
    try:
        copied = write_merged(
            store, chain, index, pending, lambda: deadline is not None and services.monotonic() >= deadline
        )
    except _MergeLostError:  # aborted or expired from outside: start it again on the next slice
        _drop_merge(services, server)
        return StoreMergeStep(merged=False, finished=False, bytes_copied=0, depth=len(layers))
    if copied is None:
        return StoreMergeStep(merged=False, finished=False, bytes_copied=0, depth=len(layers))
    merged = [*layers[:index], pending.key, *layers[index + 2 :]]
    new = server.model_copy(
        update={"chain": tuple(merged), "garbage": (pending.child, pending.parent), "merging": None}
    )
    try:
        services.state.replace_server(server, new)
    except PreconditionFailedError as error:
        raise DiskBusyError(f"server {server_id}'s chain changed while it was merged: {error}") from error
    collect_garbage(services, new)
    return StoreMergeStep(merged=True, finished=False, bytes_copied=copied, depth=len(merged))


def _record_merge(services: ImagingServices, server: Server, child: str, parent: str) -> Server:
    """Start the merge's upload and record it on the server before any byte is written."""
    store = services.disk_store
    key = keys.server_disk_key(server.id, str(uuid.uuid4()))
    upload_id = store.create_multipart(key)
    pending = PendingMerge(child=child, parent=parent, key=key, upload_id=upload_id)
    try:
        return services.state.replace_server(server, server.model_copy(update={"merging": pending}))
    except PreconditionFailedError as error:
        store.abort_multipart(key, upload_id)
        raise DiskBusyError(f"server {server.id}'s record changed while a merge was started: {error}") from error


def write_merged(
    store: ObjectStore, chain: vhdcore.Chain, index: int, pending: PendingMerge, out_of_time: Callable[[], bool]
) -> int | None:
    """Write layer `index` merged into its parent as the recorded merge's object, resuming its upload (parts the
    store already holds at the planned size are kept); the bytes of merged and added blocks, or None when time ran
    out first. A failure leaves the upload for the next slice to resume."""
    with vhd_errors():
        layout = chain.merge_layout(index)
    key, upload_id = pending.key, pending.upload_id
    try:
        stored = {part.number: part for part in store.list_parts(key, upload_id)}
    except UploadNotFoundError:
        try:
            store.head(key)  # completed by a slice that died before the swap
        except ObjectNotFoundError:
            raise _MergeLostError(f"the upload of {key} is gone") from None
        return int(layout.added_bytes + layout.merged_bytes)
    infos: list[PartInfo] = []
    for number, part in enumerate(plan_parts(layout.segments), start=1):
        have = stored.get(number)
        if have is not None and have.size == _part_size(part):
            infos.append(have)
            continue
        if out_of_time():
            return None
        if isinstance(part, _CopyPart):
            infos.append(store.upload_part_copy(key, upload_id, number, pending.parent, part.offset, part.length))
        else:
            data = b"".join(_materialize(store, chain, index, pending.parent, part.pieces))
            infos.append(store.upload_part(key, upload_id, number, data, crc32c(data)))
    store.complete_multipart(key, upload_id, infos)
    return int(layout.added_bytes + layout.merged_bytes)


def _part_size(part: Part) -> int:
    if isinstance(part, _CopyPart):
        return part.length
    return sum(len(piece) if isinstance(piece, bytes) else piece.length for piece in part.pieces)


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
