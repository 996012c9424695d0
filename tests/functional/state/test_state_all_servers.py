"""`list_all_servers`: every tenant's servers (the CLI's write guard protects all registered chains)."""

from __future__ import annotations

from datetime import UTC, datetime

from functions.state import Server, StateStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def server(server_id: str, tenant: str) -> Server:
    return Server(id=server_id, tenant=tenant, name=server_id, disk=f"/data/{server_id}/leaf.vhd", created_at=T0)


def test_all_servers_of_every_tenant_are_listed_by_id(store: StateStore) -> None:
    assert store.list_all_servers() == []
    records = [server("srv-2", "tenant-a"), server("srv-3", "tenant-b"), server("srv-1", "tenant-a")]
    for record in records:
        store.put_server(record)
    assert [s.id for s in store.list_all_servers()] == ["srv-1", "srv-2", "srv-3"]
    store.delete_server("srv-2")
    assert [s.id for s in store.list_all_servers()] == ["srv-1", "srv-3"]
