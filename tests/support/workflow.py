"""The imaging workflow as the tests run it: on the embedded engine with the real handlers, a file store and SQLite in
a test's tmp_path (`env`), a sample chain to image (`build_sample_chain`), a request, a run, and the image read back
with `zstd -d` and `qemu-img`. tests/statemachine/conftest.py registers the `env` fixture; the tests of other
folders import what they use from here."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import vhdcore
from functions.imaging.services import ImagingServices
from functions.state import SqliteStateStore
from functions.storage import FileObjectStore
from statemachine.engine import ExecutionResult, Handler
from statemachine.local import LocalImaging

MIB = 1024**2
CHUNK = 8 * MIB
DISK_SIZE = 48 * MIB
TIMEOUT_S = 180


@dataclass(frozen=True)
class Env:
    root: Path
    store: FileObjectStore
    state: SqliteStateStore


def configure_workflow(monkeypatch: pytest.MonkeyPatch, store_url: str, state_path: Path) -> None:
    """The settings every workflow test runs with: its store and state, chunks small enough for several Map items."""
    monkeypatch.setenv("IMAGING_STORE", store_url)
    monkeypatch.setenv("IMAGING_STATE", f"sqlite:///{state_path}")
    monkeypatch.setenv("IMAGING_CHUNK_SIZE", str(CHUNK))
    monkeypatch.setenv("IMAGING_GROUP_BYTES", str(2 * CHUNK))
    monkeypatch.setenv("IMAGING_PART_SIZE", str(5 * MIB))
    monkeypatch.delenv("IMAGING_COALESCE_DEADLINE_S", raising=False)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    store_root = tmp_path / "store"
    state_path = tmp_path / "state.sqlite3"
    configure_workflow(monkeypatch, store_root.as_uri(), state_path)
    state = SqliteStateStore(state_path)
    yield Env(tmp_path, FileObjectStore(store_root), state)
    state.close()


def build_sample_chain(folder: Path, seed: int = 7) -> Path:
    """A depth-3 chain of 48 MiB: random (incompressible) data filling whole chunks, text, zeros written over
    allocated data (deleted-but-allocated), and overwrites across layers at unaligned offsets."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.vhd"
    vhdcore.create(str(base), DISK_SIZE)
    vhdcore.write(str(base), CHUNK, rng.randbytes(2 * CHUNK))  # chunks 1 and 2: frames > 5 MiB (part copies)
    vhdcore.write(str(base), 4 * CHUNK, b"kernel config=42 server image\n" * 100_000)
    middle = folder / "middle.vhd"
    vhdcore.snapshot(str(base), str(middle))
    vhdcore.write(str(middle), 4 * CHUNK + 12_345, bytes(1_000_000))  # deleted but still allocated
    vhdcore.write(str(middle), 3 * MIB + 512, rng.randbytes(700_000))
    leaf = folder / "leaf.vhd"
    vhdcore.snapshot(str(middle), str(leaf))
    vhdcore.write(str(leaf), CHUNK + 4096, b"overwritten in the leaf " * 4000)
    vhdcore.write(str(leaf), DISK_SIZE - 3000, b"end of disk" * 200)
    return leaf


@contextmanager
def opened_services(env: Env) -> Iterator[ImagingServices]:
    yield ImagingServices(store=env.store, state=env.state)


def request(job: str, *, disk: Path | None = None, server: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"job_id": job, "image_id": f"img-{job}", "tenant": "acme", "name": f"image of {job}"}
    if disk is not None:
        body["disk"] = str(disk)
    if server is not None:
        body["server_id"] = server
    return body


def register_server(env: Env, leaf: Path, server: str = "web1") -> None:
    from datetime import UTC, datetime

    from functions.state import Server

    env.state.put_server(Server(id=server, tenant="acme", name=server, disk=str(leaf), created_at=datetime.now(UTC)))


def run(body: dict[str, Any], overrides: dict[str, Handler] | None = None) -> ExecutionResult:
    with LocalImaging(overrides) as workflow:
        return workflow.run(body, timeout_s=TIMEOUT_S)


def image_raw(env: Env, image_id: str) -> bytes:
    compressed = env.store.root / "images" / image_id / "image.vhd.zst"
    vhd = env.root / f"{image_id}.vhd"
    raw = env.root / f"{image_id}.raw"
    subprocess.run(["zstd", "-d", "-q", "-f", str(compressed), "-o", str(vhd)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(raw)], check=True)
    return raw.read_bytes()


def assert_cleaned_up(env: Env, job: str, image_id: str) -> None:
    assert list(env.store.list_objects(f"staging/{job}/")) == []
    assert env.store.list_multipart_uploads() == []
    assert list(env.store.list_objects(f"images/{image_id}/")) == []
