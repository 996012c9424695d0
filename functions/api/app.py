"""The HTTP API of DESIGN §6 on Powertools' APIGatewayRestResolver, validation on, OpenAPI at /v1/openapi.json.

The same resolver serves API Gateway (functions/handlers/api.py) and `imaging serve` (statemachine/serve.py turns
each HTTP request into an API Gateway proxy event). Every request names its tenant: on AWS through the authorizer
(a `tenant` or `custom:tenant` claim), otherwise through `Authorization: Bearer TOKEN` (tokens from `imaging token
create`, stored hashed). Another tenant's server or image answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import time as time_of_day
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer
from aws_lambda_powertools.event_handler.openapi.params import Body
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer

from functions.api.schemas import (
    CreateImageBody,
    ErrorBody,
    EstimateView,
    ImageList,
    ImageView,
    ScheduleBody,
    ScheduleView,
)
from functions.catalog.estimates import estimate_server
from functions.catalog.requests import Launcher, ServerBeingImagedError, ServerNotFoundError, request_image
from functions.catalog.schedules import WEEKDAYS
from functions.catalog.tokens import tenant_of_token
from functions.imaging.errors import ImagingError
from functions.imaging.images import ImageBusyError, delete_image
from functions.imaging.services import ImagingServices
from functions.state import Image, InvalidIdError, NotFoundError, Schedule, validate_id

MAX_BODY_BYTES = 16 * 1024
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IDEMPOTENCY_TTL_S = 24 * 3600
# A duplicate that arrives while the first request is still being served waits for its result this long (under API
# Gateway's 29 s integration timeout).
IN_PROGRESS_WAIT_S = 20.0


@dataclass(frozen=True)
class ApiDependencies:
    services: ImagingServices
    launch: Launcher
    idempotency: BasePersistenceLayer


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, message and hint."""

    def __init__(
        self, status: HTTPStatus, code: str, message: str, hint: str | None = None, job_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=code, message=message, hint=hint, job_id=job_id)


def error_response(status: HTTPStatus, body: ErrorBody, headers: dict[str, str] | None = None) -> Response[str]:
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body=body.model_dump_json(exclude_none=True),
        headers=headers,
    )


def json_response(status: HTTPStatus, payload: Any) -> Response[str]:
    return Response(status_code=status.value, content_type=content_types.APPLICATION_JSON, body=json.dumps(payload))


def _not_found(kind: str, identifier: str) -> ApiError:
    return ApiError(
        HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no {kind} {identifier!r}", f"list your {kind}s to see their ids"
    )


def precheck(event: dict[str, Any]) -> dict[str, Any] | None:
    """The answer to a request refused before routing (its body too large or not JSON), else None.

    Runs ahead of the resolver because Powertools parses the body (form data included) before any middleware.
    """
    body = event.get("body") or ""
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    refusal: tuple[HTTPStatus, ErrorBody] | None = None
    if len(body.encode()) > MAX_BODY_BYTES:
        message = f"request bodies are limited to {MAX_BODY_BYTES} bytes"
        refusal = (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, ErrorBody(error="BODY_TOO_LARGE", message=message))
    else:
        media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if body and media_type != "application/json":
            message = f"request bodies are JSON, not {media_type}"
            refusal = (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, ErrorBody(error="UNSUPPORTED_MEDIA_TYPE", message=message))
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


