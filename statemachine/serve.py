"""`imaging serve`: the API resolver that API Gateway invokes on AWS, behind waitress, a production WSGI server.

Why waitress (PyPI `waitress`, Pylons): it is pure Python (nothing to build next to the Rust core), runs on every
platform without forking (the embedded engine, its moto backend and the resolvers stay in one process that the
jobs share), has been maintained for a decade with security fixes for exactly what `http.server` got wrong here:
it reads `Transfer-Encoding: chunked` bodies, bounds bodies and headers, rejects malformed framing (bad chunk
sizes, invalid `Content-Length`, unknown transfer codings, bare CR/LF) and times idle channels out. gunicorn forks
workers (each would need its own engine), uvicorn and hypercorn are ASGI servers for an async app we do not have.

What this module adds around it:
- each request becomes an API Gateway REST proxy event (payload 1.0) handed to `resolve(event, context)` of a
  pooled resolver, and the proxy response is written back, so the local API and the deployed one run the same
  code. A resolver keeps the request it is answering on itself (as on Lambda, one request at a time per
  instance), so each request borrows one from the pool: concurrent requests never share one;
- stricter framing than waitress's defaults: a request with both `Content-Length` and `Transfer-Encoding`, a
  `Transfer-Encoding` on HTTP/1.0 or `chunked` applied twice is refused (400) and its connection closed, so no
  byte of a body can be read as a request by us while a proxy in front read it as a body (request smuggling);
- bodies are bounded twice: waitress stops reading at a hard limit (a few times the API's 16 KiB, framing
  included), and the API's own check (functions/api/app.py `precheck`) applies 16 KiB to the decoded body, so a
  chunked body and a length-delimited one are measured, refused (413) and validated alike; every error that
  waitress answers itself is JSON in the API's error shape;
- slow clients: a connection idle for `client_timeout_s`, or still sending one request after that long, is closed;
- SIGTERM and SIGINT stop accepting, let the requests being answered finish (up to `drain_s`), then call
  `on_shutdown` and return; `on_start` runs before the first request is read.

Access log lines (client, request line, status, size, duration) are INFO records of the `statemachine.serve`
logger: the CLI sends them to stderr with `imaging -v serve`; stdout is never written.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from functions.api.app import MAX_BODY_BYTES, body_too_large
from statemachine.engine import LocalLambdaContext

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

Resolve = Callable[[dict[str, Any], Any], dict[str, Any]]
Hook = Callable[[], None]
access_log = logging.getLogger("statemachine.serve")

# Waitress stops reading a body at this many bytes (chunk framing counted); the API refuses a decoded body over
# MAX_BODY_BYTES itself. The gap lets chunk framing of an allowed body through while memory stays bounded.
HARD_BODY_LIMIT = 4 * MAX_BODY_BYTES
# The request line and headers: API Gateway allows 10 KiB of headers; bearer tokens and ids are short.
MAX_HEADER_BYTES = 16 * 1024
# Codes of the answers waitress makes itself (bad framing, oversized headers or bodies, internal errors).
_SERVER_ERROR_CODES = {
    400: "BAD_REQUEST",
    408: "REQUEST_TIMEOUT",
    413: "BODY_TOO_LARGE",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
}


def proxy_event(method: str, target: str, headers: dict[str, str], body: str | None, client: str) -> dict[str, Any]:
    """The API Gateway REST proxy event (payload 1.0) of one HTTP request."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    request_id = str(uuid.uuid4())
    return {
        "resource": "/{proxy+}",
        "path": parts.path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": {k: v[-1] for k, v in query.items()} or None,
        "multiValueQueryStringParameters": query or None,
        "pathParameters": {"proxy": parts.path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": parts.path,
            "stage": "local",
            "requestId": request_id,
            "accountId": "local",
            "apiId": "local",
            "identity": {"sourceIp": client},
        },
        "body": body,
        "isBase64Encoded": False,
    }


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


