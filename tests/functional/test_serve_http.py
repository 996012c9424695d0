"""`imaging serve` on waitress, over raw sockets: chunked and length-delimited bodies are validated and bounded
alike, a request hidden in a body is never executed, slow clients are cut off, SIGTERM stops the server promptly;
and the resolvers of concurrent requests never see each other's event."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from functions.api.app import RequestScopedResolver
from functions.state import Image, Status, open_state_store
from statemachine.engine import LocalLambdaContext
from statemachine.serve import make_server, proxy_event
from tests.support.api_server import Served, make_chain, new_token, register, serving

pytestmark = pytest.mark.functional

IMAGE = "img-keepme"


@dataclass
class Site:
    served: Served
    data_dir: Path
    token: str

    def connect(self) -> socket.socket:
        return socket.create_connection((self.served.host, self.served.port), timeout=20)

    def exchange(self, raw: bytes, *, may_reset: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
        """Send `raw` on a new connection, half-close it, and read every answer until the server closes it.

        `may_reset`: the server may close while bytes are still coming (a body refused before it was read), which
        resets the connection; the answers read until then are returned."""
        data = b""
        with self.connect() as sock:
            try:
                sock.sendall(raw)
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError:  # reset, broken pipe, not connected
                if not may_reset:
                    raise
        return parse_responses(data)

    def image_exists(self) -> bool:
        state = open_state_store(f"sqlite:///{self.data_dir / 'state.sqlite3'}")
        try:
            return any(image.id == IMAGE for image in state.list_images(server_id="web"))
        finally:
            state.close()


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses in `data` (each delimited by its Content-Length)."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        answers.append((status, headers, rest[:length]))
        data = rest[length:]
    return answers


def request(method: str, path: str, token: str, headers: list[str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Authorization: Bearer {token}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("serve")
    data_dir = root / "data"
    token = new_token(data_dir, "alpha")
    register(data_dir, "web", "alpha", make_chain(root / "disks" / "web", 1))
    state = open_state_store(f"sqlite:///{data_dir / 'state.sqlite3'}")
    state.put_image(
        Image(id=IMAGE, tenant="alpha", server_id="web", name="keep", status=Status.ERROR, created_at=datetime.now(UTC))
    )
    state.close()
    with serving(data_dir, "--client-timeout", "2") as served:
        yield Site(served, data_dir, token)


INVALID = b'{"frequency": "daily", "at": "25:00"}'
Answers = list[tuple[int, dict[str, str], bytes]]


def sent_both_ways(site: Site, method: str, path: str, body: bytes, piece: int) -> tuple[Answers, Answers]:
    """The answers to `body` sent with a Content-Length, and sent chunked in pieces of `piece` bytes."""
    json_type = "Content-Type: application/json"
    plain = site.exchange(request(method, path, site.token, [json_type, f"Content-Length: {len(body)}"], body))
    split = site.exchange(
        request(method, path, site.token, [json_type, "Transfer-Encoding: chunked"], chunked(body, piece))
    )
    return plain, split


def test_a_chunked_invalid_body_gets_the_same_422_as_a_length_delimited_one(site: Site) -> None:
    plain, split = sent_both_ways(site, "PUT", "/v1/servers/web/image-schedule", INVALID, 7)
    assert len(plain) == len(split) == 1
    assert plain[0][0] == split[0][0] == 422
    assert json.loads(plain[0][2]) == json.loads(split[0][2])
    assert json.loads(split[0][2])["error"] == "INVALID_REQUEST"
    # ... and valid ones are stored the same way.
    valid = b'{"frequency": "daily", "at": "02:30"}'
    plain, split = sent_both_ways(site, "PUT", "/v1/servers/web/image-schedule", valid, 5)
    assert plain[0][0] == split[0][0] == 200
    assert json.loads(plain[0][2])["at"] == json.loads(split[0][2])["at"] == "02:30"


def test_a_chunked_body_over_16_kib_gets_the_same_413_as_a_length_delimited_one(site: Site) -> None:
    size = 16 * 1024 + 1
    body = b'{"name": "' + b"x" * (size - 12) + b'"}'
    assert len(body) == size
    plain, split = sent_both_ways(site, "POST", "/v1/servers/web/images", body, 4096)
    assert plain[0][0] == split[0][0] == 413
    assert json.loads(plain[0][2]) == json.loads(split[0][2])
    assert json.loads(split[0][2])["error"] == "BODY_TOO_LARGE"


def test_a_body_of_exactly_16_kib_is_read_chunked_or_not(site: Site) -> None:
    # Just at the bound: not refused as too large by either framing (422: the name is longer than 255 characters).
    body = b'{"name": "' + b"x" * (16 * 1024 - 12) + b'"}'
    plain, split = sent_both_ways(site, "POST", "/v1/servers/web/images", body, 1000)
    assert plain[0][0] == split[0][0] == 422, (plain, split)


def test_a_far_too_large_body_is_not_read_whatever_its_framing(site: Site) -> None:
    """Past a hard bound (a few times 16 KiB) the server stops reading and closes: the client sees the same 413, or,
    still sending, a reset connection; either way nothing is created."""
    body = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    path = "/v1/servers/web/images"
    before = _image_count(site)
    for framing, payload in (([f"Content-Length: {len(body)}"], body), (["Transfer-Encoding: chunked"], chunked(body))):
        raw = request("POST", path, site.token, ["Content-Type: application/json", *framing], payload)
        answers = site.exchange(raw, may_reset=True)
        assert [(status, json.loads(out)["error"]) for status, _, out in answers] in ([], [(413, "BODY_TOO_LARGE")])
    assert _image_count(site) == before


def _image_count(site: Site) -> int:
    state = open_state_store(f"sqlite:///{site.data_dir / 'state.sqlite3'}")
    try:
        return len(state.list_images(server_id="web"))
    finally:
        state.close()


def smuggled_delete(token: str) -> bytes:
    return request("DELETE", f"/v1/images/{IMAGE}", token, ["Content-Length: 0"])


def test_a_request_hidden_in_a_chunked_get_body_is_never_executed(site: Site) -> None:
    hidden = smuggled_delete(site.token)
    answers = site.exchange(
        request("GET", "/v1/servers/web/images", site.token, ["Transfer-Encoding: chunked"], chunked(hidden))
    )
    assert [status for status, _, _ in answers] == [400], answers  # the body is refused; nothing else answered
    assert json.loads(answers[0][2])["error"] == "BODY_NOT_ALLOWED"
    assert site.image_exists()


@pytest.mark.parametrize(
    "framing",
    [
        # CL.TE: a proxy framing by Content-Length forwards the whole; framing by chunks ends at "0" and reads the
        # DELETE as the next request.
        lambda hidden: (["Content-Length: {n}", "Transfer-Encoding: chunked"], b"0\r\n\r\n" + hidden),
        # TE.CL: a proxy framing by chunks forwards the chunk holding the DELETE; by Content-Length it is a request.
        lambda hidden: (["Transfer-Encoding: chunked", "Content-Length: 4"], chunked(hidden)),
        # Obfuscated and doubled codings, and Transfer-Encoding on HTTP/1.0.
        lambda hidden: (["Transfer-Encoding: chunked, chunked"], b"0\r\n\r\n" + hidden),
        lambda hidden: (["Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n" + hidden),
        lambda hidden: (["Transfer-Encoding : chunked"], b"0\r\n\r\n" + hidden),
        lambda hidden: (["Content-Length: 5", "Content-Length: 0"], hidden),
    ],
    ids=["CL.TE", "TE.CL", "chunked-twice", "gzip-chunked", "space-before-colon", "two-lengths"],
)
def test_conflicting_framing_is_refused_and_the_connection_closed(site: Site, framing: Any) -> None:
    hidden = smuggled_delete(site.token)
    headers, body = framing(hidden)
    headers = [line.replace("{n}", str(len(body))) for line in headers]
    answers = site.exchange(
        request("POST", "/v1/servers/web/images", site.token, ["Content-Type: application/json", *headers], body)
    )
    # One answer (a refusal), then the connection was closed: the rest of the bytes were never read as a request.
    assert len(answers) <= 1, answers
    assert all(status in (400, 501) for status, _, _ in answers), answers
    assert all(headers.get("connection") == "close" for _, headers, _ in answers), answers
    assert site.image_exists()


def test_a_request_on_http_1_0_with_transfer_encoding_is_refused(site: Site) -> None:
    raw = request("POST", "/v1/servers/web/images", site.token, ["Transfer-Encoding: chunked", "Content-Length: 5"])
    answers = site.exchange(raw.replace(b"HTTP/1.1", b"HTTP/1.0", 1) + b"0\r\n\r\n")
    assert [status for status, _, _ in answers] == [400]
    assert site.image_exists()


def test_a_slow_client_is_disconnected(site: Site) -> None:
    """With --client-timeout 2: a client trickling its headers is cut off although it is never idle for long."""
    with site.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - started < 15:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            readable = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) if _ready(sock, 0.5) else None
            if readable == b"":
                closed = True
                break
        assert closed, "the slow client was never disconnected"
        assert time.monotonic() - started < 10


def _ready(sock: socket.socket, timeout_s: float) -> bool:
    return bool(select.select([sock], [], [], timeout_s)[0])


def test_resolvers_answering_at_once_each_see_their_own_request() -> None:
    """Powertools keeps the current event on a class; two resolvers on two threads must still see their own."""
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[str, str] = {}

    def resolver() -> RequestScopedResolver:
        app = RequestScopedResolver()

        @app.get("/<name>")
        def handler(name: str) -> dict[str, str]:
            barrier.wait()  # both events have been set by now
            seen[name] = app.current_event.path
            return {}

        return app

    context = LocalLambdaContext(function_name="api", invoked_function_arn="local", timeout_s=29)
    threads = [
        threading.Thread(target=resolver().resolve, args=(proxy_event("GET", f"/{name}", {}, None, "-"), context))
        for name in ("one", "two")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert seen == {"one": "/one", "two": "/two"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_within_seconds_with_status_0(tmp_path: Path, signum: int) -> None:
    data_dir = tmp_path / "data"
    token = new_token(data_dir, "alpha")
    register(data_dir, "web", "alpha", make_chain(tmp_path / "disks" / "web", 3))
    with serving(data_dir, options=("-v",)) as served:
        site = Site(served, data_dir, token)
        idle = site.connect()  # a keep-alive connection left open must not hold the shutdown
        assert site.exchange(request("GET", "/v1/health", token, []))[0][0] == 200
        # A job running in the process does not hold it either (what becomes of the job is recovery's part).
        started_job = site.exchange(request("POST", "/v1/servers/web/images", token, ["Content-Length: 0"]))
        assert started_job[0][0] == 202
        started = time.monotonic()
        served.process.send_signal(signum)
        assert served.process.wait(timeout=15) == 0
        assert time.monotonic() - started < 5
        idle.close()
        # Nothing listens any more.
        with pytest.raises(OSError):
            socket.create_connection((served.host, served.port), timeout=2).close()
        # The access log is on stderr (INFO with -v); stdout had the address line only.
        assert served.process.stdout is not None and served.process.stdout.read() == ""
        log = served.stderr.read_text()
        assert re.search(r'statemachine\.serve: 127\.0\.0\.1 "GET /v1/health" 200 \d+ ', log), log[-3000:]
        assert re.search(r'"POST /v1/servers/web/images" 202 ', log)
        assert f"{signal.Signals(signum).name}: stopping" in log


def test_stop_finishes_the_request_in_flight_then_calls_on_shutdown() -> None:
    """In process: stop() while a request is being answered closes the listener at once, sends that answer, and
    only then runs on_shutdown; on_start ran before the first request."""
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def new_resolver() -> Any:
        def resolve(event: dict[str, Any], context: Any) -> dict[str, Any]:
            calls.append(f"request {event['path']}")
            entered.set()
            assert release.wait(timeout=20)
            return {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": '{"done": true}'}

        return resolve

    server = make_server(new_resolver, "127.0.0.1", 0, resolvers=2)
    host, port = server.address
    runner = threading.Thread(
        target=server.serve,
        kwargs={"on_start": lambda: calls.append("start"), "on_shutdown": lambda: calls.append("shutdown")},
    )
    runner.start()
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert entered.wait(timeout=20)
        server.stop()
        # The listener closes while the request is still being answered.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < deadline, "still accepting connections after stop()"
            time.sleep(0.05)  # polling the listener's state: there is no event to wait on from outside
        assert "shutdown" not in calls
        release.set()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    runner.join(timeout=20)
    assert not runner.is_alive()
    answers = parse_responses(data)
    assert [(status, json.loads(body)) for status, _, body in answers] == [(200, {"done": True})]
    assert calls == ["start", "request /slow", "shutdown"]
