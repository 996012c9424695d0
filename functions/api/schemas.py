"""The HTTP API's request and response bodies (DESIGN §6); the OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from functions.catalog.estimates import ServerEstimate
from functions.catalog.schedules import WEEKDAYS, next_run
from functions.state import Image, Job, Schedule, ScheduleFrequency, Server, Status


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateImageBody(_Body):
    """Optional settings of an on-demand image."""

    name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")] | None = None
    all_blocks: bool = Field(
        default=False,
        description="Image every block. By default an image holds the live data only: the ranges the disk's "
        "filesystems prove free (ext2/3/4, XFS, NTFS, swap) are stored as zeros; anything in doubt is kept. "
        "A server's own all_blocks setting turns this on for all its images.",
    )


class ImageView(BaseModel):
    """An image and the job making it: status with the customary progress (0, 25, 50, 100), bytes, ETA, sizes."""

    id: str
    server_id: str | None
    name: str
    status: Status
    progress: Literal[0, 25, 50, 100]
    origin: str
    job_id: str | None
    bytes_done: int = 0
    bytes_total: int | None = None
    eta_seconds: float | None = None
    virtual_size: int | None = None
    compressed_size: int | None = None
    estimated_size: int | None = None
    object_url: str | None = None
    error_code: str | None = None
    error_hint: str | None = None
    created_at: datetime

    @classmethod
    def of(cls, image: Image, job: Job | None) -> ImageView:
        estimated = (image.manifest or {}).get("estimated_compressed_size", {}).get("point")
        return cls(
            id=image.id,
            server_id=image.server_id,
            name=image.name,
            status=image.status,
            progress=job.progress if job is not None else (100 if image.status is Status.ACTIVE else 0),
            origin=str(image.origin),
            job_id=image.job_id,
            bytes_done=job.bytes_done if job else 0,
            bytes_total=job.bytes_total if job else None,
            eta_seconds=job.eta_seconds if job else None,
            virtual_size=image.virtual_size,
            compressed_size=image.compressed_size,
            estimated_size=estimated if isinstance(estimated, int) else None,
            object_url=image.object_url,
            error_code=job.error_code if job else None,
            error_hint=job.error_hint if job else None,
            created_at=image.created_at,
        )


class ImageList(BaseModel):
    """One page of a server's images, oldest first; `next_cursor` asks for the next page (null: the last one)."""

    images: list[ImageView]
    next_cursor: str | None = None


class ServerView(BaseModel):
    """A server of the tenant. Servers are the platform's: an operator registers them (`imaging server add`)."""

    id: str
    name: str
    flavor: str
    created_at: datetime

    @classmethod
    def of(cls, server: Server) -> ServerView:
        return cls(id=server.id, name=server.name, flavor=server.flavor, created_at=server.created_at)


class ServerList(BaseModel):
    """One page of the tenant's servers, by id; `next_cursor` asks for the next page (null: the last one)."""

    servers: list[ServerView]
    next_cursor: str | None = None


class RestoreBody(_Body):
    """The new server an image is restored into (of the caller's tenant; its disk goes where the platform keeps
    servers' disks)."""

    server: Annotated[str, Field(min_length=1, max_length=64)]
    flavor: Annotated[str, Field(min_length=1, max_length=64)] = "standard"


class RestoredView(BaseModel):
    """A server made from an image: its disk is a dynamic VHD whose content has the image's content hash."""

    server: ServerView
    image_id: str
    virtual_size: int
    content_sha256: str
    seconds: float


class CancelView(BaseModel):
    """What a cancel found and did: `cancelled` once the job has stopped (ERROR CANCELLED); while `requested` and
    not yet stopped, follow the image with GET /v1/images/{id}."""

    image_id: str
    job_id: str | None
    status: Status
    error_code: str | None
    requested: bool
    cancelled: bool


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class EstimateView(ServerEstimate):
    """What imaging the server now would produce and take, before starting."""

    server_id: str


class ScheduleBody(_Body):
    """`daily` at HH:MM UTC, or `weekly` on a weekday at HH:MM UTC; keep the newest `retention` scheduled images."""

    frequency: ScheduleFrequency
    at: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["02:30"])]
    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] | None = None
    retention: Annotated[int, Field(ge=1, le=1000)] = 7

    @field_validator("weekday", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class ScheduleView(BaseModel):
    server_id: str
    frequency: ScheduleFrequency
    at: str
    weekday: str | None
    retention: int
    last_window_started: datetime | None
    next_run: datetime
    """The next instant (UTC) at which the schedule fires."""

    @classmethod
    def of(cls, schedule: Schedule, now: datetime) -> ScheduleView:
        return cls(
            server_id=schedule.server_id,
            frequency=schedule.frequency,
            at=schedule.at.strftime("%H:%M"),
            weekday=None if schedule.weekday is None else WEEKDAYS[schedule.weekday],
            retention=schedule.retention,
            last_window_started=schedule.last_window_started,
            next_run=next_run(schedule, now),
        )


class ValidationIssue(BaseModel):
    """One thing wrong with a request's parameters or body: where (`loc`), what (`msg`), its kind (`type`)."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error answer: a stable code, what was wrong, and what to do.

    `detail` lists what was invalid (INVALID_REQUEST, 422); `job_id` and `image_id` name the running job and its
    image when a server is busy (SERVER_BUSY, 409): `GET /v1/images/{image_id}` follows it.
    """

    error: str
    message: str
    hint: str | None = None
    detail: list[ValidationIssue] | None = None
    job_id: str | None = None
    image_id: str | None = None