class ApiApplication:
    """The WSGI application: one request, one proxy event, one pooled resolver."""

    def __init__(self, new_resolver: Callable[[], Resolve], resolvers: int) -> None:
        self._pool: queue.SimpleQueue[Resolve] = queue.SimpleQueue()
        for _ in range(resolvers):
            self._pool.put(new_resolver())

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        method = str(environ["REQUEST_METHOD"])
        # The target as sent (not PATH_INFO, which is percent-decoded): ids are validated as the client wrote them.
        target = str(environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "/")
        client = str(environ.get("REMOTE_ADDR") or "-")
        status, headers, out = self._answer(environ, method, target, client)
        start_response(f"{status} {_reason(status)}", [*headers, ("Content-Length", str(len(out)))])
        access_log.info('%s "%s %s" %d %d %.3fs', client, method, target, status, len(out), time.monotonic() - started)
        return [out]

    def _answer(
        self, environ: WSGIEnvironment, method: str, target: str, client: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        # Waitress has de-chunked a chunked body and set CONTENT_LENGTH to its decoded size: one path for both.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        try:
            body = raw.decode() if raw else None
        except UnicodeDecodeError:
            error = {"error": "BAD_REQUEST", "message": "the body is not UTF-8", "hint": "send JSON in UTF-8"}
            return 400, [("Content-Type", "application/json")], _json_bytes(error)
        event = proxy_event(method, target, _headers_of(environ), body, client)
        context = LocalLambdaContext(function_name="imaging-api", invoked_function_arn="local", timeout_s=29)
        resolve = self._pool.get()  # never waits: waitress runs at most as many requests at once as there are
        try:
            response = resolve(event, context)
        except Exception:
            # What API Gateway answers when the Lambda itself fails; the traceback goes to the server's log.
            access_log.exception("the API failed on %s %s", method, target)
            error = {"error": "INTERNAL_ERROR", "message": "internal error"}
            return 500, [("Content-Type", "application/json")], _json_bytes(error)
        finally:
            self._pool.put(resolve)
        headers = [
            (str(name), str(value))
            for name, values in (response.get("multiValueHeaders") or {}).items()
            for value in values
        ]
        headers += [(str(name), str(value)) for name, value in (response.get("headers") or {}).items()]
        headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
        return int(response["statusCode"]), headers, str(response.get("body") or "").encode()


def _headers_of(environ: WSGIEnvironment) -> dict[str, str]:
    """The request's headers as API Gateway passes them (Title-Case names; repeated ones joined with ", ")."""
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            name = key
        else:
            continue
        headers["-".join(part.capitalize() for part in name.split("_"))] = str(value)
    return headers


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _StrictParser(HTTPRequestParser):
    """Waitress's request parser, refusing the framings that let a body be read as a request somewhere."""

    def parse_header(self, header_plus: bytes) -> None:
        codings = [
            coding.strip(b" \t").lower()
            for line in header_plus.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].lower() == b"transfer-encoding"
            for coding in line.split(b":", 1)[1].split(b",")
            if coding.strip(b" \t")
        ]
        super().parse_header(header_plus)
        if not codings:
            return
        # A proxy in front that frames by Content-Length (or by HTTP/1.0 rules) would see another request boundary
        # than we do: refuse, as RFC 9112 §6.1 allows, and close the connection (the error task does).
        if "CONTENT_LENGTH" in self.headers:
            raise ParsingError("Content-Length and Transfer-Encoding in one request")
        if self.version != "1.1":
            raise ParsingError("Transfer-Encoding in an HTTP/1.0 request")
        if codings.count(b"chunked") > 1:
            raise ParsingError("chunked applied more than once")


class _JsonErrorTask(ErrorTask):
    """Waitress's own error answers (bad framing, too large, ...) in the API's JSON error shape."""

    def execute(self) -> None:
        request: Any = self.request  # the parser of the refused request (the stubs call it an Error)
        error = request.error
        code = int(error.code)
        if code == 413:
            payload = body_too_large().model_dump(exclude_none=True)
        else:
            payload = {"error": _SERVER_ERROR_CODES.get(code, "BAD_REQUEST"), "message": str(error.body)}
        out = _json_bytes(payload)
        self.status = f"{code} {error.reason}"
        cast(list[tuple[str, str]], self.response_headers).append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(out)
        self.write(out)
        client = self.channel.addr[0] if self.channel.addr else "-"
        # A request refused before its first line was read has neither method nor target.
        method, target = getattr(request, "command", None) or "-", getattr(request, "request_uri", None) or "-"
        access_log.info('%s "%s %s" %d %d (refused: %s)', client, method, target, code, len(out), error.body)


class _ApiChannel(HTTPChannel):
    """A connection that remembers when its current (incomplete) request began, to time slow senders out."""

    parser_class = _StrictParser
    error_task_class = _JsonErrorTask
    request_began = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.request_began = time.time()
        return bool(super().received(data))


