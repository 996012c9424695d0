"""The OpenAPI document as a client generator needs it, against `imaging serve` over HTTP: valid (openapi-spec-
validator), stable operation ids, every answer documented with the real error schema, headers and security
declared, pagination that works, /v1/health, /docs rendered from the same document without a CDN, and schemathesis
finding no 5xx and no answer that disagrees with the document."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from functions.state import Image, Status, open_state_store
from tests.support.api_server import make_chain, new_token, register, serving

pytestmark = pytest.mark.functional

ALPHA_SERVERS = ["app1", "app2", "app3", "app4", "web"]


@dataclass
class Site:
    url: str
    data_dir: Path
    tokens: dict[str, str]

    def call(
        self, method: str, path: str, *, tenant: str | None = "alpha", raw: bytes | None = None
    ) -> tuple[int, Any, dict[str, str], str]:
        request = urllib.request.Request(self.url + path, data=raw, method=method)
        if raw is not None:
            request.add_header("Content-Type", "application/json")
        if tenant is not None:
            request.add_header("Authorization", f"Bearer {self.tokens[tenant]}")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, text, headers = answer.status, answer.read().decode(), answer.headers
        except urllib.error.HTTPError as error:
            status, text, headers = error.code, error.read().decode(), error.headers
        lowered = {name.lower(): value for name, value in headers.items()}
        body = json.loads(text) if lowered.get("content-type", "").startswith("application/json") and text else None
        return status, body, lowered, text


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("openapi")
    data_dir = root / "data"
    tokens = {tenant: new_token(data_dir, tenant) for tenant in ("alpha", "beta")}
    web = make_chain(root / "disks" / "web", 1)
    for server_id in ALPHA_SERVERS:
        register(data_dir, server_id, "alpha", web)
    register(data_dir, "db", "beta", make_chain(root / "disks" / "db", 2))
    # Image records of `web` (not made by jobs: pagination only reads them); two share a creation time.
    state = open_state_store(f"sqlite:///{data_dir / 'state.sqlite3'}")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for number, offset in enumerate([0, 1, 1, 2, 3, 5, 8]):
        image = Image(
            id=f"img-page{number}",
            tenant="alpha",
            server_id="web",
            name=f"page {number}",
            status=Status.ERROR,
            created_at=start + timedelta(minutes=offset),
        )
        state.put_image(image)
    state.close()
    with serving(data_dir) as served:
        yield Site(served.url, data_dir, tokens)


@pytest.fixture(scope="module")
def document(site: Site) -> dict[str, Any]:
    status, body, _, _ = site.call("GET", "/v1/openapi.json", tenant=None)
    assert status == 200
    assert isinstance(body, dict)
    return body


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema


def test_operation_ids_are_stable_names(document: dict[str, Any]) -> None:
    ids = {f"{method.upper()} {path}": operation.get("operationId") for path, method, operation in operations(document)}
    assert (
        ids.items()
        >= {
            "POST /v1/servers/{server_id}/images": "createImage",
            "GET /v1/servers/{server_id}/images": "listServerImages",
            "GET /v1/images/{image_id}": "getImage",
            "DELETE /v1/images/{image_id}": "deleteImage",
            "GET /v1/servers/{server_id}/image-estimate": "getImageEstimate",
            "PUT /v1/servers/{server_id}/image-schedule": "putImageSchedule",
            "GET /v1/servers/{server_id}/image-schedule": "getImageSchedule",
            "DELETE /v1/servers/{server_id}/image-schedule": "deleteImageSchedule",
            "GET /v1/servers": "listServers",
            "GET /v1/servers/{server_id}": "getServer",
            "GET /v1/health": "getHealth",
        }.items()
    )
    assert all(isinstance(value, str) and re.fullmatch(r"[a-z][A-Za-z]+", value) for value in ids.values()), ids
    assert len(set(ids.values())) == len(ids)


def test_every_error_answer_is_documented_with_the_error_schema(document: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, method, operation in operations(document):
        responses = operation["responses"]
        expected = {"400", "413", "415"} | (set() if path == "/v1/health" else {"401", "422"})
        if "{" in path:
            expected.add("404")
        assert set(responses) >= expected, (method, path, sorted(responses))
        for code, response in responses.items():
            if code.startswith(("4", "5")):
                assert response["content"]["application/json"]["schema"] == error_ref, (method, path, code)
    create = document["paths"]["/v1/servers/{server_id}/images"]["post"]
    assert {"202", "409", "422"} <= set(create["responses"])
    assert "Location" in create["responses"]["202"]["headers"]
    headers = [p for p in create["parameters"] if p["in"] == "header"]
    assert [p["name"] for p in headers] == ["Idempotency-Key"]
    assert "409" in document["paths"]["/v1/images/{image_id}"]["delete"]["responses"]
    error_body = document["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"error", "message"}
    assert {"hint", "detail", "job_id", "image_id"} <= set(error_body["properties"])
    # No model that no answer uses (Powertools' own validation error shapes).
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_security_is_a_bearer_scheme_and_health_is_public(site: Site, document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a token from `imaging token create`",
    }
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/v1/health"]["get"]["security"] == []
    assert site.call("GET", "/v1/health", tenant=None)[:2] == (200, {"status": "ok"})
    assert site.call("GET", "/v1/servers", tenant=None)[0] == 401


def test_the_422_body_is_the_documented_one(site: Site, document: dict[str, Any]) -> None:
    status, body, _, _ = site.call("POST", "/v1/servers/web/images", raw=b'{"name": "x", "extra": 1}')
    assert status == 422
    # The document's ErrorBody, its references resolved against the document's components.
    schema = {**document["components"]["schemas"]["ErrorBody"], "components": document["components"]}
    jsonschema.validate(body, schema)
    assert body["error"] == "INVALID_REQUEST" and body["hint"]
    extra = {"loc": ["body", "extra"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    assert body["detail"] == [extra]


def pages(site: Site, path: str, field: str, limit: int) -> list[list[str]]:
    seen: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body, _, _ = site.call("GET", path + query)
        assert status == 200, body
        seen.append([item["id"] for item in body[field]])
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        assert len(seen) < 20, "pagination does not end"


def test_servers_paginate_by_id_and_only_the_tenants(site: Site) -> None:
    assert pages(site, "/v1/servers", "servers", 2) == [["app1", "app2"], ["app3", "app4"], ["web"]]
    assert pages(site, "/v1/servers", "servers", 1000) == [ALPHA_SERVERS]
    status, body, _, _ = site.call("GET", "/v1/servers", tenant="beta")
    assert status == 200 and [s["id"] for s in body["servers"]] == ["db"] and body["next_cursor"] is None
    assert set(body["servers"][0]) == {"id", "name", "flavor", "created_at"}  # not the platform's disk path


def test_images_paginate_oldest_first_with_ties_by_id(site: Site) -> None:
    expected = [f"img-page{n}" for n in range(7)]
    got = pages(site, "/v1/servers/web/images", "images", 3)
    assert got == [expected[0:3], expected[3:6], expected[6:7]]
    assert pages(site, "/v1/servers/web/images", "images", 7) == [expected]


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("?limit=0", 422, "INVALID_REQUEST"),
        ("?limit=1001", 422, "INVALID_REQUEST"),
        ("?limit=many", 422, "INVALID_REQUEST"),
        ("?cursor=not-a-cursor", 400, "INVALID_CURSOR"),
    ],
)
def test_bad_page_parameters_are_refused(site: Site, query: str, status: int, code: str) -> None:
    for path in ("/v1/servers", "/v1/servers/web/images"):
        got, body, _, _ = site.call("GET", path + query)
        assert (got, body["error"]) == (status, code), (path, body)


def test_a_cursor_of_another_listing_is_refused(site: Site) -> None:
    _, body, _, _ = site.call("GET", "/v1/servers?limit=1")
    got, answer, _, _ = site.call("GET", f"/v1/servers/web/images?cursor={body['next_cursor']}")
    assert (got, answer["error"]) == (400, "INVALID_CURSOR")


def test_servers_of_another_tenant_are_404_and_the_hint_names_a_real_route(site: Site) -> None:
    status, body, _, _ = site.call("GET", "/v1/servers/db")
    assert status == 404 and body["error"] == "NOT_FOUND"
    assert body == site.call("GET", "/v1/servers/nosuch")[1] | {"message": "no server 'db'"}
    route = re.search(r"GET (/v1/\S+)", body["hint"])
    assert route is not None and site.call("GET", route.group(1))[0] == 200
    status, body, _, _ = site.call("GET", "/v1/servers/db", tenant="beta")
    assert status == 200 and body["id"] == "db"


def test_a_created_image_has_its_location(site: Site) -> None:
    status, body, headers, _ = site.call("POST", "/v1/servers/app1/images", raw=b"{}")
    assert status == 202, body
    assert headers["location"] == f"/v1/images/{body['id']}"
    assert site.call("GET", headers["location"])[0] == 200


def test_docs_render_the_same_document_without_a_cdn(site: Site, document: dict[str, Any]) -> None:
    status, _, headers, html = site.call("GET", "/docs", tenant=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in html
    # Every asset is inline: no script or stylesheet is fetched from anywhere.
    assert not re.search(r"<script[^>]*\bsrc=", html) and not re.search(r"<link[^>]*stylesheet", html)
    embedded = re.search(r"spec: (.*),\n\s*presets:", html)
    assert embedded is not None
    assert json.loads(embedded.group(1).replace("<\\/", "</")) == document
    # Swagger UI also loads the document from /docs?format=json; under /v1 (API Gateway's routes) the same page.
    assert site.call("GET", "/docs?format=json", tenant=None)[1] == document
    assert site.call("GET", "/v1/docs", tenant=None)[3] == html


def test_generated_requests_never_get_a_5xx_or_break_the_schema(site: Site, tmp_path: Path) -> None:
    """schemathesis sends requests generated from the served document with a valid token (in under a minute)."""
    har = tmp_path / "schemathesis.har"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{site.url}/v1/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
        "content_type_conformance",
        "--max-examples", "10", "--seed", "1", "--workers", "1",
        "--header", f"Authorization: Bearer {site.tokens['alpha']}",
        "--report", "har", "--report-har-path", str(har),
        "--suppress-health-check", "all",
    ]  # fmt: skip
    # One worker: with two, schemathesis' coverage phase compiles hypothesis filters on two threads at once and
    # CPython 3.11 fails that ("SystemError: AST constructor recursion depth mismatch"), an error of the tool.
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    sent = json.loads(har.read_text())["log"]["entries"]
    operations_hit = {(entry["request"]["method"], entry["request"]["url"].split("?")[0]) for entry in sent}
    assert len(sent) >= 100 and len(operations_hit) >= 11, (len(sent), len(operations_hit))
    # With the token, requests got through to the routes (not only 401s and validation errors).
    statuses = {entry["response"]["status"] for entry in sent}
    assert {200, 202, 204, 401, 404, 422} <= statuses, sorted(statuses)
