"""Freezing the chain to image (DESIGN §1, 25%): a registered server continues on a new empty differencing leaf,
its active-disk pointer moved atomically; an unregistered disk is imaged as it is.

Where the new leaf goes (issue 14, item 7): a server whose chain is local files gets it beside its chain, in the
folder of its active disk (`server add` keeps a disk where it is, and so does imaging: the chain's files never move
into the data directory), named `<uuid>.vhd` after the job; a server whose chain lives in the store (its disk a key)
gets it as a new object under `sr/<server>/`, written only if absent, so both work on S3 and files alike."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import vhdcore
from functions.imaging import keys
from functions.imaging.disks import open_disk
from functions.imaging.errors import DiskBusyError, DiskCorruptError, vhd_errors
from functions.imaging.jobs import advance_job, hold_server_lock
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import is_store_key, snapshot_in_store
from functions.state import Job, PreconditionFailedError, Server, Status
from functions.storage import ObjectNotFoundError, ObjectPreconditionFailedError


@dataclass(frozen=True)
class FrozenChain:
    """The chain that gets imaged: its leaf (never written again) and, for a server, the leaf it now runs on."""

    leaf: str
    layers: list[str]
    virtual_size: int
    new_leaf: str | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def snapshot_key(job_id: str) -> str:
    return f"{keys.staging_prefix(job_id)}snapshot.json"


def freeze(services: ImagingServices, job: Job) -> FrozenChain:
    """Freeze the job's chain once (a retried call returns the first result) and move the job to SAVING."""
    hold_server_lock(services, job)
    try:
        frozen = FrozenChain(**json.loads(services.store.get(snapshot_key(job.id))))
    except ObjectNotFoundError:
        frozen = (
            _freeze_server(services, job, job.server_id) if job.server_id is not None else _read_only(services, job)
        )
        services.store.put(snapshot_key(job.id), json.dumps(frozen.to_json()).encode())
    advance_job(services, job.id, Status.SAVING, detail=f"frozen chain of depth {len(frozen.layers)}")
    return frozen


def _read_only(services: ImagingServices, job: Job) -> FrozenChain:
    if job.disk is None:
        raise DiskCorruptError(f"job {job.id} names no disk")
    chain = open_disk(services.disk_store, job.disk)
    return FrozenChain(chain.leaf.path, [layer.path for layer in chain.layers], chain.virtual_size, None)


def new_leaf_uuid(job_id: str) -> str:
    """The new leaf a job's snapshot gives the server: named after the job, so that a retried Snapshot finds the
    leaf its first attempt made instead of making (and orphaning) another."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cloud-imaging:snapshot:{job_id}"))


def beside_chain(disk: str, job_id: str) -> Path:
    """The new leaf of a server whose active disk is the local file `disk`: in the same folder. A server already
    running on a leaf that this job made keeps that folder (a retried Snapshot finds it)."""
    return Path(disk).parent / f"{new_leaf_uuid(job_id)}.vhd"


def _freeze_server(services: ImagingServices, job: Job, server_id: str) -> FrozenChain:
    server = services.state.get_server(server_id)
    new_key = keys.server_disk_key(server_id, new_leaf_uuid(job.id))
    store_chain = is_store_key(server.disk)
    new_location = new_key if store_chain else str(beside_chain(server.disk, job.id))
    chain = open_disk(services.disk_store, server.disk, server.chain)
    if server.disk == new_location:  # an earlier attempt moved the server already: the frozen chain is below
        layers = [layer.path for layer in chain.layers][1:]
        if not layers:
            raise DiskCorruptError(f"server {server_id}'s new leaf {new_location} has no parent")
        return FrozenChain(layers[0], layers, chain.virtual_size, new_location)
    if store_chain:
        return _freeze_in_store(services, server, chain, new_key)
    new_path = Path(new_location)
    new_path.parent.mkdir(parents=True, exist_ok=True)
    with vhd_errors():
        if not _is_child_of(new_path, chain):  # else an earlier attempt made it and stopped before the swap
            new_path.unlink(missing_ok=True)
            vhdcore.snapshot(chain.leaf.path, str(new_path))
    try:
        services.state.swap_server_disk(server_id, expected_disk=server.disk, new_disk=str(new_path))
    except PreconditionFailedError as error:
        new_path.unlink(missing_ok=True)
        raise DiskBusyError(f"server {server_id}'s disk moved while it was frozen: {error}") from error
    return FrozenChain(chain.leaf.path, [layer.path for layer in chain.layers], chain.virtual_size, str(new_path))


def _is_child_of(path: Path, chain: vhdcore.Chain) -> bool:
    """Whether `path` is an existing disk whose parent is the chain's leaf."""
    if not path.is_file():
        return False
    try:
        child = vhdcore.open_chain(str(path))
    except vhdcore.VhdError:
        return False
    return len(child.layers) > 1 and child.layers[1].uuid == chain.leaf.uuid


def _freeze_in_store(services: ImagingServices, server: Server, chain: vhdcore.Chain, new_key: str) -> FrozenChain:
    """The new leaf as a new object (kept if an earlier attempt made it); the server's record then moves to it with
    the whole chain (its layer keys), conditionally: a record changed meanwhile leaves the new object deleted and
    the job failed DISK_BUSY."""
    try:
        with vhd_errors():
            snapshot_in_store(services.disk_store, chain, new_key)
    except ObjectPreconditionFailedError:
        pass  # made by an earlier attempt of this job, which stopped before the swap
    layers = [layer.path for layer in chain.layers]
    moved = server.model_copy(update={"disk": new_key, "chain": (new_key, *layers)})
    try:
        services.state.replace_server(server, moved)
    except PreconditionFailedError as error:
        services.disk_store.delete(new_key)
        raise DiskBusyError(f"server {server.id}'s disk moved while it was frozen: {error}") from error
    return FrozenChain(chain.leaf.path, layers, chain.virtual_size, new_key)