class ApiServer(TcpWSGIServer):
    """Waitress's TCP server with the strict channel, slow-client deadlines and a graceful stop."""

    channel_class = _ApiChannel

    def __init__(self, application: ApiApplication, adj: Adjustments, client_timeout_s: float) -> None:
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        super().__init__(application, dispatcher=dispatcher, adj=adj)
        self.client_timeout_s = client_timeout_s
        self._stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.getsockname()
        return str(host), int(port)

    # types-waitress types these attributes wrongly (active_channels as one channel, trigger as an int, no _map).
    @property
    def _channels(self) -> list[Any]:
        return list(cast(dict[int, Any], self.active_channels).values())

    @property
    def _socket_map(self) -> dict[int, Any]:
        return cast(dict[int, Any], cast(Any, self)._map)

    def maintenance(self, now: float) -> None:
        # Waitress closes channels idle for channel_timeout; a client that trickles a byte now and then is never
        # idle, so a request still incomplete after the same time closes its channel too.
        super().maintenance(cast(int, now))
        for channel in self._channels:
            incomplete = isinstance(channel, _ApiChannel) and channel.request is not None
            if incomplete and now - channel.request_began > self.client_timeout_s:
                channel.will_close = True

    def stop(self) -> None:
        """Ask `serve` to stop (safe from a signal handler or another thread)."""
        self._stopping.set()
        self.pull_trigger()

    def serve(self, *, on_start: Hook | None = None, on_shutdown: Hook | None = None, drain_s: float = 20.0) -> None:
        """Answer requests until SIGTERM, SIGINT or `stop()`, then drain and call `on_shutdown`.

        `on_start` runs before the first request is read (connections wait in the listen backlog meanwhile), and
        `on_shutdown` after the last answer was sent: the places where running jobs are recovered and handed over.
        Signal handlers are installed only when called on the main thread.
        """
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            _run_hook("on_start", on_start)
            while not self._stopping.is_set():
                wasyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._socket_map, use_poll=True, count=1)
            self._drain(drain_s)
            _run_hook("on_shutdown", on_shutdown)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        access_log.info("%s: stopping (no new connections; finishing the requests being answered)",
                        signal.Signals(signum).name)  # fmt: skip
        self.stop()

    def _drain(self, drain_s: float) -> None:
        """Stop listening, finish the requests being answered and send their answers, close every connection."""
        self.accepting = False
        wasyncore.dispatcher.close(self)  # the listening socket only; the trigger still wakes the loop
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            busy = False
            channels = self._channels
            for channel in channels:
                if channel.requests or channel.total_outbufs_len:
                    busy = True
                else:
                    channel.will_close = True  # idle keep-alive or half-sent request: nothing owed
            if not busy and not channels:
                break
            wasyncore.loop(timeout=0.1, map=self._socket_map, use_poll=True, count=1)
        else:
            stuck = sum(1 for channel in self._channels if channel.requests or channel.total_outbufs_len)
            access_log.warning("%d connection(s) still busy after %.0f s: closed unanswered", stuck, drain_s)
        for channel in self._channels:
            channel.handle_close()
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        cast(Any, self.trigger).close()


def _run_hook(name: str, hook: Hook | None) -> None:
    if hook is None:
        return
    try:
        hook()
    except Exception:
        # A failed recovery must not keep the server from serving or from stopping; it is logged with its traceback.
        access_log.exception("the %s hook failed", name)


def make_server(
    new_resolver: Callable[[], Resolve],
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    resolvers: int = 8,
    client_timeout_s: float = 30.0,
) -> ApiServer:
    """A waitress server answering every request through `resolve(event, context)` of a pooled resolver."""
    adj = Adjustments(
        host=host,
        port=port,
        threads=resolvers,
        ident="cloud-imaging",
        max_request_body_size=HARD_BODY_LIMIT,
        max_request_header_size=MAX_HEADER_BYTES,
        channel_timeout=int(max(1, client_timeout_s)),
        # How often idle and slow channels are looked for: a tenth of the timeout, at least every second.
        cleanup_interval=int(max(1, min(30, client_timeout_s / 10))),
        # The default backlog of 1024 is kept: bursts of clients (20 concurrent creates) are not reset.
        expose_tracebacks=False,
        clear_untrusted_proxy_headers=True,
    )
    return ApiServer(ApiApplication(new_resolver, resolvers), adj, client_timeout_s)
