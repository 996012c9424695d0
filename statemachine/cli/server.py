"""`imaging server add|list|show|remove`: the servers whose disks can be imaged.

One chain, one server: `add` refuses a name already registered (unless `--replace`) and a disk any layer of which
belongs to another registered server's chain (two servers writing or coalescing one chain corrupt each other).
`remove` and `add --replace` take the server's imaging lock for their few writes, so neither runs while the server is
being imaged, nor lets an image start half-way through. Removing a server keeps its images and its disk files.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

import vhdcore
from functions.imaging.disks import open_disk
from functions.imaging.errors import ImagingError
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import is_store_key
from functions.settings import Settings
from functions.state import AlreadyExistsError, NotFoundError, Server
from functions.storage import FileObjectStore, StorageError
from statemachine.cli.common import UserError, json_option
from statemachine.cli.output import print_fields, print_json, print_table
from statemachine.cli.services import disk_argument, location_options, opened
from statemachine.cli.write_guard import layer_owner, protected_files

DEFAULT_TENANT = "local"
CLI_LOCK_TTL_S = 120.0
"""How long `remove` / `add --replace` may hold a server's lock if they die holding it (they hold it for a few
writes)."""


@click.group()
def server() -> None:
    """Register servers (a name and the leaf of their disk chain) and look at them."""


def server_json(record: Server) -> dict[str, Any]:
    return record.model_dump(mode="json")


@contextmanager
def holding_server(services: ImagingServices, server_id: str, action: str) -> Iterator[None]:
    """Hold the server's imaging lock for `action`: a UserError naming the job if the server is being imaged.

    A job of the server whose runner died (no heartbeat) is failed INTERRUPTED first, releasing its lock: only a live
    job keeps the server."""
    from statemachine.cli.jobs import recover_without_engine

    recover_without_engine(services, which=lambda job: job.server_id == server_id)
    owner = f"cli-{action}-{uuid.uuid4().hex[:12]}"
    if not services.state.acquire_lock(server_id, owner, CLI_LOCK_TTL_S):
        lock = services.state.get_lock(server_id)
        holder = lock.owner if lock else "another job"
        try:
            image_id: str | None = services.state.get_job(holder).image_id
        except (NotFoundError, ValueError):
            image_id = None
        follow = (
            f"wait for image {image_id} to finish (`imaging image show {image_id}`) or cancel it "
            f"(`imaging image cancel {image_id}`)"
            if image_id
            else "wait for it to finish"
        )
        raise UserError(f"server {server_id} is being imaged (by {holder}); refusing to {action} it", hint=follow)
    try:
        yield
    finally:
        services.state.release_lock(server_id, owner)


def _store_layers_of_others(services: ImagingServices, name: str) -> dict[str, str]:
    """Store keys of the layers of every other registered server's chain (recorded, or found from its leaf)."""
    owners: dict[str, str] = {}
    for other in services.state.list_all_servers():
        if other.id == name or not is_store_key(other.disk):
            continue
        locations = [other.disk, *(other.chain or ()), *other.garbage]
        if other.merging is not None:
            locations += [other.merging.child, other.merging.parent, other.merging.key]
        with suppress(ImagingError, StorageError, vhdcore.VhdError):  # else its recorded layers are compared
            locations += [layer.path for layer in open_disk(services.disk_store, other.disk, other.chain).layers]
        owners |= {location: other.id for location in locations if is_store_key(location)}
    return owners


def shared_layer(services: ImagingServices, settings: Settings, name: str, chain: vhdcore.Chain) -> str | None:
    """Why `chain` cannot be server `name`'s: one of its layers is a layer of another registered server's chain."""
    own = f"registered server {name}'s chain"
    local = [Path(layer.path) for layer in chain.layers if not is_store_key(layer.path)]
    if isinstance(services.disk_store, FileObjectStore):  # keys of a file store are files other servers may name
        local += [services.disk_store.root / layer.path for layer in chain.layers if is_store_key(layer.path)]
    if local:
        others = [item for item in protected_files(settings) if item.owner != own]
        for path in local:
            owner = layer_owner(path, others)
            if owner is not None:
                return f"{path} is a layer of {owner}"
    keys = [layer.path for layer in chain.layers if is_store_key(layer.path)]
    if keys:
        owners = _store_layers_of_others(services, name)
        for key in keys:
            if key in owners:
                return f"{key} is a layer of registered server {owners[key]}'s chain"
    return None


