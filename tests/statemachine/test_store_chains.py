"""A server whose VHD chain lives in the object store (S3 in a moto server), imaged by the real ASL on the embedded
engine with the real handlers: its layers are read by ranged GETs, its new leaf written as a new object.

References: the image is checked with `zstd -d` and `qemu-img convert -f vpc -O raw` against the chain read back
from moto and flattened by tests/support/pyvhd (independent of vhdcore); state is read back from real SQLite.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

import vhdcore
from functions.imaging.store_chains import StoreLayerReader, disk_location, relative_key
from functions.state import Server, SqliteStateStore
from functions.storage import ObjectStore, open_object_store
from statemachine.local import LocalImaging
from tests.support.files import content_tree_sha256
from tests.support.pyvhd import flatten
from tests.support.workflow import DISK_SIZE, TIMEOUT_S, build_sample_chain, configure_workflow

MIB = 1024**2
LAYERS = ("base.vhd", "middle.vhd", "leaf.vhd")


@dataclass(frozen=True)
class S3Env:
    root: Path
    store: ObjectStore
    """Images and staging."""
    disks: ObjectStore
    """Server disks (`sr/...`): the store itself, or a bucket of their own (IMAGING_DISKS), as on AWS."""
    disks_url: str
    state: SqliteStateStore
    tag: str
    """Unique per test: job ids carry it."""

    def job(self, name: str) -> str:
        return f"{name}-{self.tag}"


@pytest.fixture(params=["disks-in-store", "disks-bucket"])
def s3env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aws_test_env: None,
    moto_endpoint: str,
) -> Iterator[S3Env]:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"img-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=bucket)
    store_url = f"s3://{bucket}/cloud"
    disks_url = store_url
    if request.param == "disks-bucket":
        disks_url = f"s3://disks-{uuid.uuid4().hex[:20]}"
        client.create_bucket(Bucket=disks_url.removeprefix("s3://"))
        monkeypatch.setenv("IMAGING_DISKS", disks_url)
    else:
        monkeypatch.delenv("IMAGING_DISKS", raising=False)
    state_path = tmp_path / "state.sqlite3"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    configure_workflow(monkeypatch, store_url, state_path)
    state = SqliteStateStore(state_path)
    store = open_object_store(store_url, endpoint_url=moto_endpoint)
    disks = open_object_store(disks_url, endpoint_url=moto_endpoint)
    yield S3Env(tmp_path, store, disks, disks_url, state, uuid.uuid4().hex[:8])
    state.close()


def upload_chain(env: S3Env, server: str) -> dict[str, str]:
    """A depth-3 chain built locally, uploaded under sr/<server>/ (the local copy is then removed); returns the
    layers' ETags by key."""
    folder = env.root / "built"
    build_sample_chain(folder)
    etags = {}
    for name in LAYERS:
        key = f"sr/{server}/{name}"
        etags[key] = env.disks.put(key, (folder / name).read_bytes(), if_none_match=True).etag
        (folder / name).unlink()
    return etags


def download(env: S3Env, keys: list[str], folder: Path) -> Path:
    """The objects as files named by the keys' last segment (locators are relative: the chain reads as stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (folder / key.rsplit("/", 1)[-1]).write_bytes(env.disks.get(key))
    return folder / keys[0].rsplit("/", 1)[-1]


def image_raw(env: S3Env, image_id: str) -> bytes:
    compressed = env.root / f"{image_id}.vhd.zst"
    compressed.write_bytes(env.store.get(f"images/{image_id}/image.vhd.zst"))
    vhd, raw = env.root / f"{image_id}.vhd", env.root / f"{image_id}.raw"
    subprocess.run(["zstd", "-d", "-q", "-f", str(compressed), "-o", str(vhd)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(raw)], check=True)
    return raw.read_bytes()


def register(env: S3Env, server: str, disk: str) -> None:
    env.state.put_server(Server(id=server, tenant="acme", name=server, disk=disk, created_at=datetime.now(UTC)))


def run(job: str, server: str, overrides: dict[str, Callable[[Any, Any], Any]] | None = None) -> Any:
    """Image `server` as job `job` (image `img-<job>`); job ids must be unique in the session (the engine's
    executions are named by them)."""
    body = {"job_id": job, "image_id": f"img-{job}", "tenant": "acme", "name": job, "server_id": server}
    with LocalImaging(overrides) as workflow:
        return workflow.run(body, timeout_s=TIMEOUT_S)


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Every test here checks images with the outside tools."""


