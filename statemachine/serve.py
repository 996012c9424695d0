"""`imaging serve`: a real HTTP server in front of the same API resolver that API Gateway invokes on AWS.

Each request becomes an API Gateway REST proxy event (payload 1.0) handed to `resolver.resolve`, and the proxy
response is written back, so the local API and the deployed one run the same code. Bodies are bounded before they
are read. The request context carries no authorizer: locally a tenant is only ever named by a bearer token.

A resolver keeps the request it is answering on itself (as on Lambda, one request at a time per instance), so
the server keeps a pool of resolvers and each request borrows one: concurrent requests never share one.

Access log lines (client, request line, status, size) are INFO records of the `statemachine.serve` logger: the CLI
sends them to stderr with `imaging -v serve`; stdout is never written.
"""

from __future__ import annotations

import json
import logging
import queue
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from statemachine.engine import LocalLambdaContext

Resolve = Callable[[dict[str, Any], Any], dict[str, Any]]
MAX_BODY_BYTES = 16 * 1024
access_log = logging.getLogger("statemachine.serve")


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


def make_server(
    new_resolver: Callable[[], Resolve], host: str = "127.0.0.1", port: int = 8080, resolvers: int = 8
) -> ThreadingHTTPServer:
    """A threading HTTP server answering every request through `resolve(event, context)` of a pooled resolver."""
    pool: queue.SimpleQueue[Resolve] = queue.SimpleQueue()
    for _ in range(resolvers):
        pool.put(new_resolver())

    class ApiRequestHandler(BaseHTTPRequestHandler):
        server_version = "cloud-imaging"
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length_header = self.headers.get("Content-Length")
            try:
                length = int(length_header) if length_header else 0
            except ValueError:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "BAD_REQUEST", "message": "bad Content-Length"})
                return
            if length < 0 or length > MAX_BODY_BYTES:
                self.close_connection = True  # the body is not read: the connection cannot be reused
                self._answer(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": "BODY_TOO_LARGE", "message": f"request bodies are limited to {MAX_BODY_BYTES} bytes"},
                )
                return
            raw = self.rfile.read(length) if length else b""
            try:
                body = raw.decode() if raw else None
            except UnicodeDecodeError:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "BAD_REQUEST", "message": "the body is not UTF-8"})
                return
            headers = dict(self.headers.items())
            event = proxy_event(self.command, self.path, headers, body, self.client_address[0])
            context = LocalLambdaContext(function_name="imaging-api", invoked_function_arn="local", timeout_s=29)
            resolve = pool.get()  # blocks while every resolver is busy
            try:
                response = resolve(event, context)
            except Exception:
                # What API Gateway answers when the Lambda itself fails; the traceback goes to the server's log.
                access_log.exception("the API failed on %s %s", self.command, self.path)
                self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "INTERNAL_ERROR", "message": "internal error"})
                return
            finally:
                pool.put(resolve)
            out = (response.get("body") or "").encode()
            self.send_response(int(response["statusCode"]))
            for name, values in (response.get("multiValueHeaders") or {}).items():
                for value in values:
                    self.send_header(name, str(value))
            for name, value in (response.get("headers") or {}).items():
                self.send_header(name, str(value))
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def _answer(self, status: HTTPStatus, payload: dict[str, str]) -> None:
            out = json.dumps(payload).encode()
            self.send_response(status.value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def __getattr__(self, name: str) -> Any:
            # http.server dispatches on do_<METHOD> and answers 501 to any other: every method, however unusual,
            # goes to the resolver instead, which answers it like API Gateway does.
            if name.startswith("do_"):
                return self._serve
            raise AttributeError(name)

        def log_message(self, format: str, *args: Any) -> None:
            # http.server writes these to stderr itself; as log records, their level and format follow the CLI's.
            access_log.info("%s %s", self.address_string(), format % args)

    return ApiServer((host, port), ApiRequestHandler)


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 resets bursts of clients (20 concurrent creates); the kernel caps it anyway.
    request_queue_size = 128