@server.command()
@click.argument("name")
@click.option(
    "--disk",
    "leaf",
    required=True,
    help="The leaf VHD of the server's disk chain: a local file, or a key or URL in the store (sr/web1/leaf.vhd).",
)
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="The tenant owning the server.")
@click.option("--flavor", default="standard", show_default=True, help="Flavor (legacy, standard, performance, ...).")
@click.option("--replace", is_flag=True, help="Replace the record of a server already registered as NAME.")
@click.option(
    "--all-blocks",
    is_flag=True,
    help="Image every block of this server (filesystem-aware imaging off: free ranges are stored too).",
)
@location_options
@json_option
def add(
    name: str,
    leaf: str,
    tenant: str,
    flavor: str,
    replace: bool,
    all_blocks: bool,
    settings: Settings,
    as_json: bool,
) -> None:
    """Register server NAME running on the chain whose leaf is --disk (checked now; kept where it is).

    A NAME already registered is refused unless --replace (refused too while it is being imaged); a disk whose
    chain shares a layer with another registered server's chain is always refused.
    """
    with opened(settings) as services:
        location = disk_argument(services.disk_store, leaf)
        chain = open_disk(services.disk_store, location)
        record = Server(
            id=name,
            tenant=tenant,
            name=name,
            disk=location,
            flavor=flavor,
            created_at=datetime.now(UTC),
            all_blocks=all_blocks,
        )
        conflict = shared_layer(services, settings, name, chain)
        if conflict is not None:
            raise UserError(
                f"{conflict}; refusing to register server {name} on it",
                hint="two servers on one chain corrupt each other: give each server its own chain "
                "(copy the disk with `imaging vhd export LEAF OUT --format vhd`)",
            )
        if replace:
            with holding_server(services, name, "replace"):
                services.state.put_server(record)
        else:
            try:
                services.state.create_server(record)
            except AlreadyExistsError as error:
                raise UserError(
                    f"server {name} is already registered",
                    hint=f"pass --replace to point it at this disk, or remove it first: imaging server remove {name}",
                ) from error
    if as_json:
        print_json(server_json(record))
        return
    click.echo(f"registered server {name}: {record.disk} (chain of {chain.depth}, {chain.virtual_size} bytes)")


@server.command(name="list")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True)
@location_options
@json_option
def list_servers(tenant: str, settings: Settings, as_json: bool) -> None:
    """List the tenant's servers."""
    with opened(settings) as services:
        servers = services.state.list_servers(tenant)
    if as_json:
        print_json([server_json(record) for record in servers])
        return
    print_table(["NAME", "FLAVOR", "DISK"], [[s.id, s.flavor, s.disk] for s in servers])


@server.command()
@click.argument("name")
@location_options
@json_option
def show(name: str, settings: Settings, as_json: bool) -> None:
    """Show a server, its imaging lock and its jobs."""
    with opened(settings) as services:
        record = services.state.get_server(name)
        lock = services.state.get_lock(name)
        jobs = services.state.list_jobs(name)
    if as_json:
        print_json(
            {
                **server_json(record),
                "lock": lock.model_dump(mode="json") if lock else None,
                "jobs": [{"id": j.id, "image_id": j.image_id, "status": j.status.value} for j in jobs],
            }
        )
        return
    print_fields(
        [
            ("name", record.id),
            ("tenant", record.tenant),
            ("flavor", record.flavor),
            ("disk", record.disk),
            ("images", "every block (--all-blocks)" if record.all_blocks else "live data only"),
            ("being imaged", f"by {lock.owner}" if lock else "no"),
            ("jobs", ", ".join(f"{j.id} ({j.status.value})" for j in jobs) or "none"),
        ]
    )


@server.command()
@click.argument("name")
@location_options
@json_option
def remove(name: str, settings: Settings, as_json: bool) -> None:
    """Unregister server NAME and delete its schedule; refused while it is being imaged.

    Its images are kept (still listed by `imaging image list --server NAME`, exportable and restorable), and so are
    the files or objects of its disk chain.
    """
    with opened(settings) as services:
        record = services.state.get_server(name)
        with holding_server(services, name, "remove"):
            schedule_removed = services.state.delete_schedule(name)
            services.state.delete_server(name)
        images = services.state.list_images(server_id=name)
    result = {
        "removed": name,
        "tenant": record.tenant,
        "disk": record.disk,
        "schedule_removed": schedule_removed,
        "images_kept": [image.id for image in images],
    }
    if as_json:
        print_json(result)
        return
    schedule_text = "; its schedule deleted" if schedule_removed else ""
    click.echo(f"removed server {name} (tenant {record.tenant}){schedule_text}")
    click.echo(f"  disk chain left in place: {record.disk}")
    if images:
        click.echo(f"  {len(images)} image(s) kept: `imaging image list --server {name}`")
