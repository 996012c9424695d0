"""Job and image state, per-server locks and idempotency, on SQLite (embedded default) or DynamoDB (AWS).

`open_state_store(url)` picks the backend from the state URL (`sqlite:///PATH` or `dynamodb://TABLE`);
`persistence_layer_for(url)` gives the Powertools idempotency layer that lives beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3

from functions.state.clock import Clock, system_clock
from functions.state.dynamodb_state import DynamoDBStateStore, create_table
from functions.state.errors import (
    AlreadyExistsError,
    CorruptRecordError,
    InvalidIdError,
    InvalidStateUrlError,
    NotFoundError,
    PreconditionFailedError,
    RecordTooLargeError,
    SchemaVersionError,
    StateError,
    VersionConflictError,
)
from functions.state.idempotency import SqlitePersistenceLayer, persistence_layer_for
from functions.state.models import (
    PROGRESS_OF_STATUS,
    ApiToken,
    Image,
    ImageOrigin,
    InvalidTransitionError,
    Job,
    JobEvent,
    LockInfo,
    PendingMerge,
    Schedule,
    ScheduleFrequency,
    Server,
    Status,
    hash_token,
    validate_id,
)
from functions.state.sqlite_state import SqliteStateStore
from functions.state.store import StateStore, modify_job
from functions.state.urls import SqliteLocation, parse_state_url

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

__all__ = [
    "PROGRESS_OF_STATUS",
    "AlreadyExistsError",
    "ApiToken",
    "CorruptRecordError",
    "DynamoDBStateStore",
    "Image",
    "ImageOrigin",
    "InvalidIdError",
    "InvalidStateUrlError",
    "InvalidTransitionError",
    "Job",
    "JobEvent",
    "LockInfo",
    "NotFoundError",
    "PendingMerge",
    "PreconditionFailedError",
    "RecordTooLargeError",
    "Schedule",
    "ScheduleFrequency",
    "SchemaVersionError",
    "Server",
    "SqlitePersistenceLayer",
    "SqliteStateStore",
    "StateError",
    "StateStore",
    "Status",
    "VersionConflictError",
    "create_table",
    "hash_token",
    "modify_job",
    "open_state_store",
    "persistence_layer_for",
    "validate_id",
]


def open_state_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    client: DynamoDBClient | None = None,
    clock: Clock = system_clock,
) -> StateStore:
    """The state store at `url`. For DynamoDB, `client` wins over `endpoint_url` (else the standard AWS settings).

    The DynamoDB table must exist (infra creates it; `create_table` makes one for tests and local endpoints).
    """
    location = parse_state_url(url)
    if isinstance(location, SqliteLocation):
        return SqliteStateStore(location.path, clock=clock)
    return DynamoDBStateStore(
        client or boto3.client("dynamodb", endpoint_url=endpoint_url), location.table, clock=clock
    )
