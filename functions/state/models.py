"""The records of the state layer (pydantic v2): servers, jobs, images, schedules, API tokens and locks.

Ids follow one strict pattern (letters, digits, `-` and `_`, starting with a letter or digit, at most 80 characters:
what Step Functions accepts for an execution name) so that no id can reach a store path or key as `../` or junk.
Times are aware datetimes normalised to UTC.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, time
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from functions.state.errors import InvalidIdError, StateError

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")
FLAVOR_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_HASH_PATTERN: Final = re.compile(r"[0-9a-f]{64}")
_CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x1f\x7f]")


def validate_id(kind: str, value: object, pattern: re.Pattern[str] = ID_PATTERN) -> str:
    """`value` if it is a well-formed id of that kind, else InvalidIdError naming the kind and the value."""
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidIdError(kind, value, pattern.pattern)
    return value


def _id_of(kind: str, pattern: re.Pattern[str] = ID_PATTERN) -> AfterValidator:
    return AfterValidator(lambda value: validate_id(kind, value, pattern))


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _printable(text: str) -> str:
    if _CONTROL_CHARACTERS.search(text):
        raise ValueError("control characters are not allowed")
    return text


ServerId = Annotated[str, _id_of("server")]
JobId = Annotated[str, _id_of("job")]
ImageId = Annotated[str, _id_of("image")]
TenantId = Annotated[str, _id_of("tenant")]
LockOwner = Annotated[str, _id_of("lock owner")]
Flavor = Annotated[str, _id_of("flavor", FLAVOR_PATTERN)]
TokenHash = Annotated[str, _id_of("token hash", TOKEN_HASH_PATTERN)]
TokenId = Annotated[str, _id_of("token")]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
DisplayName = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_printable)]
DiskLocation = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_printable)]
"""A leaf disk as a path or a store URL; the storage layer validates it further when it opens it."""


class Status(StrEnum):
    """The status names shared by jobs and images (DESIGN §6)."""

    QUEUED = "QUEUED"
    SAVING = "SAVING"
    UPLOADING = "UPLOADING"
    ACTIVE = "ACTIVE"
    ERROR = "ERROR"


PROGRESS_OF_STATUS: Final = {Status.QUEUED: 0, Status.SAVING: 25, Status.UPLOADING: 50, Status.ACTIVE: 100}
TERMINAL_STATUSES: Final = frozenset({Status.ACTIVE, Status.ERROR})
_NEXT_STATUS: Final = {Status.QUEUED: Status.SAVING, Status.SAVING: Status.UPLOADING, Status.UPLOADING: Status.ACTIVE}

Progress = Literal[0, 25, 50, 100]


class InvalidTransitionError(StateError):
    """A job asked to move to a status its current status cannot reach."""

    def __init__(self, job_id: str, current: Status, requested: Status) -> None:
        self.job_id = job_id
        self.current = current
        self.requested = requested
        super().__init__(f"job {job_id!r} cannot go from {current} to {requested}")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PendingMerge(_Record):
    """A merge of a chain kept in object storage, recorded before its new object is written: the next slice resumes
    its upload (parts already stored are kept) or, if the chain moved on, discards it, so no object is orphaned."""

    child: DiskLocation
    """The read-only layer being merged into its parent."""
    parent: DiskLocation
    key: DiskLocation
    """The merged layer's new object."""
    upload_id: Annotated[str, Field(min_length=1, max_length=1024)]


class Server(_Record):
    id: ServerId
    tenant: TenantId
    name: DisplayName
    disk: DiskLocation
    flavor: Flavor = "standard"
    created_at: UtcDatetime
    chain: tuple[DiskLocation, ...] | None = None
    """The layers of a chain kept in object storage, leaf first (`chain[0] == disk`), once recorded by a snapshot or
    a merge; None: the chain is found from `disk` through its locators."""
    garbage: tuple[DiskLocation, ...] = ()
    """Layers a merge took out of the chain, deleted after the record that dropped them was stored."""
    merging: PendingMerge | None = None
    """The merge in progress, if any."""
    all_blocks: bool = False
    """Image every block of this server's disk: filesystem-aware imaging (DESIGN §5, live data only) off."""


