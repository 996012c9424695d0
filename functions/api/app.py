"""The HTTP API of DESIGN §6 on Powertools' APIGatewayRestResolver, validation on, OpenAPI at /v1/openapi.json.

The same resolver serves API Gateway (functions/handlers/api.py) and `imaging serve` (statemachine/serve.py turns
each HTTP request into an API Gateway proxy event). Every request names its tenant: on AWS through the authorizer
(a `tenant` or `custom:tenant` claim), otherwise through `Authorization: Bearer TOKEN` (tokens from `imaging token
create`, stored hashed). Another tenant's server or image answers 404, exactly like one that does not exist.

The OpenAPI document is written for client generators: each route has a stable `operationId`, documents every
status it can answer with the one error schema (`ErrorBody`), its headers (`Idempotency-Key`, `Location`) and the
bearer scheme. Lists are paged by `limit` and an opaque `cursor` (the last item's sort key), over the state store's
whole lists. `/v1/health`, the document and its rendering (`/docs`, Swagger UI from the assets Powertools ships)
need no token. Servers are registered by the operator (`imaging server add`): the API only lists them.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import time as time_of_day
from http import HTTPStatus
from typing import Annotated, Any, TypeVar, cast

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer
from aws_lambda_powertools.event_handler.openapi.params import Body, Header, Query
from aws_lambda_powertools.event_handler.openapi.swagger_ui import generate_swagger_html
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer

from functions.api.schemas import (
    CancelView,
    CreateImageBody,
    ErrorBody,
    EstimateView,
    Health,
    ImageList,
    ImageView,
    RestoreBody,
    RestoredView,
    ScheduleBody,
    ScheduleView,
    ServerList,
    ServerView,
    ValidationIssue,
)
from functions.catalog.estimates import estimate_server
from functions.catalog.requests import Launcher, request_image
from functions.catalog.schedules import WEEKDAYS
from functions.catalog.tokens import tenant_of_token
from functions.imaging.cancel import request_cancel
from functions.imaging.errors import (
    ImageBusyError,
    ImageNotFoundError,
    ImagingError,
    InvalidRequestError,
    ServerBeingImagedError,
    ServerNotFoundError,
)
from functions.imaging.images import delete_image
from functions.imaging.restore import restore_image
from functions.imaging.services import ImagingServices
from functions.state import Image, InvalidIdError, NotFoundError, Schedule, Server, validate_id
from functions.state.models import TERMINAL_STATUSES
from functions.storage import FileObjectStore

MAX_BODY_BYTES = 16 * 1024
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IDEMPOTENCY_TTL_S = 24 * 3600
# A duplicate that arrives while the first request is still being served waits for its result this long (under API
# Gateway's 29 s integration timeout).
IN_PROGRESS_WAIT_S = 20.0
CANCEL_WAIT_S = 10.0
"""How long a cancel request waits for the job's runner to stop it before answering 202 (under API Gateway's 29 s)."""
OPENAPI_PATH = "/v1/openapi.json"
DOCS_PATH = "/docs"
# The rendering under /v1 too: API Gateway routes only /v1/{proxy+} to the resolver.
DOCS_PATH_V1 = "/v1/docs"
HEALTH_PATH = "/v1/health"
# Served without a token: the document, its rendering and the health probe (they show nothing of any tenant).
PUBLIC_PATHS = frozenset({OPENAPI_PATH, DOCS_PATH, DOCS_PATH_V1, HEALTH_PATH})
# Methods whose requests carry no body: one sent anyway is refused, never ignored (a body no route reads is a
# client's mistake, or bytes meant to be read as another request by a server in front).
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
DEFAULT_PAGE = 100
MAX_PAGE = 1000

T = TypeVar("T")


@dataclass(frozen=True)
class ApiDependencies:
    services: ImagingServices
    launch: Launcher
    idempotency: BasePersistenceLayer


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, message and hint."""

    def __init__(
        self,
        status: HTTPStatus,
        code: str,
        message: str,
        hint: str | None = None,
        job_id: str | None = None,
        image_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=code, message=message, hint=hint, job_id=job_id, image_id=image_id)


