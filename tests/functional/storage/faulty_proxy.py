"""A loopback HTTP proxy in front of the moto server that fails or cuts a seeded fraction of S3 UploadPart requests,
and counts the UploadPart requests it let through to the server."""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "expect", "te"}
_INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)


@dataclass
class FaultPlan:
    """One UploadPart in every `window` fails, at a seeded random position in each window (so exactly 1/window of
    them, in an unpredictable pattern): a 500, a cut before forwarding, or a cut after the server stored the part
    (the client never learns that it succeeded)."""

    window: int | None = 10
    """None: no faults, the proxy only relays and counts."""
    seed: int = 0
    rng: random.Random = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    injected: Counter[str] = field(default_factory=Counter)
    forwarded_parts: Counter[int] = field(default_factory=Counter)
    seen: int = 0
    in_flight: int = 0
    idle: threading.Condition = field(init=False)
    _victim: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.idle = threading.Condition(self.lock)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being relayed: everything a (killed) client sent has been answered upstream."""
        with self.idle:
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout)

    def choose(self) -> str | None:
        with self.lock:
            if self.window is None:
                return None
            position = self.seen % self.window
            if position == 0:
                self._victim = self.rng.randrange(self.window)
            self.seen += 1
            if position != self._victim:
                return None
            fault = self.rng.choice(["500", "cut-before", "cut-after"])
            self.injected[fault] += 1
            return fault


def _is_upload_part(method: str, path: str) -> int | None:
    query = parse_qs(urlsplit(path).query)
    if method == "PUT" and "uploadId" in query and "partNumber" in query:
        return int(query["partNumber"][0])
    return None


def _handler(upstream: tuple[str, int], plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _cut(self) -> None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _relay(self) -> None:
            with plan.idle:
                plan.in_flight += 1
            try:
                self._relay_one()
            finally:
                with plan.idle:
                    plan.in_flight -= 1
                    plan.idle.notify_all()

        def _relay_one(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length) if length else b""
            if len(body) < length:  # the client died mid-request: a server would drop it too
                self.close_connection = True
                return
            part = _is_upload_part(self.command, self.path)
            fault = plan.choose() if part is not None else None
            if fault == "cut-before":
                self._cut()
                return
            if fault == "500":
                self.send_response(500)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_INTERNAL_ERROR)))
                self.end_headers()
                self.wfile.write(_INTERNAL_ERROR)
                return
            headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
            connection = http.client.HTTPConnection(*upstream, timeout=120)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                reply = connection.getresponse()
                payload = reply.read()
            finally:
                connection.close()
            if part is not None and reply.status == 200:
                with plan.lock:
                    plan.forwarded_parts[part] += 1
            if fault == "cut-after":
                self._cut()
                return
            self.send_response(reply.status, reply.reason)
            for name, value in reply.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            # a HEAD reply announces the object's length without a body
            length = reply.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay  # noqa: N815 (http.server names)

    return Handler


@contextmanager
def faulty_proxy(upstream_url: str, plan: FaultPlan) -> Iterator[str]:
    """Serve the proxy on a loopback port; yields its URL."""
    parts = urlsplit(upstream_url)
    upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, plan))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="faulty-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
