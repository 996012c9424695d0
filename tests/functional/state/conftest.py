"""Fixtures of the state suite: an injected clock, and each state backend (SQLite file, DynamoDB on moto).

Backends: `sqlite` (a file in tmp_path), `dynamodb-inprocess` (moto's `mock_aws`) and `dynamodb-server` (a moto
server over HTTP, a unique table per test).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from functions.state import StateStore, create_table, open_state_store, persistence_layer_for
from functions.state.idempotency import BasePersistenceLayer
from tests.functional.state.clocks import ManualClock
from tests.support.moto_server import TEST_CREDENTIALS, TEST_REGION

BACKENDS = ["sqlite", "dynamodb-inprocess", "dynamodb-server"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, object]]:
    """(state URL, DynamoDB client or None) of the backend named by the test's `backend` parameter."""
    backend: str = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.sqlite3'}", None
        return
    table = f"state-{uuid.uuid4().hex}"
    request.getfixturevalue("aws_test_env")
    if backend == "dynamodb-server":
        endpoint: str = request.getfixturevalue("moto_endpoint")
        client = boto3.client("dynamodb", endpoint_url=endpoint, region_name=TEST_REGION, **TEST_CREDENTIALS)
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
def store(backend_url: tuple[str, object], clock: ManualClock) -> Iterator[StateStore]:
    url, client = backend_url
    opened = open_state_store(url, client=client, clock=clock)  # type: ignore[arg-type]
    yield opened
    opened.close()


@pytest.fixture
def persistence_layer(backend_url: tuple[str, object]) -> BasePersistenceLayer:
    """The idempotency layer of the backend, on the system clock like Powertools itself."""
    url, client = backend_url
    return persistence_layer_for(url, client=client)  # type: ignore[arg-type]


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