def recorded_chain(env: S3Env, server: str) -> vhdcore.Chain:
    """The server's chain as its record in state lists it."""
    record = env.state.get_server(server)
    layers = list(record.chain) if record.chain else None
    return vhdcore.open_chain_from(StoreLayerReader(env.disks), record.disk, layers=layers)


def test_a_server_whose_chain_is_in_s3_is_coalesced_snapshotted_and_imaged(s3env: S3Env) -> None:
    etags = upload_chain(s3env, "web1")
    layer_keys = [f"sr/web1/{name}" for name in reversed(LAYERS)]  # leaf first
    expected = flatten(download(s3env, layer_keys, s3env.root / "reference"))
    register(s3env, "web1", "sr/web1/leaf.vhd")
    assert list(s3env.root.glob("built/*.vhd")) == []  # nothing local: the workflow has only the store

    result = run(s3env.job("job1"), "web1")

    assert result.succeeded, (result.error, result.cause)
    assert image_raw(s3env, "img-" + s3env.job("job1")) == expected
    manifest = json.loads(s3env.store.get(f"images/img-{s3env.job('job1')}/manifest.json"))
    assert manifest["content_sha256"] == content_tree_sha256(expected, manifest["chunk_size"])
    assert manifest["virtual_size"] == DISK_SIZE
    # Coalesce merged the middle layer into the base as a new object before the snapshot: the frozen chain is
    # the leaf over that object.
    frozen = [layer["path"] for layer in manifest["source_chain"]]
    assert len(frozen) == 2 and frozen[0] == "sr/web1/leaf.vhd" and frozen[1] not in etags
    # The server runs on a new object: an empty child of the frozen leaf; its record lists the whole chain.
    record = s3env.state.get_server("web1")
    new_leaf = record.disk
    assert new_leaf.startswith("sr/web1/") and new_leaf not in etags
    assert record.chain == (new_leaf, *frozen)
    chain = recorded_chain(s3env, "web1")
    assert chain.layers[0].allocated_blocks == 0
    assert chain.layers[0].parent_uuid == chain.layers[1].uuid
    assert chain.read(0, chain.virtual_size) == expected
    # The frozen leaf is unchanged, the merged layers are gone, and nothing is left in staging.
    assert s3env.disks.head("sr/web1/leaf.vhd").etag == etags["sr/web1/leaf.vhd"]
    assert [info.key for info in s3env.disks.list_objects("sr/")] == sorted(record.chain)
    assert list(s3env.store.list_objects("staging/")) == []
    assert s3env.store.list_multipart_uploads() == []
    assert s3env.disks.list_multipart_uploads() == []
    assert s3env.state.get_lock("web1") is None
    assert list(s3env.store.list_objects(f"images/img-{s3env.job('job1')}/"))  # the image is in the images store

    # A second image coalesces the old leaf into the merged base and freezes the new leaf: the same content.
    second = run(s3env.job("job2"), "web1")
    assert second.succeeded, (second.error, second.cause)
    assert image_raw(s3env, "img-" + s3env.job("job2")) == expected
    assert recorded_chain(s3env, "web1").depth == 3
    assert recorded_chain(s3env, "web1").read(0, DISK_SIZE) == expected


def test_a_read_only_disk_in_s3_is_imaged_without_changing_its_objects(s3env: S3Env) -> None:
    """An unregistered chain (`--disk` a key) is neither coalesced nor snapshotted: its objects stay as they are."""
    etags = upload_chain(s3env, "web9")
    expected = flatten(download(s3env, [f"sr/web9/{name}" for name in reversed(LAYERS)], s3env.root / "reference"))
    body = {"job_id": s3env.job("job9"), "image_id": "img-" + s3env.job("job9"), "tenant": "acme", "name": "ro"}
    with LocalImaging() as workflow:
        result = workflow.run({**body, "disk": "sr/web9/leaf.vhd"}, timeout_s=TIMEOUT_S)

    assert result.succeeded, (result.error, result.cause)
    assert image_raw(s3env, "img-" + s3env.job("job9")) == expected
    assert {key: s3env.disks.head(key).etag for key in etags} == etags
    assert [info.key for info in s3env.disks.list_objects("sr/")] == sorted(etags)


def test_a_layer_lost_in_s3_inside_the_map_fails_with_disk_missing(s3env: S3Env) -> None:
    upload_chain(s3env, "web2")
    register(s3env, "web2", "sr/web2/leaf.vhd")
    from functions.handlers import estimate

    def estimate_then_lose_a_layer(event: Any, context: Any) -> Any:
        answer = estimate.handler(event, context)
        base = s3env.state.get_server("web2").chain
        assert base is not None  # recorded by the snapshot (after coalesce merged the middle into the base)
        s3env.disks.delete(base[-1])
        return answer

    result = run(s3env.job("job3"), "web2", {"EstimateFunctionArn": estimate_then_lose_a_layer})

    assert (result.status, result.error) == ("FAILED", "DISK_MISSING")
    job = s3env.state.get_job(s3env.job("job3"))
    assert job.error_code == "DISK_MISSING", job.history[-1].detail
    assert list(s3env.store.list_objects(f"staging/{s3env.job('job3')}/")) == []
    assert s3env.store.list_multipart_uploads() == []


