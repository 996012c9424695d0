"""Idempotency with aws-lambda-powertools in both modes: the same `idempotent_function` decorator everywhere.

On AWS, Powertools' own DynamoDBPersistenceLayer writes into the state table (partition `IDEMPOTENCY`, sort key the
Powertools key, expiry in the table's TTL attribute). Locally, `SqlitePersistenceLayer` keeps the same records in
the state file's `idempotency` table with the same conditions as the DynamoDB layer: a record may be (re)written
only if it is absent, expired, or INPROGRESS past its in-progress expiry; otherwise the writer gets
IdempotencyItemAlreadyExistsError carrying the stored record, so a concurrent duplicate never runs the function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import boto3
from aws_lambda_powertools.utilities.idempotency import BasePersistenceLayer, DynamoDBPersistenceLayer
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import STATUS_CONSTANTS, DataRecord

from functions.state.clock import Clock, system_clock
from functions.state.dynamodb_state import IDEMPOTENCY_PARTITION, TTL_ATTRIBUTE
from functions.state.sqlite_db import SqliteDatabase
from functions.state.urls import SqliteLocation, parse_state_url

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

# Attribute names of idempotency records in the DynamoDB state table (the SQLite columns mirror them).
IN_PROGRESS_EXPIRY_ATTRIBUTE: Final = "in_progress_expires_at"
STATUS_ATTRIBUTE: Final = "status"
DATA_ATTRIBUTE: Final = "data"
VALIDATION_ATTRIBUTE: Final = "validation"

_COLUMNS: Final = "status, expiration, in_progress_expiration, data, validation"


class SqlitePersistenceLayer(BasePersistenceLayer):
    """Powertools persistence layer on the SQLite state file."""

    def __init__(self, database: SqliteDatabase, *, clock: Clock = system_clock) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.database = database
        self._clock = clock

    @staticmethod
    def _record(key: str, row: tuple[str, int, int | None, str | None, str | None]) -> DataRecord:
        status, expiration, in_progress_expiration, data, validation = row
        return DataRecord(
            idempotency_key=key,
            status=status,
            expiry_timestamp=expiration,
            in_progress_expiry_timestamp=in_progress_expiration,
            response_data=data or "",
            payload_hash=validation or "",
        )

    def _get_record(self, idempotency_key: str) -> DataRecord:
        row = (
            self.database.read()
            .execute(f"SELECT {_COLUMNS} FROM idempotency WHERE key = ?", (idempotency_key,))
            .fetchone()
        )
        if row is None:
            raise IdempotencyItemNotFoundError
        return self._record(idempotency_key, row)

    def _put_record(self, data_record: DataRecord) -> None:
        now = self._clock().timestamp()
        now_seconds, now_millis = int(now), int(now * 1000)
        key = data_record.idempotency_key
        with self.database.write() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM idempotency WHERE key = ?", (key,)).fetchone()
            if row is not None:
                status, expiration, in_progress_expiration = row[0], int(row[1]), row[2]
                expired = expiration < now_seconds
                in_progress_timed_out = (
                    status == STATUS_CONSTANTS["INPROGRESS"]
                    and in_progress_expiration is not None
                    and int(in_progress_expiration) < now_millis
                )
                if not (expired or in_progress_timed_out):
                    stored = self._record(key, row)
                    # As the DynamoDB layer does with the item returned by the failed condition.
                    self._validate_payload(data_payload=data_record, stored_data_record=stored)
                    self._save_to_cache(data_record=stored)
                    raise IdempotencyItemAlreadyExistsError(old_data_record=stored)
            validation = (
                data_record.payload_hash if self.payload_validation_enabled and data_record.payload_hash else None
            )
            db.execute(
                f"INSERT OR REPLACE INTO idempotency (key, {_COLUMNS}) VALUES (?, ?, ?, ?, NULL, ?)",
                (
                    key,
                    data_record.status,
                    data_record.expiry_timestamp,
                    data_record.in_progress_expiry_timestamp,
                    validation,
                ),
            )

    def _update_record(self, data_record: DataRecord) -> None:
        # An upsert, like DynamoDB's UpdateItem; the in-progress expiry is left as it was.
        validation = data_record.payload_hash if self.payload_validation_enabled else None
        with self.database.write() as db:
            db.execute(
                "INSERT INTO idempotency (key, status, expiration, data, validation) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET status = excluded.status, expiration = excluded.expiration, "
                "data = excluded.data, validation = COALESCE(excluded.validation, idempotency.validation)",
                (
                    data_record.idempotency_key,
                    data_record.status,
                    data_record.expiry_timestamp,
                    data_record.response_data,
                    validation,
                ),
            )

    def _delete_record(self, data_record: DataRecord) -> None:
        with self.database.write() as db:
            db.execute("DELETE FROM idempotency WHERE key = ?", (data_record.idempotency_key,))

    def close(self) -> None:
        self.database.close()


def dynamodb_persistence_layer(client: DynamoDBClient, table: str) -> DynamoDBPersistenceLayer:
    """Powertools' DynamoDB layer configured for the state table's key schema and TTL attribute."""
    return DynamoDBPersistenceLayer(
        table_name=table,
        key_attr="pk",
        sort_key_attr="sk",
        static_pk_value=IDEMPOTENCY_PARTITION,
        expiry_attr=TTL_ATTRIBUTE,
        in_progress_expiry_attr=IN_PROGRESS_EXPIRY_ATTRIBUTE,
        status_attr=STATUS_ATTRIBUTE,
        data_attr=DATA_ATTRIBUTE,
        validation_key_attr=VALIDATION_ATTRIBUTE,
        boto3_client=client,
    )


def persistence_layer_for(
    state_url: str,
    *,
    endpoint_url: str | None = None,
    client: DynamoDBClient | None = None,
    clock: Clock = system_clock,
) -> BasePersistenceLayer:
    """The idempotency persistence layer that lives beside the state of `state_url`.

    `clock` applies to the SQLite layer; Powertools' DynamoDB layer reads the system time itself.
    """
    location = parse_state_url(state_url)
    if isinstance(location, SqliteLocation):
        return SqlitePersistenceLayer(SqliteDatabase(location.path), clock=clock)
    return dynamodb_persistence_layer(client or boto3.client("dynamodb", endpoint_url=endpoint_url), location.table)
