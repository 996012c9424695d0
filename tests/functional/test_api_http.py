"""The HTTP API through real HTTP against `imaging serve` (embedded default: files, SQLite, the ASL in-process)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import vhdcore
from functions.state import open_state_store
from tests.support.api_server import MIB, imaging, make_chain, new_token, register, serving

pytestmark = pytest.mark.functional


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]
    """Names in lower case (HTTP header names are case-insensitive)."""


def _lower(headers: Any) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in headers.items()}


@dataclass
class Api:
    url: str
    data_dir: Path
    tokens: dict[str, str]
    servers: dict[str, Path]

    def call(
        self,
        method: str,
        path: str,
        *,
        tenant: str | None = "alpha",
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if tenant is not None:
            request.add_header("Authorization", f"Bearer {self.tokens[tenant]}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                status, text, got = answer.status, answer.read().decode(), _lower(answer.headers)
        except urllib.error.HTTPError as error:
            status, text, got = error.code, error.read().decode(), _lower(error.headers)
        return Reply(status, json.loads(text) if text else None, got)

    def server_free(self, server_id: str) -> bool:
        """Whether the server's imaging lock is free (Finalize stores the image ACTIVE a moment before it releases
        the lock: a create sent at once could still get 409)."""
        state = open_state_store(f"sqlite:///{self.data_dir / 'state.sqlite3'}")
        try:
            return state.get_lock(server_id) is None
        finally:
            state.close()

    def wait_image(self, image_id: str, tenant: str = "alpha", timeout_s: float = 300) -> dict[str, Any]:
        """Poll the image (as a client would) until it is ACTIVE or ERROR and its server free again."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.call("GET", f"/v1/images/{image_id}", tenant=tenant)
            assert reply.status == 200, reply.body
            if reply.body["status"] in ("ACTIVE", "ERROR") and self.server_free(reply.body["server_id"]):
                return dict(reply.body)
            assert time.monotonic() < deadline, f"image {image_id} still {reply.body['status']}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("api")
    data_dir = root / "data"
    tokens = {tenant: new_token(data_dir, tenant) for tenant in ("alpha", "beta")}
    servers = {"web": make_chain(root / "disks" / "web", 1), "db": make_chain(root / "disks" / "db", 2)}
    register(data_dir, "web", "alpha", servers["web"])
    register(data_dir, "db", "beta", servers["db"])
    with serving(data_dir) as served:
        yield Api(served.url, data_dir, tokens, servers)