def test_a_missing_or_corrupt_chain_in_s3_fails_the_job_with_its_code(s3env: S3Env) -> None:
    etags = upload_chain(s3env, "web3")
    register(s3env, "web3", "sr/web3/absent.vhd")
    missing = run(s3env.job("job4"), "web3")
    assert (missing.status, missing.error) == ("FAILED", "DISK_MISSING")

    middle = bytearray(s3env.disks.get("sr/web3/middle.vhd"))
    middle[512 + 36 : 512 + 40] = b"\xde\xad\xbe\xef"  # the dynamic header's checksum
    s3env.disks.put("sr/web3/middle.vhd", bytes(middle), if_match=etags["sr/web3/middle.vhd"])
    register(s3env, "web4", "sr/web3/leaf.vhd")
    corrupt = run(s3env.job("job5"), "web4")
    assert (corrupt.status, corrupt.error) == ("FAILED", "DISK_CORRUPT")
    assert "sr/web3/middle.vhd" in (s3env.state.get_job(s3env.job("job5")).history[-1].detail or "")


def test_imaging_server_add_takes_a_store_key_or_url_and_validates_it(
    s3env: S3Env, run_imaging: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    upload_chain(s3env, "web5")
    added = run_imaging("server", "add", "web5", "--disk", f"{s3env.disks_url}/sr/web5/leaf.vhd", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["disk"] == "sr/web5/leaf.vhd"
    by_key = run_imaging("server", "add", "web5", "--disk", "sr/web5/leaf.vhd", "--replace")
    assert by_key.returncode == 0, by_key.stderr
    assert "chain of 3" in by_key.stdout
    assert s3env.state.get_server("web5").disk == "sr/web5/leaf.vhd"
    # The same chain for a second server is refused (two servers on one chain corrupt each other).
    shared = run_imaging("server", "add", "web6", "--disk", "sr/web5/leaf.vhd")
    assert shared.returncode == 1 and "registered server web5's chain" in shared.stderr, shared.stderr

    outside = run_imaging("server", "add", "web7", "--disk", "s3://another-bucket/sr/web5/leaf.vhd")
    missing = run_imaging("server", "add", "web7", "--disk", "sr/web5/nope.vhd")
    escaping = run_imaging("server", "add", "web7", "--disk", "sr/../../leaf.vhd")
    for result, words in [(outside, "not inside the configured store"), (missing, "DISK_MISSING"), (escaping, "..")]:
        assert result.returncode == 1, (result.stdout, result.stderr)
        first = result.stderr.splitlines()[0]
        assert first.startswith("error: ") and words in first, result.stderr
        assert "Traceback" not in result.stderr


def test_store_locations_and_relative_names() -> None:
    class Store:
        url = "s3://bucket/cloud"

    store: Any = Store()
    assert disk_location(store, "s3://bucket/cloud/sr/a/leaf.vhd", local_exists=False) == "sr/a/leaf.vhd"
    assert disk_location(store, "sr/a/leaf.vhd", local_exists=False) == "sr/a/leaf.vhd"
    assert disk_location(store, "/srv/disks/leaf.vhd", local_exists=True) == "/srv/disks/leaf.vhd"
    assert relative_key("sr/a/leaf.vhd", "sr/a/next.vhd") == "./leaf.vhd"
    assert relative_key("images/golden/base.vhd", "sr/a/next.vhd") == "./../../images/golden/base.vhd"


def test_imaging_image_create_images_a_chain_in_s3_read_only(
    s3env: S3Env, run_imaging: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    etags = upload_chain(s3env, "web8")
    expected = flatten(download(s3env, [f"sr/web8/{name}" for name in reversed(LAYERS)], s3env.root / "reference"))

    created = run_imaging("image", "create", "--disk", "sr/web8/leaf.vhd", "--json")

    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    assert record["status"] == "ACTIVE"
    assert image_raw(s3env, record["id"]) == expected
    assert {key: s3env.disks.head(key).etag for key in etags} == etags
    assert [info.key for info in s3env.disks.list_objects("sr/")] == sorted(etags)  # no snapshot of a --disk
