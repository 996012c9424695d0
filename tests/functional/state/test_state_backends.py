"""What is particular to each backend: the SQLite file (WAL, schema version, reopen) and the DynamoDB table."""

from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from functions.state import (
    CorruptRecordError,
    DynamoDBStateStore,
    InvalidStateUrlError,
    SchemaVersionError,
    Server,
    SqliteStateStore,
    create_table,
    open_state_store,
)
from functions.state.dynamodb_state import TTL_ATTRIBUTE
from functions.state.sqlite_db import SCHEMA_VERSION
from functions.state.urls import DynamoDBLocation, SqliteLocation, parse_state_url
from tests.functional.state.lock_racer import race_for_the_lock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SERVER = Server(id="srv-1", tenant="tenant-a", name="web", disk="/sr/leaf.vhd", created_at=T0)


def test_state_urls() -> None:
    assert parse_state_url("sqlite:////var/lib/imaging/state.sqlite3") == SqliteLocation(
        Path("/var/lib/imaging/state.sqlite3")
    )
    assert parse_state_url("sqlite:///relative/state.db") == SqliteLocation(Path("relative/state.db"))
    assert parse_state_url("dynamodb://imaging-state") == DynamoDBLocation("imaging-state")
    for bad in ["", "sqlite://", "sqlite:///", "sqlite:///dir/", "dynamodb://", "dynamodb://a/b", "postgres://x"]:
        with pytest.raises(InvalidStateUrlError) as rejected:
            parse_state_url(bad)
        assert rejected.value.url == bad


def test_the_sqlite_file_persists_uses_wal_and_records_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "state.sqlite3"
    store = open_state_store(f"sqlite:///{path}")
    assert isinstance(store, SqliteStateStore)
    store.put_server(SERVER)
    store.close()

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    reopened = open_state_store(f"sqlite:///{path}")
    assert reopened.get_server("srv-1") == SERVER
    reopened.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    SqliteStateStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaVersionError) as refused:
        SqliteStateStore(path)
    assert refused.value.found == SCHEMA_VERSION + 1


def test_a_corrupt_record_raises_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = SqliteStateStore(path)
    store.put_server(SERVER)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE servers SET doc = ? WHERE id = 'srv-1'", ('{"id": "../../x"}',))
    with pytest.raises(CorruptRecordError) as corrupt:
        store.get_server("srv-1")
    assert (corrupt.value.kind, corrupt.value.record_id) == ("server", "srv-1")
    store.close()


@pytest.mark.usefixtures("aws_test_env")
def test_the_dynamodb_table_has_the_documented_keys_indexes_and_ttl() -> None:
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_table(client, "imaging-state")
        table = client.describe_table(TableName="imaging-state")["Table"]
        assert {(key["AttributeName"], key["KeyType"]) for key in table["KeySchema"]} == {
            ("pk", "HASH"),
            ("sk", "RANGE"),
        }
        indexes = {index["IndexName"]: index["KeySchema"] for index in table.get("GlobalSecondaryIndexes", [])}
        assert {name: [key["AttributeName"] for key in schema] for name, schema in indexes.items()} == {
            "gsi1": ["gsi1pk", "gsi1sk"],
            "gsi2": ["gsi2pk", "gsi2sk"],
        }
        ttl = client.describe_time_to_live(TableName="imaging-state")["TimeToLiveDescription"]
        assert (ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")) == ("ENABLED", TTL_ATTRIBUTE)

        store = open_state_store("dynamodb://imaging-state", client=client)
        assert isinstance(store, DynamoDBStateStore)
        store.put_server(SERVER)
        assert store.get_server("srv-1") == SERVER


@pytest.mark.usefixtures("aws_test_env")
def test_a_lock_item_carries_the_ttl_attribute_in_epoch_seconds() -> None:
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_table(client, "imaging-state")
        store = DynamoDBStateStore(client, "imaging-state", clock=lambda: T0)
        assert store.acquire_lock("srv-1", "job-1", 90)
        item = client.get_item(TableName="imaging-state", Key={"pk": {"S": "LOCK#srv-1"}, "sk": {"S": "LOCK"}})["Item"]
        assert float(item[TTL_ATTRIBUTE]["N"]) == T0.timestamp() + 90


def test_processes_sharing_the_sqlite_file_get_exactly_one_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    SqliteStateStore(path).close()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(6), context.Queue()
    racers = [
        context.Process(target=race_for_the_lock, args=(str(path), f"proc-{index}", barrier, results))
        for index in range(6)
    ]
    for racer in racers:
        racer.start()
    outcomes = dict(results.get(timeout=120) for _ in racers)
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0

    winners = [owner for owner, won in outcomes.items() if won]
    assert len(outcomes) == 6 and len(winners) == 1
    lock = SqliteStateStore(path).get_lock("srv-1")
    assert lock is not None and lock.owner == winners[0]