def test_requests_without_a_known_bearer_token_are_refused(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer cimg_not-a-token"}, {"Authorization": "Basic eDp5"}):
        reply = api.call("GET", "/v1/servers/web/images", tenant=None, headers=headers)
        assert reply.status == 401
        assert reply.body["error"] == "UNAUTHORIZED" and "imaging token create" in reply.body["hint"]
        assert reply.headers.get("www-authenticate") == "Bearer"


def test_an_image_goes_to_active_and_holds_the_flattened_disk(api: Api, tmp_path: Path, qemu_img: str) -> None:
    estimate = api.call("GET", "/v1/servers/web/image-estimate")
    assert estimate.status == 200, estimate.body
    assert (
        estimate.body["estimated_size_low"] <= estimate.body["estimated_size"] <= estimate.body["estimated_size_high"]
    )

    created = api.call("POST", "/v1/servers/web/images", body={"name": "before upgrade"})
    assert created.status == 202, created.body
    assert (
        created.body["status"] == "QUEUED"
        and created.body["progress"] == 0
        and created.body["name"] == "before upgrade"
    )
    image = api.wait_image(created.body["id"])
    assert image["status"] == "ACTIVE", image
    assert image["progress"] == 100 and image["compressed_size"] > 0 and image["virtual_size"] == 32 * MIB
    assert [i["id"] for i in api.call("GET", "/v1/servers/web/images").body["images"]].count(image["id"]) == 1

    # The object is the image format of DESIGN §5: zstd -d gives a VHD qemu-img reads as the flattened chain.
    stored = Path(image["object_url"].removeprefix("file://"))
    subprocess.run(["zstd", "-q", "-d", str(stored), "-o", str(tmp_path / "image.vhd")], check=True)
    subprocess.run(
        [qemu_img, "convert", "-f", "vpc", "-O", "raw", str(tmp_path / "image.vhd"), str(tmp_path / "a.raw")],
        check=True,
    )
    vhdcore.open_chain(str(api.servers["web"])).export(str(tmp_path / "b.raw"), "raw")
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()

    assert api.call("DELETE", f"/v1/images/{image['id']}").status == 204
    assert api.call("GET", f"/v1/images/{image['id']}").status == 404
    assert not stored.exists()


def test_another_tenants_resources_answer_404(api: Api) -> None:
    mine = api.call("POST", "/v1/servers/db/images", tenant="beta")
    assert mine.status == 202, mine.body
    api.wait_image(mine.body["id"], tenant="beta")
    probes = [
        ("GET", f"/v1/images/{mine.body['id']}", None),
        ("DELETE", f"/v1/images/{mine.body['id']}", None),
        ("GET", "/v1/servers/db/images", None),
        ("POST", "/v1/servers/db/images", {}),
        ("GET", "/v1/servers/db/image-estimate", None),
        ("PUT", "/v1/servers/db/image-schedule", {"frequency": "daily", "at": "01:00"}),
        ("GET", "/v1/servers/db/image-schedule", None),
        ("DELETE", "/v1/servers/db/image-schedule", None),
    ]
    for method, path, body in probes:
        reply = api.call(method, path, tenant="alpha", body=body)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.body["error"] == "NOT_FOUND"
    # ... and the same answer as for ids that do not exist at all.
    assert api.call("GET", "/v1/images/img-nonexistent").body == {
        "error": "NOT_FOUND",
        "message": "no image 'img-nonexistent'",
        "hint": "GET /v1/servers/{server_id}/images lists a server's images",
    }
    assert api.call("GET", f"/v1/images/{mine.body['id']}", tenant="beta").status == 200


def test_a_second_request_while_the_server_is_imaged_is_409_with_the_running_job(api: Api) -> None:
    state = open_state_store(f"sqlite:///{api.data_dir / 'state.sqlite3'}")
    assert state.acquire_lock("web", "job-running-elsewhere", 600)
    try:
        reply = api.call("POST", "/v1/servers/web/images")
        assert reply.status == 409
        assert reply.body["error"] == "SERVER_BUSY" and reply.body["job_id"] == "job-running-elsewhere"
    finally:
        assert state.release_lock("web", "job-running-elsewhere")


def test_idempotency_key_same_body_same_image_other_body_422(api: Api) -> None:
    key = {"Idempotency-Key": "nightly-2026-11-25"}
    first = api.call("POST", "/v1/servers/web/images", body={"name": "n1"}, headers=key)
    again = api.call("POST", "/v1/servers/web/images", body={"name": "n1"}, headers=key)
    assert first.status == again.status == 202
    assert again.body["id"] == first.body["id"]
    other = api.call("POST", "/v1/servers/web/images", body={"name": "n2"}, headers=key)
    assert other.status == 422 and other.body["error"] == "IDEMPOTENCY_KEY_REUSED"
    api.wait_image(first.body["id"])


def test_twenty_concurrent_identical_requests_make_one_image(api: Api) -> None:
    before = {i["id"] for i in api.call("GET", "/v1/servers/web/images").body["images"]}
    start = threading.Barrier(20)
    replies: list[Reply] = []
    lock = threading.Lock()

    def post() -> None:
        start.wait(timeout=60)
        reply = api.call("POST", "/v1/servers/web/images", body={"name": "burst"}, headers={"Idempotency-Key": "burst"})
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert len(replies) == 20
    assert {r.status for r in replies} == {202}, [r.body for r in replies if r.status != 202]
    assert len({r.body["id"] for r in replies}) == 1
    after = {i["id"] for i in api.call("GET", "/v1/servers/web/images").body["images"]}
    assert after - before == {replies[0].body["id"]}
    api.wait_image(replies[0].body["id"])


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "code"),
    [
        ("GET", "/v1/images/bad.id", None, 400, "INVALID_ID"),
        ("GET", "/v1/servers/%2E%2E/images", None, 400, "INVALID_ID"),
        ("POST", "/v1/servers/web/images", b'{"name": "x", "extra": 1}', 422, None),
        ("POST", "/v1/servers/web/images", b"not json", 422, None),
        ("PUT", "/v1/servers/web/image-schedule", b'{"frequency": "daily", "at": "25:00"}', 422, None),
        ("PUT", "/v1/servers/web/image-schedule", b'{"frequency": "weekly", "at": "02:00"}', 400, "INVALID_SCHEDULE"),
        ("POST", "/v1/servers/web/images", b'{"name": "' + b"x" * 20_000 + b'"}', 413, "BODY_TOO_LARGE"),
        ("GET", "/v1/nothing-here", None, 404, "NO_SUCH_ROUTE"),
    ],
)
def test_bad_requests_get_typed_answers(
    api: Api, method: str, path: str, payload: bytes | None, status: int, code: str | None
) -> None:
    reply = api.call(method, path, raw=payload)
    assert reply.status == status, reply.body
    if code is not None:
        assert reply.body["error"] == code


