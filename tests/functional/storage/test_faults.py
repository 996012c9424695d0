"""Faults: a proxy that fails or cuts 10% of part uploads, and an uploading process SIGKILLed at seeded points."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from functions.storage import ObjectNotFoundError, ObjectStore, open_object_store
from functions.storage.parts import plan_fixed_parts
from functions.storage.retry import RetryPolicy
from functions.storage.upload import UploadOptions, find_resumable_upload, upload_file

from .conftest import new_bucket, s3_client
from .faulty_proxy import FaultPlan, faulty_proxy
from .wrappers import HookedStore

MiB = 1024**2
REPO = Path(__file__).resolve().parents[3]
CHILD = Path(__file__).with_name("upload_child.py")
KILL_RUNS = 20


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_uploads_complete_exactly_through_a_proxy_failing_ten_percent_of_parts(
    moto_endpoint: str, aws_test_env: None, make_file: Callable[[int, int], Path]
) -> None:
    plan = FaultPlan(window=10, seed=2024)
    direct = s3_client(moto_endpoint)
    bucket = new_bucket(direct)
    delays: list[float] = []
    with faulty_proxy(moto_endpoint, plan) as proxy_url:
        # botocore's own retries off: every injected fault reaches the uploader's retry loop
        store = open_object_store(f"s3://{bucket}", s3_client=s3_client(proxy_url, attempts=1))
        options = UploadOptions(concurrency=3, retry=RetryPolicy(attempts=10), sleep=delays.append, seed=1)
        for index in range(6):
            path = make_file(38 * MiB + index * 4099, 100 + index)
            key = f"images/{index}/image.vhd.zst"
            result = upload_file(store, path, key, plan_fixed_parts(path.stat().st_size, 5 * MiB), options=options)
            body = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == sha256_file(path)
            assert result.verification.size == path.stat().st_size
    faults = sum(plan.injected.values())
    assert plan.seen // 10 <= faults <= plan.seen // 10 + 1 and faults >= 5, plan.injected  # ~10% of part requests
    assert set(plan.injected) == {"500", "cut-before", "cut-after"}, plan.injected
    assert len(delays) >= sum(plan.injected.values())  # every fault was retried after a backoff
    assert direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.fixture(scope="module")
def kill_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 parts of 5 MiB and a short last one."""
    path = tmp_path_factory.mktemp("kill") / "image.bin"
    path.write_bytes(random.Random(99).randbytes(31 * MiB + 777))
    return path


@dataclass
class KillTarget:
    store: ObjectStore
    child_args: dict[str, object]
    proxy: FaultPlan | None
    """S3 only: the child talks through a relaying proxy, so the test can wait until the server has answered
    every request the killed child managed to send (it may still complete a part or the upload after the kill)."""


@pytest.fixture(params=["file", "s3-server"])
def kill_target(request: pytest.FixtureRequest, tmp_path: Path, aws_test_env: None) -> Iterator[KillTarget]:
    if request.param == "file":
        url = (tmp_path / "store").as_uri()
        yield KillTarget(open_object_store(url), {"store": url, "endpoint": None}, None)
        return
    endpoint = request.getfixturevalue("moto_endpoint")
    client = s3_client(endpoint)
    url = f"s3://{new_bucket(client)}/kills"
    relay = FaultPlan(window=None)
    with faulty_proxy(endpoint, relay) as proxy_url:
        yield KillTarget(open_object_store(url, s3_client=client), {"store": url, "endpoint": proxy_url}, relay)


class PartialObjectWatcher:
    """Reads the final key's metadata over and over while the child runs; records any size other than the full one."""

    def __init__(self, store: ObjectStore, key: str, full_size: int) -> None:
        self.store, self.key, self.full_size = store, key, full_size
        self.stop = threading.Event()
        self.bad_sizes: list[int] = []
        self.reads = 0
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                size = self.store.head(self.key).size
            except ObjectNotFoundError:
                size = None
            self.reads += 1
            if size is not None and size != self.full_size:
                self.bad_sizes.append(size)

    def __enter__(self) -> PartialObjectWatcher:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("seed", range(KILL_RUNS))
def test_killed_upload_resumes_without_resending_stored_parts(
    seed: int, kill_target: KillTarget, kill_file: Path
) -> None:
    store = kill_target.store
    key = f"images/{seed}/image.vhd.zst"
    size = kill_file.stat().st_size
    plan = plan_fixed_parts(size, 5 * MiB)
    args = {**kill_target.child_args, "key": key, "path": str(kill_file), "part_size": 5 * MiB, "concurrency": 2}
    # events the child prints: phase created, one progress line per part, completing, verifying, done, result
    events = 1 + len(plan) + 4
    kill_after = random.Random(seed).randrange(0, events)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    with PartialObjectWatcher(store, key, size) as watcher:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(args)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert child.stdout is not None
        seen = [child.stdout.readline() for _ in range(kill_after)]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        if kill_target.proxy is not None:
            assert kill_target.proxy.wait_idle(timeout=60)
    assert watcher.bad_sizes == [], f"a partial object was visible under {key}"
    assert watcher.reads > 0
    assert child.returncode in (-signal.SIGKILL, 0), seen

    upload_id = find_resumable_upload(store, key)
    try:
        present = store.head(key).size
    except ObjectNotFoundError:
        present = None
    assert present in (None, size)
    stored = {part.number for part in store.list_parts(key, upload_id)} if upload_id else set()

    counting = HookedStore(store)
    if upload_id is None and present == size:
        pass  # the child completed before the kill
    else:
        result = upload_file(counting, kill_file, key, plan, upload_id=upload_id, options=UploadOptions(concurrency=2))
        assert {p.number for p in result.parts if not p.sent} >= stored
    assert not set(counting.part_calls) & stored, "a part listed as stored was sent again"
    assert set(counting.part_calls) <= {p.number for p in plan} - stored
    assert hashlib.sha256(store.get(key)).hexdigest() == sha256_file(kill_file)
    assert find_resumable_upload(store, key) is None
