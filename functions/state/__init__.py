"""Job and image state, per-server locks and idempotency, on SQLite (embedded default) or DynamoDB (AWS).

`open_state_store(url)` picks the backend from the state URL (`sqlite:///PATH` or `dynamodb://TABLE`);
`persistence_layer_for(url)` gives the Powertools idempotency layer that lives beside it.

The DynamoDB store and the idempotency layers (boto3, botocore, Powertools) are imported when first used, not with
this package: the SQLite store and the models serve the CLI without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from functions.state.clock import Clock, system_clock
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
    token_id_of,
    validate_id,
)
from functions.state.sqlite_state import SqliteStateStore
from functions.state.store import StateStore, modify_job
from functions.state.urls import SqliteLocation, parse_state_url

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

    from functions.state.dynamodb_state import DynamoDBStateStore, create_table
    from functions.state.idempotency import SqlitePersistenceLayer, persistence_layer_for

_LAZY = {
    "DynamoDBStateStore": "functions.state.dynamodb_state",
    "create_table": "functions.state.dynamodb_state",
    "SqlitePersistenceLayer": "functions.state.idempotency",
    "persistence_layer_for": "functions.state.idempotency",
}
"""Names whose modules import boto3 or Powertools: imported on first use (PEP 562)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "token_id_of",
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
    import boto3

    from functions.state.dynamodb_state import DynamoDBStateStore

    return DynamoDBStateStore(
        client or boto3.client("dynamodb", endpoint_url=endpoint_url), location.table, clock=clock
    )