def test_schedule_set_show_delete(api: Api) -> None:
    put = api.call(
        "PUT",
        "/v1/servers/web/image-schedule",
        body={"frequency": "weekly", "weekday": "Sunday", "at": "03:30", "retention": 4},
    )
    assert put.status == 200, put.body
    assert put.body | {"last_window_started": None, "next_run": None} == {
        "server_id": "web",
        "frequency": "weekly",
        "at": "03:30",
        "weekday": "sunday",
        "retention": 4,
        "last_window_started": None,
        "next_run": None,
    }
    next_run = datetime.fromisoformat(put.body["next_run"])
    assert next_run.weekday() == 6 and (next_run.hour, next_run.minute) == (3, 30)
    assert timedelta(0) < next_run - datetime.now(UTC) <= timedelta(days=7)
    assert api.call("GET", "/v1/servers/web/image-schedule").body == put.body
    shown = imaging(api.data_dir, "schedule", "show", "web", "--json")
    assert json.loads(shown.stdout)[0]["weekday"] == "sunday"
    assert datetime.fromisoformat(json.loads(shown.stdout)[0]["next_run"]) == next_run
    assert api.call("DELETE", "/v1/servers/web/image-schedule").status == 204
    assert api.call("GET", "/v1/servers/web/image-schedule").status == 404


def test_openapi_is_served_and_describes_every_route(api: Api) -> None:
    reply = api.call("GET", "/v1/openapi.json", tenant=None)
    assert reply.status == 200
    paths = reply.body["paths"]
    assert set(paths) >= {
        "/v1/servers",
        "/v1/servers/{server_id}",
        "/v1/health",
        "/v1/servers/{server_id}/images",
        "/v1/images/{image_id}",
        "/v1/servers/{server_id}/image-estimate",
        "/v1/servers/{server_id}/image-schedule",
    }
    assert set(paths["/v1/servers/{server_id}/image-schedule"]) == {"put", "get", "delete"}


def test_an_image_restored_over_the_api_is_a_new_server_with_the_images_content(
    api: Api, tmp_path: Path, qemu_img: str
) -> None:
    created = api.call("POST", "/v1/servers/web/images", body={"name": "to restore"})
    assert created.status == 202, created.body
    image = api.wait_image(created.body["id"])
    assert image["status"] == "ACTIVE", image

    restored = api.call("POST", f"/v1/images/{image['id']}/restore", body={"server": "web-restored"})

    assert restored.status == 201, restored.body
    assert restored.headers["location"] == "/v1/servers/web-restored"
    manifest = json.loads(Path(image["object_url"].removeprefix("file://")).with_name("manifest.json").read_text())
    assert restored.body["content_sha256"] == manifest["content_sha256"]
    assert api.call("GET", "/v1/servers/web-restored").status == 200
    # The new server's disk, read by qemu-img, is the source chain flattened.
    state = open_state_store(f"sqlite:///{api.data_dir / 'state.sqlite3'}")
    try:
        disk = Path(state.get_server("web-restored").disk)
        source = state.get_server("web").disk  # its chain now (imaging coalesces and snapshots it; nothing writes)
    finally:
        state.close()
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(disk), str(tmp_path / "a.raw")], check=True)
    vhdcore.open_chain(source).export(str(tmp_path / "b.raw"), "raw")
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()

    again = api.call("POST", f"/v1/images/{image['id']}/restore", body={"server": "web-restored"})
    assert again.status == 409 and again.body["error"] == "SERVER_EXISTS", again.body
    other = api.call("POST", f"/v1/images/{image['id']}/restore", tenant="beta", body={"server": "stolen"})
    assert other.status == 404, other.body
    bad = api.call("POST", f"/v1/images/{image['id']}/restore", body={"server": "../etc"})
    assert bad.status == 400 and bad.body["error"] == "INVALID_ID", bad.body


def test_cancelling_an_image_whose_job_has_ended_changes_nothing(api: Api) -> None:
    created = api.call("POST", "/v1/servers/web/images", body={"name": "done already"})
    image = api.wait_image(created.body["id"])

    cancelled = api.call("POST", f"/v1/images/{image['id']}/cancel")

    assert cancelled.status == 200, cancelled.body
    assert cancelled.body["requested"] is False and cancelled.body["cancelled"] is False
    assert cancelled.body["status"] == "ACTIVE"
    assert api.call("GET", f"/v1/images/{image['id']}").body["status"] == "ACTIVE"
    assert api.call("POST", "/v1/images/img-nope/cancel").status == 404
    assert api.call("POST", f"/v1/images/{image['id']}/cancel", tenant="beta").status == 404


def test_all_blocks_in_the_body_images_every_block_and_the_job_records_it(api: Api) -> None:
    state = open_state_store(f"sqlite:///{api.data_dir / 'state.sqlite3'}")
    for body, mode in (({"name": "every block", "all_blocks": True}, "all_blocks"), ({"name": "live"}, "live")):
        created = api.call("POST", "/v1/servers/web/images", body=body)
        assert created.status == 202, created.body
        api.wait_image(created.body["id"])
        assert state.get_job(created.body["job_id"]).all_blocks is (mode == "all_blocks")
        assert (state.get_image(created.body["id"]).manifest or {})["live_data"]["mode"] == mode
    wrong = api.call("POST", "/v1/servers/web/images", body={"all_blocks": "sometimes"})
    assert wrong.status == 422, wrong.body