class ImagingApi:
    """The resolver behind its pre-checks: what API Gateway's Lambda and `imaging serve` call per request."""

    def __init__(self, resolver: APIGatewayRestResolver) -> None:
        self.resolver = resolver

    def resolve(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        return precheck(event) or self.resolver.resolve(event, context)


def build_app(deps: ApiDependencies) -> ImagingApi:
    """The API, wired to the given stores and launcher."""
    return ImagingApi(build_resolver(deps))


def build_resolver(deps: ApiDependencies) -> APIGatewayRestResolver:
    """The API's routes on a Powertools resolver."""
    app = APIGatewayRestResolver(enable_validation=True)
    services = deps.services
    state = services.state

    # --- middleware: the tenant -----------------------------------------------------------------------------------
    def authenticate(app: APIGatewayRestResolver, next_middleware: NextMiddleware) -> Response[Any]:
        if app.current_event.path == "/v1/openapi.json":
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

    def server_of_tenant(server_id: str) -> Any:
        checked("server", server_id)
        try:
            server = state.get_server(server_id)
        except NotFoundError as error:
            raise _not_found("server", server_id) from error
        if server.tenant != tenant():
            raise _not_found("server", server_id)
        return server

    def image_of_tenant(image_id: str) -> Image:
        checked("image", image_id)
        try:
            image = state.get_image(image_id)
        except NotFoundError as error:
            raise _not_found("image", image_id) from error
        if image.tenant != tenant():
            raise _not_found("image", image_id)
        return image

    def view(image: Image) -> ImageView:
        job = None
        if image.job_id is not None:
            try:
                job = state.get_job(image.job_id)
            except NotFoundError:
                job = None
        return ImageView.of(image, job)

    # --- images ----------------------------------------------------------------------------------------------------
    def _create(request: dict[str, Any]) -> dict[str, Any]:
        try:
            job = request_image(
                services,
                deps.launch,
                tenant=request["tenant"],
                server_id=request["payload"]["server_id"],
                name=request["payload"]["body"].get("name"),
            )
        except ServerNotFoundError as error:
            raise _not_found("server", request["payload"]["server_id"]) from error
        except ServerBeingImagedError as error:
            raise ApiError(
                HTTPStatus.CONFLICT,
                "SERVER_BUSY",
                str(error),
                "wait for the running image to finish (poll it), then ask again",
                job_id=error.job_id,
            ) from error
        return view(state.get_image(job.image_id)).model_dump(mode="json")

    idempotency_config = IdempotencyConfig(
        event_key_jmespath="key", payload_validation_jmespath="payload", expires_after_seconds=IDEMPOTENCY_TTL_S
    )
    idempotent_create: Callable[..., dict[str, Any]] = idempotent_function(
        data_keyword_argument="request", persistence_store=deps.idempotency, config=idempotency_config
    )(_create)

    @app.post(
        "/v1/servers/<server_id>/images",
        summary="Image a server now",
        description="Starts imaging (202). `Idempotency-Key` makes retries safe: the same key and body give the same "
        "image; the same key with another body is 422. 409 while the server is being imaged.",
        responses={202: {"description": "imaging started", "content": {"application/json": {"model": ImageView}}}},
        tags=["images"],
    )
    def create_image(server_id: str, body: Annotated[CreateImageBody | None, Body()] = None) -> Response[str]:
        server = server_of_tenant(server_id)
        request = {
            "tenant": tenant(),
            "payload": {"server_id": server.id, "body": (body or CreateImageBody()).model_dump(mode="json")},
        }
        key = app.current_event.headers.get(IDEMPOTENCY_KEY_HEADER)
        if key is None:
            return json_response(HTTPStatus.ACCEPTED, _create(request))
        if not (0 < len(key) <= 255 and key.isprintable()):
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "INVALID_IDEMPOTENCY_KEY", "Idempotency-Key is 1-255 printable characters"
            )
        request["key"] = f"{tenant()}/{key}"
        # An in-progress record left by a request that died expires with the invocation's remaining time.
        idempotency_config.register_lambda_context(app.lambda_context)
        deadline = time.monotonic() + IN_PROGRESS_WAIT_S
        while True:
            try:
                return json_response(HTTPStatus.ACCEPTED, idempotent_create(request=request))
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

    @app.get("/v1/images/<image_id>", summary="An image's status", tags=["images"])
    def get_image(image_id: str) -> ImageView:
        return view(image_of_tenant(image_id))

    @app.get("/v1/servers/<server_id>/images", summary="A server's images, oldest first", tags=["images"])
    def list_images(server_id: str) -> ImageList:
        server = server_of_tenant(server_id)
        return ImageList(images=[view(image) for image in state.list_images(server_id=server.id)])

    @app.delete(
        "/v1/images/<image_id>",
        summary="Delete an image (object, manifest, record)",
        responses={204: {"description": "deleted"}},
        tags=["images"],
    )
    def remove_image(image_id: str) -> Response[str]:
        image = image_of_tenant(image_id)
        try:
            delete_image(services, image.id)
        except ImageBusyError as error:
            raise ApiError(HTTPStatus.CONFLICT, error.code, str(error), error.hint) from error
        return Response(status_code=HTTPStatus.NO_CONTENT.value, body="")

    @app.get("/v1/servers/<server_id>/image-estimate", summary="Size and time of an image made now", tags=["images"])
    def estimate(server_id: str) -> EstimateView:
        server = server_of_tenant(server_id)
        try:
            found = estimate_server(services, server)
        except ImagingError as error:
            raise ApiError(HTTPStatus.CONFLICT, error.code, str(error), error.hint) from error
        return EstimateView(server_id=server.id, **found.model_dump())

    # --- schedules -------------------------------------------------------------------------------------------------
    @app.put("/v1/servers/<server_id>/image-schedule", summary="Set the server's imaging schedule", tags=["schedules"])
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
        return ScheduleView.of(schedule)

    @app.get("/v1/servers/<server_id>/image-schedule", summary="The server's imaging schedule", tags=["schedules"])
    def get_schedule(server_id: str) -> ScheduleView:
        server = server_of_tenant(server_id)
        try:
            return ScheduleView.of(state.get_schedule(server.id))
        except NotFoundError as error:
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"server {server.id} has no schedule") from error

    @app.delete(
        "/v1/servers/<server_id>/image-schedule",
        summary="Stop imaging the server on a schedule",
        responses={204: {"description": "deleted"}},
        tags=["schedules"],
    )
    def delete_schedule(server_id: str) -> Response[str]:
        server = server_of_tenant(server_id)
        if not state.delete_schedule(server.id):
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"server {server.id} has no schedule")
        return Response(status_code=HTTPStatus.NO_CONTENT.value, body="")

    # --- the document ------------------------------------------------------------------------------------------------
    @app.get("/v1/openapi.json", include_in_schema=False)
    def openapi() -> Response[str]:
        document = app.get_openapi_json_schema(
            title="Cloud Imaging API",
            version="1.0.0",
            description="Image cloud servers' VHD chains into object storage, on demand and on a schedule.",
            security_schemes={"bearer": HTTPBearer()},
            security=[{"bearer": []}],
        )
        return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=document)

    # --- errors ------------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)  # type: ignore[untyped-decorator]  # Powertools leaves it untyped
    def on_api_error(error: ApiError) -> Response[str]:
        return error_response(error.status, error.body)

    @app.exception_handler(RequestValidationError)  # type: ignore[untyped-decorator]  # Powertools leaves it untyped
    def on_invalid_request(error: RequestValidationError) -> Response[str]:
        # The documented HTTPValidationError shape (Powertools' own answer leaves out its required `msg`).
        detail = [
            {
                "loc": list(item.get("loc", ())),
                "msg": str(item.get("msg") or item.get("type")),
                "type": item.get("type"),
            }
            for item in error.errors()
        ]
        where = ", ".join(".".join(str(part) for part in item["loc"]) for item in detail) or "the request"
        body = {
            "error": "INVALID_REQUEST",
            "message": f"invalid {where}",
            "hint": "see /v1/openapi.json for this operation's parameters and body",
            "detail": detail,
        }
        return json_response(HTTPStatus.UNPROCESSABLE_ENTITY, body)

    @app.not_found
    def on_no_route(error: Exception) -> Response[str]:
        return error_response(HTTPStatus.NOT_FOUND, ErrorBody(error="NO_SUCH_ROUTE", message="no such resource"))

    return app
