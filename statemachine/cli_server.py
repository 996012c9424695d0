"""`imaging server add|list|show`: the servers whose disks can be imaged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from functions.imaging.disks import open_disk
from functions.settings import Settings
from functions.state import Server
from statemachine.cli_common import json_option, print_fields, print_json, print_table
from statemachine.cli_services import disk_argument, location_options, opened

DEFAULT_TENANT = "local"


@click.group()
def server() -> None:
    """Register servers (a name and the leaf of their disk chain) and look at them."""


def server_json(record: Server) -> dict[str, Any]:
    return record.model_dump(mode="json")


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
@location_options
@json_option
def add(name: str, leaf: str, tenant: str, flavor: str, settings: Settings, as_json: bool) -> None:
    """Register server NAME running on the chain whose leaf is --disk (checked now; kept where it is)."""
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
        )
        services.state.put_server(record)
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
            ("being imaged", f"by {lock.owner}" if lock else "no"),
            ("jobs", ", ".join(f"{j.id} ({j.status.value})" for j in jobs) or "none"),
        ]
    )
