"""Coalescing a chain kept in S3 (a moto server): each merge writes a new object (parts copied inside the store and
uploaded), swaps the server's chain record, then deletes the merged layers; a failure injected at every step leaves
the chain whole, and the next slice finishes. Also the real ASL on the embedded engine coalescing before imaging.

References: content is compared with the chain read back from moto and flattened by tests/support/pyvhd; the image
is checked with `zstd -d` and `qemu-img convert -f vpc -O raw`.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import boto3
import pytest

import vhdcore
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import StoreLayerReader
from functions.imaging.store_coalesce import merge_step, plan_parts
from functions.state import Server, SqliteStateStore, StateStore
from functions.storage import ObjectStore, open_object_store
from statemachine.local import LocalImaging
from tests.support.pyvhd import flatten
from tests.support.workflow import TIMEOUT_S, build_sample_chain

MIB = 1024**2


@dataclass(frozen=True)
class Env:
    root: Path
    store: ObjectStore
    state: SqliteStateStore
    expected: bytes
    layers: list[str]
    """The chain's keys, leaf first."""


def build_in_store(root: Path, store: ObjectStore, server: str) -> tuple[bytes, list[str]]:
    """A depth-4 chain (the workflow's sample plus a new leaf) uploaded under sr/<server>/; its flattened bytes as
    read back from the store."""
    folder = root / "built"
    leaf = build_sample_chain(folder)
    top = folder / "top.vhd"
    vhdcore.snapshot(str(leaf), str(top))
    vhdcore.write(str(top), 5 * MIB + 100, random.Random(5).randbytes(3 * MIB))
    names = ["top.vhd", "leaf.vhd", "middle.vhd", "base.vhd"]
    for name in names:
        store.put(f"sr/{server}/{name}", (folder / name).read_bytes(), if_none_match=True)
        (folder / name).unlink()
    back = root / "reference"
    back.mkdir()
    for name in names:
        (back / name).write_bytes(store.get(f"sr/{server}/{name}"))
    return flatten(back / "top.vhd"), [f"sr/{server}/{name}" for name in names]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_test_env: None, moto_endpoint: str) -> Iterator[Env]:
    bucket = f"coalesce-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    store_url = f"s3://{bucket}/cloud"
    state_path = tmp_path / "state.sqlite3"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("IMAGING_STORE", store_url)
    monkeypatch.setenv("IMAGING_STATE", f"sqlite:///{state_path}")
    monkeypatch.delenv("IMAGING_DISKS", raising=False)
    store = open_object_store(store_url, endpoint_url=moto_endpoint)
    expected, layers = build_in_store(tmp_path, store, "web1")
    state = SqliteStateStore(state_path)
    state.put_server(Server(id="web1", tenant="acme", name="web1", disk=layers[0], created_at=datetime.now(UTC)))
    yield Env(tmp_path, store, state, expected, layers)
    state.close()


class Faulty:
    """Delegates to `inner`, raising once at the `nth` call of `operation`; counts every call."""

    def __init__(self, inner: object, operation: str | None = None, nth: int = 1) -> None:
        self._inner = inner
        self._operation = operation
        self._nth = nth
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == self._operation and self.calls[name] == self._nth:
                raise RuntimeError(f"injected failure in {name} #{self._nth}")
            return attribute(*args, **kwargs)

        return call


def services_with(env: Env, store: object | None = None, state: object | None = None) -> ImagingServices:
    return ImagingServices(
        store=cast(ObjectStore, store if store is not None else env.store),
        state=cast(StateStore, state if state is not None else env.state),
    )


def content_now(env: Env) -> tuple[bytes, int]:
    """The flattened content of the server's chain as its record says now, and its depth."""
    server = env.state.get_server("web1")
    chain = vhdcore.open_chain_from(
        StoreLayerReader(env.store), server.disk, layers=list(server.chain) if server.chain else None
    )
    return chain.read(0, chain.virtual_size), chain.depth


def coalesce_fully(services: ImagingServices) -> list[int]:
    depths = []
    while (step := merge_step(services, "web1")).merged:
        depths.append(step.depth)
    return depths


def test_a_chain_in_s3_is_coalesced_by_new_objects_and_a_record_swap(env: Env) -> None:
    counting = Faulty(env.store)

    depths = coalesce_fully(services_with(env, store=counting))

    assert depths == [3, 2]
    content, depth = content_now(env)
    assert (content == env.expected, depth) == (True, 2)
    server = env.state.get_server("web1")
    assert server.chain is not None and server.chain[0] == env.layers[0] and server.garbage == ()
    # The merged layers are gone, the leaf untouched; only the record's layers remain; nothing half-uploaded.
    assert sorted(info.key for info in env.store.list_objects("sr/")) == sorted(server.chain)
    assert env.store.list_multipart_uploads() == []
    assert counting.calls["upload_part_copy"] >= 1  # the base's long unchanged runs were copied inside the store
    assert counting.calls["upload_part"] >= 1
    # The merged base is a standalone dynamic VHD that qemu-img reads (through the layer's own checks in vhdcore).
    base = vhdcore.open_chain_from(StoreLayerReader(env.store), server.chain[-1])
    assert base.depth == 1 and base.leaf.disk_type == "dynamic"


FAULTS = [
    ("create_multipart", 1),
    ("replace_server", 1),  # recording the merge before its upload
    ("upload_part", 1),
    ("upload_part_copy", 1),
    ("complete_multipart", 1),
    ("replace_server", 2),  # the record swap
    ("delete", 1),  # deleting the merged layers after the swap
    ("replace_server", 3),  # clearing the garbage after the deletes
    ("upload_part", 2),  # the second merge's upload
    ("complete_multipart", 2),
]