class JobEvent(_Record):
    """One state change in a job's history."""

    status: Status
    at: UtcDatetime
    detail: Annotated[str, Field(max_length=1024)] | None = None


class Job(_Record):
    """One imaging run. `version` grows by one with every stored update (optimistic concurrency)."""

    id: JobId
    tenant: TenantId
    server_id: ServerId | None = None
    disk: DiskLocation | None = None
    image_id: ImageId
    status: Status = Status.QUEUED
    progress: Progress = 0
    bytes_done: Annotated[int, Field(ge=0)] = 0
    bytes_total: Annotated[int, Field(ge=0)] | None = None
    eta_seconds: Annotated[float, Field(ge=0)] | None = None
    error_code: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    error_hint: Annotated[str, Field(max_length=1024)] | None = None
    history: tuple[JobEvent, ...] = ()
    execution_name: LockOwner | None = None
    upload_id: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    version: Annotated[int, Field(ge=0)] = 0
    heartbeat_at: UtcDatetime | None = None
    """When the job's runner last said it is alive (DESIGN §3, "Jobs outlive their runners"): a job not finished
    whose heartbeat is older than the recovery threshold has lost its runner."""
    cancel_requested_at: UtcDatetime | None = None
    """When `imaging image cancel` asked the job to stop: its runner fails it CANCELLED at its next heartbeat."""
    abandoned_at: UtcDatetime | None = None
    """When its runner gave it up on purpose (a server shutting down, a command interrupted): recovered at once,
    without waiting for the heartbeat to go stale."""
    runs: Annotated[int, Field(ge=1)] = 1
    """Executions started for the job: a resumed job runs again under its own id (bounded)."""
    all_blocks: bool = False
    """Image every block (asked by the request or set on the server): the ranges a filesystem proves free are
    stored too; False: live data only (DESIGN §5)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.server_id is None and self.disk is None:
            raise ValueError("a job images a server (server_id) or a disk (disk)")
        if self.status is not Status.ERROR and self.progress != PROGRESS_OF_STATUS[self.status]:
            expected = PROGRESS_OF_STATUS[self.status]
            raise ValueError(f"progress of a {self.status} job is {expected}, not {self.progress}")
        if self.status is Status.ERROR and self.error_code is None:
            raise ValueError("an ERROR job carries an error_code")
        if self.bytes_total is not None and self.bytes_done > self.bytes_total:
            raise ValueError(f"bytes_done {self.bytes_done} exceeds bytes_total {self.bytes_total}")
        return self

    @classmethod
    def queued(cls, *, at: datetime, **fields: Any) -> Job:
        """A new job at 0%, its history starting with QUEUED."""
        return cls(
            status=Status.QUEUED,
            progress=0,
            history=(JobEvent(status=Status.QUEUED, at=at),),
            created_at=at,
            updated_at=at,
            **fields,
        )

    def transition(
        self,
        status: Status,
        *,
        at: datetime,
        detail: str | None = None,
        error_code: str | None = None,
        error_hint: str | None = None,
    ) -> Job:
        """This job moved to `status` (next step, or ERROR from any unfinished step), with the change in history."""
        if self.status in TERMINAL_STATUSES or (status is not Status.ERROR and _NEXT_STATUS.get(self.status) != status):
            raise InvalidTransitionError(self.id, self.status, status)
        changes: dict[str, Any] = {
            "status": status,
            "updated_at": at,
            "history": (*self.history, JobEvent(status=status, at=at, detail=detail)),
        }
        if status is Status.ERROR:
            changes |= {"error_code": error_code, "error_hint": error_hint, "eta_seconds": None}
        else:
            changes["progress"] = PROGRESS_OF_STATUS[status]
        if status is Status.ACTIVE:
            changes["eta_seconds"] = 0.0
        return self.revised(**changes)

    def revised(self, **changes: Any) -> Job:
        """A copy with `changes` applied and validated (model_copy alone would skip validation)."""
        return Job.model_validate({**self.model_dump(), **changes})

    @property
    def last_sign_of_life(self) -> datetime:
        """The latest of its heartbeat and its last update (a job that never beat is judged by its updates)."""
        return max(self.heartbeat_at or self.updated_at, self.updated_at)


class ImageOrigin(StrEnum):
    ON_DEMAND = "on-demand"
    SCHEDULED = "scheduled"


class Image(_Record):
    id: ImageId
    tenant: TenantId
    server_id: ServerId | None = None
    job_id: JobId | None = None
    name: DisplayName
    status: Status = Status.QUEUED
    origin: ImageOrigin = ImageOrigin.ON_DEMAND
    object_url: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    manifest: dict[str, Any] = Field(default_factory=dict)
    virtual_size: Annotated[int, Field(ge=0)] | None = None
    compressed_size: Annotated[int, Field(ge=0)] | None = None
    created_at: UtcDatetime


class ScheduleFrequency(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"


class Schedule(_Record):
    """When a server is imaged automatically and how many scheduled images are kept. `weekday`: 0 is Monday."""

    server_id: ServerId
    tenant: TenantId
    frequency: ScheduleFrequency
    at: time
    weekday: Annotated[int, Field(ge=0, le=6)] | None = None
    retention: Annotated[int, Field(ge=1, le=1000)]
    last_window_started: UtcDatetime | None = None
    created_at: UtcDatetime

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.frequency is ScheduleFrequency.WEEKLY) != (self.weekday is not None):
            raise ValueError("a weekly schedule has a weekday and a daily one has none")
        if self.at.tzinfo is not None or self.at.second or self.at.microsecond:
            raise ValueError("the time of day is HH:MM in UTC, without seconds or zone")
        return self


def hash_token(secret: str) -> str:
    """The stored form of an API token: its SHA-256 (tokens are 256-bit random, so no salt or stretching is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_id_of(token_hash: str) -> str:
    """The public id of the token whose hash is `token_hash`: shown by `token list`, named by `token revoke`.

    Derived (a hash of the hash), so records stored before tokens had ids get the same one, and neither the secret
    nor its stored hash can be recovered from it."""
    return "tok-" + hashlib.sha256(b"token-id:" + token_hash.encode()).hexdigest()[:16]


class ApiToken(_Record):
    """An API token of a tenant, stored only as its hash; `id` names it without revealing either."""

    token_hash: TokenHash
    tenant: TenantId
    created_at: UtcDatetime
    id: TokenId = ""
    """Always `token_id_of(token_hash)` (filled in when not given)."""
    last_used_at: UtcDatetime | None = None
    """When the token last authenticated a request (functions.catalog.tokens records it, at a coarse resolution)."""

    @model_validator(mode="before")
    @classmethod
    def _with_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("id") and isinstance(data.get("token_hash"), str):
            return {**data, "id": token_id_of(data["token_hash"])}
        return data

    @model_validator(mode="after")
    def _id_matches(self) -> Self:
        if self.id != token_id_of(self.token_hash):
            raise ValueError(f"token id {self.id!r} is not the id of its hash")
        return self

    @classmethod
    def issue(cls, tenant: str, *, at: datetime) -> tuple[str, ApiToken]:
        """A new random token (shown to the user once) and the record to store."""
        secret = secrets.token_urlsafe(32)
        return secret, cls(token_hash=hash_token(secret), tenant=tenant, created_at=at)


class LockInfo(_Record):
    """Who holds a server's imaging lock and until when (a holder that crashed loses it at `expires_at`)."""

    server_id: ServerId
    owner: LockOwner
    acquired_at: UtcDatetime
    expires_at: UtcDatetime