def error_response(status: HTTPStatus, body: ErrorBody, headers: dict[str, str] | None = None) -> Response[str]:
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body=body.model_dump_json(exclude_none=True),
        headers=headers,
    )


def json_response(status: HTTPStatus, payload: Any, headers: dict[str, str] | None = None) -> Response[str]:
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps(payload),
        headers=headers,
    )


def body_too_large() -> ErrorBody:
    """The 413 answer, the same wherever a body is measured (here, and by `imaging serve` while reading it)."""
    return ErrorBody(
        error="BODY_TOO_LARGE",
        message=f"request bodies are limited to {MAX_BODY_BYTES} bytes",
        hint="bodies are small JSON documents; see /v1/openapi.json",
    )


def _not_found(kind: str, identifier: str, hint: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no {kind} {identifier!r}", hint)


def precheck(event: dict[str, Any]) -> dict[str, Any] | None:
    """The answer to a request refused before routing (its body too large, not JSON, or sent where none is read),
    else None.

    Runs ahead of the resolver because Powertools parses the body (form data included) before any middleware.
    """
    body = event.get("body") or ""
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    method = str(event.get("httpMethod") or "").upper()
    refusal: tuple[HTTPStatus, ErrorBody] | None = None
    if len(body.encode()) > MAX_BODY_BYTES:
        refusal = (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, body_too_large())
    elif body and method in BODYLESS_METHODS:
        message = f"{method} requests carry no body"
        refusal = (HTTPStatus.BAD_REQUEST, ErrorBody(error="BODY_NOT_ALLOWED", message=message, hint="send none"))
    else:
        media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if body and media_type != "application/json":
            message = f"request bodies are JSON, not {media_type}"
            hint = "send Content-Type: application/json"
            error = ErrorBody(error="UNSUPPORTED_MEDIA_TYPE", message=message, hint=hint)
            refusal = (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, error)
    if refusal is None:
        return None
    status, error = refusal
    return {
        "statusCode": status.value,
        "headers": {"Content-Type": content_types.APPLICATION_JSON},
        "multiValueHeaders": {},
        "body": error.model_dump_json(exclude_none=True),
        "isBase64Encoded": False,
    }


class RequestScopedResolver(APIGatewayRestResolver):
    """An APIGatewayRestResolver whose current event and Lambda context belong to the thread answering the request.

    Powertools keeps both on its BaseRouter class, one per process (enough on Lambda, one request per process).
    `imaging serve` answers requests on several threads at once, each on a resolver of its own: with the class's
    event, a request to a public route could be seen by another thread's tenant check (that request then ran
    without a tenant). Here each thread reads the event it is answering.
    """

    def __init__(self, **options: Any) -> None:
        self._request = threading.local()
        super().__init__(**options)

    @property  # type: ignore[override]  # Powertools declares a plain attribute, set on the class
    def current_event(self) -> APIGatewayProxyEvent:
        event: APIGatewayProxyEvent = self._request.event
        return event

    @current_event.setter
    def current_event(self, value: APIGatewayProxyEvent) -> None:
        self._request.event = value

    @property
    def lambda_context(self) -> Any:
        return self._request.lambda_context

    @lambda_context.setter
    def lambda_context(self, value: Any) -> None:
        self._request.lambda_context = value

    def resolve(self, event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        self.current_event = cast(APIGatewayProxyEvent, self._to_proxy_event(dict(event)))
        self.lambda_context = context
        return super().resolve(event, context)


class ImagingApi:
    """The resolver behind its pre-checks: what API Gateway's Lambda and `imaging serve` call per request."""

    def __init__(self, resolver: APIGatewayRestResolver) -> None:
        self.resolver = resolver

    def resolve(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        return precheck(event) or self.resolver.resolve(event, context)


def build_app(deps: ApiDependencies) -> ImagingApi:
    """The API, wired to the given stores and launcher."""
    return ImagingApi(build_resolver(deps))


# --- the document's answers ------------------------------------------------------------------------------------------
_ERROR_DESCRIPTIONS = {
    400: "INVALID_ID, INVALID_CURSOR, INVALID_SCHEDULE, BODY_NOT_ALLOWED or BAD_REQUEST (framing, encoding)",
    401: "UNAUTHORIZED: no bearer token, or not one `imaging token create` issued",
    404: "NOT_FOUND: no such resource of this tenant (another tenant's answers the same)",
    409: "SERVER_BUSY (with the running job's `job_id` and `image_id`), IMAGE_BUSY, REQUEST_IN_PROGRESS, "
    "SERVER_EXISTS or IMAGE_NOT_ACTIVE",
    501: "NOT_SUPPORTED_HERE: the operation needs what this deployment lacks (`hint` says what)",
    413: "BODY_TOO_LARGE: bodies are at most 16 KiB",
    415: "UNSUPPORTED_MEDIA_TYPE: bodies are application/json",
    422: "INVALID_REQUEST (parameters or body; `detail` says which) or IDEMPOTENCY_KEY_REUSED",
}
# Any request may carry a body and so be refused before routing (400, 413, 415).
_ALWAYS = (400, 413, 415)


def answers(
    ok: int, description: str, model: type | None = None, *errors: int, headers: dict[str, Any] | None = None
) -> dict[int, OpenAPIResponse]:
    """A route's documented answers: its success (with `model`), then each error code with the error schema."""
    success: OpenAPIResponse = {"description": description}
    if model is not None:
        success["content"] = {content_types.APPLICATION_JSON: {"model": model}}
    if headers:
        success["headers"] = headers
    documented: dict[int, OpenAPIResponse] = {ok: success}
    for code in sorted({*_ALWAYS, *errors}):
        documented[code] = {
            "description": _ERROR_DESCRIPTIONS[code],
            "content": {content_types.APPLICATION_JSON: {"model": ErrorBody}},
        }
    return documented


def _finished(schema: dict[str, Any]) -> dict[str, Any]:
    """What Powertools' generated document still needs for client generators."""
    # Powertools drops an empty per-route `security`; the health probe is public.
    schema["paths"][HEALTH_PATH]["get"]["security"] = []
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                # Header names are case-insensitive; clients show the name as the document spells it.
                if parameter["in"] == "header" and parameter["name"] == IDEMPOTENCY_KEY_HEADER.lower():
                    parameter["name"] = IDEMPOTENCY_KEY_HEADER
            responses = operation["responses"]
            # Powertools adds its own 422 to a route that declares none (one that takes no input cannot get it).
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                del responses["422"]
            # ... and a body to answers declared without one: a 204 has none.
            if "204" in responses:
                responses["204"].pop("content", None)
    # Powertools always adds its validation-error models; every answer here uses ErrorBody instead, so a generated
    # client would carry classes that no answer has. Drop the unreferenced ones (until none is left).
    models = schema["components"]["schemas"]
    while True:
        unused = [
            name
            for name in ("HTTPValidationError", "ValidationError", "ResponseValidationError")
            if name in models
            and f'"#/components/schemas/{name}"'
            not in json.dumps(
                {"paths": schema["paths"], "models": {other: model for other, model in models.items() if other != name}}
            )
        ]
        if not unused:
            return schema
        for name in unused:
            del models[name]


# --- pagination ------------------------------------------------------------------------------------------------------
def encode_cursor(listing: str, key: Sequence[str]) -> str:
    """An opaque cursor: the listing it belongs to and the sort key of the last item given."""
    raw = json.dumps({"l": listing, "k": list(key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(listing: str, cursor: str) -> tuple[str, ...]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key = data["k"]
        if data["l"] != listing or not isinstance(key, list) or not all(isinstance(part, str) for part in key):
            raise ValueError(cursor)
    except (ValueError, TypeError, KeyError, binascii.Error) as error:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "INVALID_CURSOR",
            "this cursor was not given by this listing",
            "pass the `next_cursor` of the previous page unchanged, or none for the first page",
        ) from error
    return tuple(key)


def page_of(
    items: Sequence[T], key: Callable[[T], tuple[str, ...]], listing: str, limit: int, cursor: str | None
) -> tuple[list[T], str | None]:
    """At most `limit` items after the cursor's key, in key order, and the cursor of the next page (None: last).

    Keyed, not counted: items added or deleted between two pages neither repeat nor hide the others.
    """
    ordered = sorted(items, key=key)
    if cursor is not None:
        after = decode_cursor(listing, cursor)
        ordered = [item for item in ordered if key(item) > after]
    page = ordered[:limit]
    more = len(ordered) > limit
    return page, encode_cursor(listing, key(page[-1])) if more else None


def _image_key(image: Image) -> tuple[str, ...]:
    return (image.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), image.id)


def _server_key(server: Server) -> tuple[str, ...]:
    return (server.id,)


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Items per page, 1-{MAX_PAGE}.")]
Cursor = Annotated[
    str | None,
    Query(max_length=1024, description="The `next_cursor` of the previous page; none for the first page."),
]


def build_resolver(deps: ApiDependencies) -> APIGatewayRestResolver:
    """The API's routes on a Powertools resolver."""
    app = RequestScopedResolver(enable_validation=True)
    services = deps.services
    state = services.state

    # --- middleware: the tenant -----------------------------------------------------------------------------------
    def authenticate(app: APIGatewayRestResolver, next_middleware: NextMiddleware) -> Response[Any]:
        if app.current_event.path in PUBLIC_PATHS:
            return next_middleware(app)
        tenant = _tenant_from_authorizer(app) or _tenant_from_bearer(app)
        if tenant is None:
            return error_response(
                HTTPStatus.UNAUTHORIZED,
                ErrorBody(
                    error="UNAUTHORIZED",
                    message="missing or unknown bearer token",
                    hint="send Authorization: Bearer TOKEN (create one with `imaging token create TENANT`)",
                ),
                headers={"WWW-Authenticate": "Bearer"},
            )
        app.context["tenant"] = tenant  # cleared by the resolver after each request
        return next_middleware(app)

    def _tenant_from_authorizer(app: APIGatewayRestResolver) -> str | None:
        authorizer = (app.current_event.raw_event.get("requestContext") or {}).get("authorizer") or {}
        claims = authorizer.get("claims") or {}
        for value in (authorizer.get("tenant"), claims.get("custom:tenant"), claims.get("tenant")):
            if isinstance(value, str):
                try:
                    return validate_id("tenant", value)
                except InvalidIdError:
                    return None
        return None

    def _tenant_from_bearer(app: APIGatewayRestResolver) -> str | None:
        header = app.current_event.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return tenant_of_token(state, token.strip())

    app.use(middlewares=[authenticate])

    def tenant() -> str:
        return str(app.context["tenant"])

    def checked(kind: str, identifier: str) -> str:
        try:
            return validate_id(kind, identifier)
        except InvalidIdError as error:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "INVALID_ID", str(error), f"{kind} ids are letters, digits, - and _"
            ) from error

    def server_of_tenant(server_id: str) -> Server:
        checked("server", server_id)
        try:
            server = state.get_server(server_id)
        except NotFoundError as error:
            raise _not_found("server", server_id, "GET /v1/servers lists your servers") from error
        if server.tenant != tenant():
            raise _not_found("server", server_id, "GET /v1/servers lists your servers")
        return server

    def image_of_tenant(image_id: str) -> Image:
        checked("image", image_id)
        hint = "GET /v1/servers/{server_id}/images lists a server's images"
        try:
            image = state.get_image(image_id)
        except NotFoundError as error:
            raise _not_found("image", image_id, hint) from error
        if image.tenant != tenant():
            raise _not_found("image", image_id, hint)
        return image

    def view(image: Image) -> ImageView:
        job = None
        if image.job_id is not None:
            try:
                job = state.get_job(image.job_id)
            except NotFoundError:
                job = None
        return ImageView.of(image, job)

    def image_of_job(job_id: str | None) -> str | None:
        if job_id is None:
            return None
        try:
            return state.get_job(job_id).image_id
        except (NotFoundError, InvalidIdError):
            return None

    # --- servers (registered by the platform's operator with `imaging server add`; read-only here) ------------------
    @app.get(
        "/v1/servers",
        summary="Your servers, by id",
        description="Servers are registered by the platform's operator (`imaging server add NAME --disk LEAF "
        "--tenant TENANT`), not over the API. Paginated: `limit` items per page; pass the answer's `next_cursor` "
        "as `cursor` for the next page.",
        operation_id="listServers",
        responses=answers(200, "one page of servers", ServerList, 401, 422),
        tags=["servers"],
    )
    def list_servers(limit: Limit = DEFAULT_PAGE, cursor: Cursor = None) -> ServerList:
        servers, next_cursor = page_of(state.list_servers(tenant()), _server_key, "servers", limit, cursor)
        return ServerList(servers=[ServerView.of(server) for server in servers], next_cursor=next_cursor)

    @app.get(
        "/v1/servers/<server_id>",
        summary="One of your servers",
        operation_id="getServer",
        responses=answers(200, "the server", ServerView, 401, 404, 422),
        tags=["servers"],
    )
    def get_server(server_id: str) -> ServerView:
        return ServerView.of(server_of_tenant(server_id))

    # --- images ----------------------------------------------------------------------------------------------------
    def _create(request: dict[str, Any]) -> dict[str, Any]:
        try:
            job = request_image(
                services,
                deps.launch,
                tenant=request["tenant"],
                server_id=request["payload"]["server_id"],
                name=request["payload"]["body"].get("name"),
                all_blocks=bool(request["payload"]["body"].get("all_blocks", False)),
            )
        except ServerNotFoundError as error:
            raise _not_found("server", request["payload"]["server_id"], "GET /v1/servers lists your servers") from error
        except ServerBeingImagedError as error:
            running = image_of_job(error.job_id)
            raise ApiError(
                HTTPStatus.CONFLICT,
                "SERVER_BUSY",
                str(error),
                f"wait for the running image to finish (GET /v1/images/{running}), then ask again"
                if running
                else "wait for the running image to finish, then ask again",
                job_id=error.job_id,
                image_id=running,
            ) from error
        return view(state.get_image(job.image_id)).model_dump(mode="json")

    idempotency_config = IdempotencyConfig(
        event_key_jmespath="key", payload_validation_jmespath="payload", expires_after_seconds=IDEMPOTENCY_TTL_S
    )
    idempotent_create: Callable[..., dict[str, Any]] = idempotent_function(
        data_keyword_argument="request", persistence_store=deps.idempotency, config=idempotency_config
    )(_create)

    def accepted(image: dict[str, Any]) -> Response[str]:
        return json_response(HTTPStatus.ACCEPTED, image, headers={"Location": f"/v1/images/{image['id']}"})

    @app.post(
        "/v1/servers/<server_id>/images",
        summary="Image a server now",
        description="Starts imaging (202; `Location` names the image to poll). `Idempotency-Key` makes retries safe: "
        "the same key and body give the same image; the same key with another body is 422. 409 while the server is "
        "being imaged, with the running job's `job_id` and `image_id`.",
        operation_id="createImage",
        responses=answers(
            202,
            "imaging started: the image, QUEUED",
            ImageView,
            401,
            404,
            409,
            422,
            headers={"Location": {"description": "the image's URL path", "schema": {"type": "string"}}},
        ),
        tags=["images"],
    )
    def create_image(
        server_id: str,
        body: Annotated[CreateImageBody | None, Body()] = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias=IDEMPOTENCY_KEY_HEADER,
                min_length=1,
                max_length=255,
                pattern=r"^[\x20-\x7e]+$",
                description="Retries with the same key and body answer with the same image (kept 24 hours).",
            ),
        ] = None,
    ) -> Response[str]:
        server = server_of_tenant(server_id)
        request = {
            "tenant": tenant(),
            "payload": {"server_id": server.id, "body": (body or CreateImageBody()).model_dump(mode="json")},
        }
        if idempotency_key is None:
            return accepted(_create(request))
        request["key"] = f"{tenant()}/{idempotency_key}"
        # An in-progress record left by a request that died expires with the invocation's remaining time.
        idempotency_config.register_lambda_context(app.lambda_context)
        deadline = time.monotonic() + IN_PROGRESS_WAIT_S
        while True:
            try:
                return accepted(idempotent_create(request=request))
            except IdempotencyValidationError as error:
                raise ApiError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used with another request",
                    "use a new key for a new request",
                ) from error
            except IdempotencyAlreadyInProgressError as error:
                if time.monotonic() > deadline:
                    raise ApiError(
                        HTTPStatus.CONFLICT, "REQUEST_IN_PROGRESS", "the same request is still being served", "retry"
                    ) from error
                time.sleep(0.05)  # the first request holds the key for a moment: wait for its answer

    @app.get(
        "/v1/images/<image_id>",
        summary="An image's status",
        operation_id="getImage",
        responses=answers(200, "the image and the job making it", ImageView, 401, 404, 422),
        tags=["images"],
    )
    def get_image(image_id: str) -> ImageView:
        return view(image_of_tenant(image_id))

    @app.get(
        "/v1/servers/<server_id>/images",
        summary="A server's images, oldest first",
        description="Paginated: `limit` items per page; pass the answer's `next_cursor` as `cursor` for the next page.",
        operation_id="listServerImages",
        responses=answers(200, "one page of the server's images", ImageList, 401, 404, 422),
        tags=["images"],
    )
    def list_images(server_id: str, limit: Limit = DEFAULT_PAGE, cursor: Cursor = None) -> ImageList:
        server = server_of_tenant(server_id)
        images, next_cursor = page_of(
            state.list_images(server_id=server.id), _image_key, f"images/{server.id}", limit, cursor
        )
        return ImageList(images=[view(image) for image in images], next_cursor=next_cursor)

    @app.delete(
        "/v1/images/<image_id>",
        summary="Delete an image (object, manifest, record)",
        description="409 IMAGE_BUSY while its job runs.",
        operation_id="deleteImage",
        responses=answers(204, "deleted", None, 401, 404, 409, 422),
        tags=["images"],
    )
    def remove_image(image_id: str) -> Response[str]:
        image = image_of_tenant(image_id)
        try:
            delete_image(services, image.id)
        except ImageBusyError as error:
            raise ApiError(HTTPStatus.CONFLICT, error.code, str(error), error.hint) from error
        return Response(status_code=HTTPStatus.NO_CONTENT.value, body="")

    @app.get(
        "/v1/servers/<server_id>/image-estimate",
        summary="Size and time of an image made now",
        description="409 when the server's disk cannot be read as a VHD chain now (its error code and hint).",
        operation_id="getImageEstimate",
        responses=answers(200, "the estimate", EstimateView, 401, 404, 409, 422),
        tags=["images"],
    )
    def estimate(server_id: str) -> EstimateView:
        server = server_of_tenant(server_id)
        try:
            found = estimate_server(services, server)
        except ImagingError as error:
            raise ApiError(HTTPStatus.CONFLICT, error.code, str(error), error.hint) from error
        return EstimateView(server_id=server.id, **found.model_dump())

    @app.post(
        "/v1/images/<image_id>/cancel",
        summary="Stop the job making an image",
        description="The job stops through the workflow's failure path (ERROR CANCELLED: upload aborted, staging "
        "removed, the server's lock released; the source disk as the workflow guarantees). 200 once it has "
        "stopped (or had ended: `requested` false), 202 while its runner is still stopping it: follow the image.",
        operation_id="cancelImage",
        responses={
            **answers(200, "the job has stopped, or had ended", CancelView, 401, 404, 422),
            202: {
                "description": "asked to stop; not stopped yet",
                "content": {content_types.APPLICATION_JSON: {"model": CancelView}},
            },
        },
        tags=["images"],
    )
    def cancel_image(image_id: str) -> Response[CancelView]:
        image = image_of_tenant(image_id)
        outcome = request_cancel(services, image.id, wait_s=CANCEL_WAIT_S)
        stopping = outcome.requested and outcome.status not in TERMINAL_STATUSES
        body = CancelView(
            image_id=outcome.image_id,
            job_id=outcome.job_id,
            status=outcome.status,
            error_code=outcome.error_code,
            requested=outcome.requested,
            cancelled=outcome.cancelled,
        )
        code = HTTPStatus.ACCEPTED if stopping else HTTPStatus.OK
        return Response(code.value, content_types.APPLICATION_JSON, body)

    @app.post(
        "/v1/images/<image_id>/restore",
        summary="Make a new server from an image",
        description="The image is written as the new server's base disk (a dynamic VHD where the platform keeps "
        "servers' disks), its content checked against the image's content hash before the server is registered; "
        "nothing is left behind on failure. It runs within the request: a deployment whose disks are not files "
        "answers 501.",
        operation_id="restoreImage",
        responses=answers(201, "the new server", RestoredView, 401, 404, 409, 422, 501),
        tags=["images"],
    )
    def restore(image_id: str, body: Annotated[RestoreBody, Body()]) -> Response[RestoredView]:
        image = image_of_tenant(image_id)
        checked("server", body.server)
        if not isinstance(services.disk_store, FileObjectStore):
            raise ApiError(
                HTTPStatus.NOT_IMPLEMENTED,
                "NOT_SUPPORTED_HERE",
                "restoring writes the server's disk as a file, and this deployment keeps disks in object storage",
                "restore with `imaging image restore` on a host with a file store",
            )
        try:
            restored = restore_image(services, image.id, body.server, tenant=tenant(), flavor=body.flavor)
        except ImageNotFoundError as error:
            raise _not_found("image", image_id, "GET /v1/servers/{server_id}/images lists a server's images") from error
        except InvalidRequestError as error:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, error.code, str(error), error.hint) from error
        except ImagingError as error:
            raise ApiError(HTTPStatus.CONFLICT, error.code, str(error), error.hint) from error
        view_of = RestoredView(
            server=ServerView.of(restored.server),
            image_id=restored.image_id,
            virtual_size=restored.virtual_size,
            content_sha256=restored.content_sha256,
            seconds=round(restored.seconds, 3),
        )
        return Response(
            HTTPStatus.CREATED.value,
            content_types.APPLICATION_JSON,
            view_of,
            headers={"Location": f"/v1/servers/{restored.server.id}"},
        )

    # --- schedules -------------------------------------------------------------------------------------------------
    @app.put(
        "/v1/servers/<server_id>/image-schedule",
        summary="Set the server's imaging schedule",
        operation_id="putImageSchedule",
        responses=answers(200, "the schedule", ScheduleView, 401, 404, 422),
        tags=["schedules"],
    )
    def put_schedule(server_id: str, body: Annotated[ScheduleBody, Body()]) -> ScheduleView:
        server = server_of_tenant(server_id)
        if (body.frequency.value == "weekly") != (body.weekday is not None):
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "INVALID_SCHEDULE", "weekly schedules name a weekday, daily ones do not"
            )
        hour, minute = (int(part) for part in body.at.split(":"))
        try:
            previous: Schedule | None = state.get_schedule(server.id)
        except NotFoundError:
            previous = None
        now = services.now()
        schedule = Schedule(
            server_id=server.id,
            tenant=server.tenant,
            frequency=body.frequency,
            at=time_of_day(hour, minute),
            weekday=None if body.weekday is None else WEEKDAYS.index(body.weekday),
            retention=body.retention,
            # A changed schedule does not fire for a window it already fired for, nor for a past one.
            last_window_started=previous.last_window_started if previous else None,
            created_at=now,
        )
        state.put_schedule(schedule)
        return ScheduleView.of(schedule, services.now())

    @app.get(
        "/v1/servers/<server_id>/image-schedule",
        summary="The server's imaging schedule",
        description="404 when the server has none.",
        operation_id="getImageSchedule",
        responses=answers(200, "the schedule", ScheduleView, 401, 404, 422),
        tags=["schedules"],
    )
    def get_schedule(server_id: str) -> ScheduleView:
        server = server_of_tenant(server_id)
        try:
            return ScheduleView.of(state.get_schedule(server.id), services.now())
        except NotFoundError as error:
            raise ApiError(
                HTTPStatus.NOT_FOUND, "NOT_FOUND", f"server {server.id} has no schedule", "set one with PUT"
            ) from error

    @app.delete(
        "/v1/servers/<server_id>/image-schedule",
        summary="Stop imaging the server on a schedule",
        operation_id="deleteImageSchedule",
        responses=answers(204, "deleted", None, 401, 404, 422),
        tags=["schedules"],
    )
    def delete_schedule(server_id: str) -> Response[str]:
        server = server_of_tenant(server_id)
        if not state.delete_schedule(server.id):
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"server {server.id} has no schedule", "nothing to do")
        return Response(status_code=HTTPStatus.NO_CONTENT.value, body="")

    # --- health, the document and its rendering --------------------------------------------------------------------
    @app.get(
        HEALTH_PATH,
        summary="Whether the API answers (no token needed)",
        operation_id="getHealth",
        responses=answers(200, "the API answers", Health),
        tags=["health"],
    )
    def health() -> Health:
        return Health()

    rendered: dict[str, str] = {}

    def document() -> str:
        """The OpenAPI document, made once: what /v1/openapi.json serves and /docs renders."""
        if "json" not in rendered:
            schema = json.loads(
                app.get_openapi_json_schema(
                    title="Cloud Imaging API",
                    version="1.0.0",
                    description="Image cloud servers' VHD chains into object storage, on demand and on a schedule. "
                    "Every route but /v1/health needs `Authorization: Bearer TOKEN` (`imaging token create "
                    "TENANT`); a tenant sees only its own servers and images. Errors are JSON "
                    "`{error, message, hint, detail?}` with a stable `error` code.",
                    security_schemes={"bearer": HTTPBearer(description="a token from `imaging token create`")},
                    security=[{"bearer": []}],
                )
            )
            rendered["json"] = json.dumps(_finished(schema))
        return rendered["json"]

    @app.get(OPENAPI_PATH, include_in_schema=False)
    def openapi() -> Response[str]:
        return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=document())

    @app.get(DOCS_PATH, include_in_schema=False)
    @app.get(DOCS_PATH_V1, include_in_schema=False)
    def docs() -> Response[str]:
        # Swagger UI from the assets Powertools ships (inlined: no CDN, works offline), rendering the same document,
        # which the page also asks for as /docs?format=json.
        if (app.current_event.query_string_parameters or {}).get("format") == "json":
            return openapi()
        if "html" not in rendered:
            from pathlib import Path

            import aws_lambda_powertools.event_handler.openapi.swagger_ui as assets

            folder = Path(assets.__file__).parent
            rendered["html"] = generate_swagger_html(
                spec=document().replace("</", "<\\/"),
                swagger_js=(folder / "swagger-ui-bundle.min.js").read_text(encoding="utf-8"),
                swagger_css=(folder / "swagger-ui.min.css").read_text(encoding="utf-8"),
                swagger_base_url="",
                oauth2_config=None,
                persist_authorization=True,
            )
        return Response(status_code=200, content_type="text/html; charset=utf-8", body=rendered["html"])

    # --- errors ------------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)  # type: ignore[untyped-decorator]  # Powertools leaves it untyped
    def on_api_error(error: ApiError) -> Response[str]:
        return error_response(error.status, error.body)

    @app.exception_handler(RequestValidationError)  # type: ignore[untyped-decorator]  # Powertools leaves it untyped
    def on_invalid_request(error: RequestValidationError) -> Response[str]:
        detail = [
            ValidationIssue(
                loc=[part if isinstance(part, int) else str(part) for part in item.get("loc", ())],
                msg=str(item.get("msg") or item.get("type")),
                type=str(item.get("type")),
            )
            for item in error.errors()
        ]
        where = ", ".join(".".join(str(part) for part in item.loc) for item in detail) or "the request"
        body = ErrorBody(
            error="INVALID_REQUEST",
            message=f"invalid {where}",
            hint=f"see {OPENAPI_PATH} for this operation's parameters and body",
            detail=detail,
        )
        return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, body)

    @app.not_found
    def on_no_route(error: Exception) -> Response[str]:
        return error_response(
            HTTPStatus.NOT_FOUND,
            ErrorBody(error="NO_SUCH_ROUTE", message="no such resource", hint=f"{DOCS_PATH} lists the routes"),
        )

    return app