@pytest.mark.parametrize(("operation", "nth"), FAULTS)
def test_a_failure_at_any_step_leaves_the_chain_whole_and_the_next_slice_finishes(
    env: Env, operation: str, nth: int
) -> None:
    on_store = operation != "replace_server"
    faulty = Faulty(env.store if on_store else env.state, operation, nth)
    services = services_with(env, store=faulty) if on_store else services_with(env, state=faulty)

    with pytest.raises(RuntimeError, match="injected failure"):
        coalesce_fully(services)

    content, depth = content_now(env)
    assert content == env.expected, "the chain reads the same after the failure"
    assert depth in (2, 3, 4)
    server = env.state.get_server("web1")
    layers = set(server.chain or env.layers)
    assert layers <= {info.key for info in env.store.list_objects("sr/")}, "every layer of the record exists"

    coalesce_fully(services_with(env))

    content, depth = content_now(env)
    assert (content == env.expected, depth) == (True, 2)
    server = env.state.get_server("web1")
    assert server.garbage == ()
    assert env.store.list_multipart_uploads() == []
    assert server.merging is None
    # Nothing is orphaned: a merged object completed but never swapped in is taken up by the next slice.
    assert {info.key for info in env.store.list_objects("sr/")} == set(server.chain or ())


class Ticks:
    """A monotonic clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_slices_out_of_time_resume_the_merge_without_resending_a_part(env: Env) -> None:
    # The same chain for a second server: one merges in unbounded slices, the other in slices of 2.5 ticks.
    (env.root / "web2").mkdir()
    expected2, layers2 = build_in_store(env.root / "web2", env.store, "web2")
    env.state.put_server(Server(id="web2", tenant="acme", name="web2", disk=layers2[0], created_at=datetime.now(UTC)))
    whole = Faulty(env.store)
    coalesce_fully(services_with(env, store=whole))
    sent_at_once = whole.calls["upload_part"] + whole.calls["upload_part_copy"]

    counting = Faulty(env.store)
    services = ImagingServices(store=cast(ObjectStore, counting), state=env.state, monotonic=Ticks())
    slices, unfinished = 0, 0
    while not (step := merge_step(services, "web2", budget_s=2.5)).finished:
        slices += 1
        unfinished += not step.merged
        assert slices < 50
    assert unfinished >= 2, "the budget never ran out: the test proves nothing"
    # Every part went once: as many as the unbounded merges sent, none again after a slice stopped.
    assert counting.calls["upload_part"] + counting.calls["upload_part_copy"] == sent_at_once
    server = env.state.get_server("web2")
    assert server.merging is None and server.chain is not None and len(server.chain) == 2
    assert env.store.list_multipart_uploads() == []
    assert {info.key for info in env.store.list_objects("sr/web2/")} == set(server.chain)
    chain = vhdcore.open_chain_from(StoreLayerReader(env.store), server.disk, layers=list(server.chain))
    assert chain.read(0, chain.virtual_size) == expected2


def test_layers_another_server_names_are_not_merged(env: Env) -> None:
    env.state.put_server(
        Server(id="web2", tenant="acme", name="web2", disk=env.layers[3], created_at=datetime.now(UTC))
    )  # another server runs on the base (a shared golden disk): nothing is merged into it

    depths = coalesce_fully(services_with(env))

    assert depths == [3]  # the leaf's layer merged into the middle one, never the middle into the base
    content, _ = content_now(env)
    assert content == env.expected
    assert env.store.head(env.layers[3]).size > 0


def test_parts_are_copies_of_long_runs_and_uploads_of_the_rest() -> None:
    min_part = 5
    segments: list[tuple[str, int, int, int | None, bytes | None]] = [
        ("bytes", 0, 2, None, b"ab"),
        ("copy", 2, 20, None, None),
        ("block", 22, 3, 7, None),
        ("copy", 25, 4, None, None),
        ("copy", 29, 12, None, None),
        ("bytes", 41, 1, None, b"z"),
    ]
    parts = plan_parts(segments, min_part=min_part, upload_part=8, max_copy=9)
    sizes = []
    for part in parts:
        if hasattr(part, "pieces"):
            sizes.append(sum(len(p) if isinstance(p, bytes) else p.length for p in part.pieces))
        else:
            sizes.append(part.length)
    assert sum(sizes) == 42
    assert all(size >= min_part for size in sizes[:-1])
    kinds = ["upload" if hasattr(part, "pieces") else "copy" for part in parts]
    assert kinds.count("copy") >= 2 and kinds[0] == "upload"


def test_the_workflow_coalesces_a_chain_in_s3_before_imaging_it(env: Env, qemu_img: str, zstd_exe: str) -> None:
    body = {"job_id": "job-c1", "image_id": "img-c1", "tenant": "acme", "name": "c1", "server_id": "web1"}
    with LocalImaging() as workflow:
        result = workflow.run(body, timeout_s=TIMEOUT_S)

    assert result.succeeded, (result.error, result.cause)
    assert result.states_entered().count("Coalesce") == 3  # two merges, then nothing left
    server = env.state.get_server("web1")
    assert server.chain is not None and len(server.chain) == 3  # the new leaf, the merged leaf, the merged base
    content, _ = content_now(env)
    assert content == env.expected
    compressed = env.root / "image.vhd.zst"
    compressed.write_bytes(env.store.get("images/img-c1/image.vhd.zst"))
    subprocess.run(["zstd", "-d", "-q", "-f", str(compressed), "-o", str(env.root / "image.vhd")], check=True)
    raw = env.root / "image.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(env.root / "image.vhd"), str(raw)], check=True)
    assert raw.read_bytes() == env.expected
