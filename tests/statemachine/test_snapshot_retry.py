"""A retried Snapshot freezes the server once: a crash after the new leaf was written, or after the server moved to
it, leaves no second leaf and no orphan, and the frozen chain is the one below the new leaf (files and SQLite)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import vhdcore
from functions.imaging.jobs import ImagingRequest, start_job
from functions.imaging.services import ImagingServices
from functions.imaging.snapshot import freeze
from functions.state import Server
from functions.state.sqlite_state import SqliteStateStore
from functions.storage import FileObjectStore
from tests.support.workflow import build_sample_chain


def fail_once(monkeypatch: pytest.MonkeyPatch, target: object, operation: str, marker: str) -> list[str]:
    """Make the first call of `target.operation` whose first argument contains `marker` raise; returns a list that
    records the crash."""
    real = getattr(target, operation)
    crashed: list[str] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not crashed and marker in str(args[0] if args else kwargs):
            crashed.append(operation)
            raise RuntimeError(f"injected crash in {operation}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, operation, call)
    return crashed


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FileObjectStore, SqliteStateStore, Path]:
    store = FileObjectStore(tmp_path / "store")
    leaf = build_sample_chain(tmp_path / "store" / "sr" / "web1")
    state = SqliteStateStore(tmp_path / "state.sqlite3")
    state.put_server(Server(id="web1", tenant="t1", name="web1", disk=str(leaf), created_at=datetime.now(UTC)))
    return store, state, leaf


def disks(store: FileObjectStore) -> set[str]:
    return {path.name for path in (store.root / "sr" / "web1").glob("*.vhd")}


@pytest.mark.parametrize(
    ("where", "operation", "marker"),
    [("the new leaf written, the server not moved", "swap_server_disk", ""), ("the server moved", "put", "snapshot")],
)
def test_a_retried_snapshot_freezes_the_server_once(
    parts: tuple[FileObjectStore, SqliteStateStore, Path],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    operation: str,
    marker: str,
) -> None:
    store, state, leaf = parts
    before = disks(store)
    services = ImagingServices(store=store, state=state)
    job = start_job(services, ImagingRequest(job_id="job1", image_id="img1", tenant="t1", name="n", server_id="web1"))
    crashed = fail_once(monkeypatch, store if operation == "put" else state, operation, marker)

    with pytest.raises(RuntimeError, match="injected crash"):
        freeze(services, job)
    assert crashed, where
    monkeypatch.undo()

    frozen = freeze(ImagingServices(store=store, state=state), job)

    new = disks(store) - before
    assert len(new) == 1, f"after a crash with {where}: {new}"
    server = state.get_server("web1")
    assert frozen.new_leaf == server.disk and Path(server.disk).name in new
    assert frozen.leaf == str(leaf), "the frozen chain is the one below the new leaf"
    chain = vhdcore.open_chain(server.disk)
    assert [layer.path for layer in chain.layers][1:] == frozen.layers
    assert chain.layers[1].uuid == vhdcore.open_chain(str(leaf)).leaf.uuid
