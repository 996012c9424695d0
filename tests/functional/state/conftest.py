"""Fixtures of the state suite: an injected clock, and each state backend (SQLite file, DynamoDB on moto).

Backends: `sqlite` (a file in tmp_path), `dynamodb-inprocess` (moto's `mock_aws`) and `dynamodb-server` (a moto
server over HTTP, a unique table per test).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import BasePersistenceLayer
from moto import mock_aws
from moto.dynamodb.models import DynamoDBBackend

from functions.state import SqlitePersistenceLayer, StateStore, create_table, open_state_store, persistence_layer_for
from tests.functional.state.clocks import ManualClock
from tests.support.moto_server import TEST_CREDENTIALS, TEST_REGION

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

BACKENDS = ["sqlite", "dynamodb-inprocess", "dynamodb-server"]


_MOTO_WRITE_GUARD = threading.RLock()


@pytest.fixture(autouse=True)
def atomic_moto_dynamodb_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make moto's DynamoDB evaluate each write's condition and apply it as one step, as DynamoDB does.

    moto checks a ConditionExpression and then writes with no lock between the two, so two threads can both pass
    the same condition (seen here: an idempotent function run twice by 20 racing duplicates). The race tests are
    about our conditions, not moto's thread safety: serialise moto's writes (in-process and in the moto server,
    which runs in this process too). A write without the right condition still lets every racer win.
    """
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)

        def serialised(*args: object, __original: Callable[..., object] = original, **kwargs: object) -> object:
            with _MOTO_WRITE_GUARD:
                return __original(*args, **kwargs)

        monkeypatch.setattr(DynamoDBBackend, name, serialised)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, DynamoDBClient | None]]:
    """(state URL, DynamoDB client or None) of the backend named by the test's `backend` parameter."""
    backend: str = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.sqlite3'}", None
        return
    table = f"state-{uuid.uuid4().hex}"
    request.getfixturevalue("aws_test_env")
    if backend == "dynamodb-server":
        endpoint: str = request.getfixturevalue("moto_endpoint")
        client = boto3.client(
            "dynamodb",
            endpoint_url=endpoint,
            region_name=TEST_REGION,
            aws_access_key_id=TEST_CREDENTIALS["aws_access_key_id"],
            aws_secret_access_key=TEST_CREDENTIALS["aws_secret_access_key"],
        )
        create_table(client, table)
        yield f"dynamodb://{table}", client
        client.delete_table(TableName=table)
        return
    with mock_aws():
        client = boto3.client("dynamodb", region_name=TEST_REGION)
        create_table(client, table)
        yield f"dynamodb://{table}", client


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_url" in metafunc.fixturenames:
        metafunc.parametrize("backend_url", BACKENDS, indirect=True)


@pytest.fixture
def store(backend_url: tuple[str, DynamoDBClient | None], clock: ManualClock) -> Iterator[StateStore]:
    url, client = backend_url
    opened = open_state_store(url, client=client, clock=clock)
    yield opened
    opened.close()


@pytest.fixture
def persistence_layer(backend_url: tuple[str, DynamoDBClient | None]) -> Iterator[BasePersistenceLayer]:
    """The idempotency layer of the backend, on the system clock like Powertools itself."""
    url, client = backend_url
    layer = persistence_layer_for(url, client=client)
    yield layer
    if isinstance(layer, SqlitePersistenceLayer):
        layer.close()


@pytest.fixture
def run_threads() -> Callable[[int, Callable[[int], object]], list[object]]:
    """Run `work(i)` in `count` threads released together by a barrier; the results (or exceptions) by index."""

    def run(count: int, work: Callable[[int], object]) -> list[object]:
        barrier = threading.Barrier(count)
        results: list[object] = [None] * count

        def target(index: int) -> None:
            barrier.wait()
            try:
                results[index] = work(index)
            except Exception as error:
                results[index] = error

        threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a racing thread did not finish"
        return results

    return run
