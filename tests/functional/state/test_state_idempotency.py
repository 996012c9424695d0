"""Powertools' `idempotent_function` on every backend's persistence layer (SQLite locally, DynamoDB on AWS)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import pytest
from aws_lambda_powertools.utilities.idempotency import BasePersistenceLayer, IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)

from functions.state.dynamodb_state import IDEMPOTENCY_PARTITION, TTL_ATTRIBUTE
from functions.state.idempotency import DATA_ATTRIBUTE, STATUS_ATTRIBUTE
from functions.state.urls import SqliteLocation, parse_state_url

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

CreateImage = Callable[..., dict[str, Any]]


class Killed(BaseException):
    """The process died mid-run: unlike an exception, nothing runs after it (Powertools keeps the record)."""


class LambdaContextStub:
    """What Powertools reads from a Lambda context: the time left before the invocation is killed."""

    def __init__(self, remaining_millis: int) -> None:
        self.remaining_millis = remaining_millis

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_millis


class Recorder:
    """Counts the runs of the protected function; `gate`, when set, holds each run until the test opens it."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fail_next = False
        self.kill_next = False
        self.context = LambdaContextStub(remaining_millis=600_000)
        self._guard = threading.Lock()

    def make(self, layer: BasePersistenceLayer) -> CreateImage:
        config = IdempotencyConfig(event_key_jmespath="key", payload_validation_jmespath="body")
        config.register_lambda_context(self.context)  # type: ignore[arg-type]

        @idempotent_function(data_keyword_argument="request", persistence_store=layer, config=config)  # type: ignore[untyped-decorator]
        def create_image(request: dict[str, Any]) -> dict[str, Any]:
            with self._guard:
                self.runs.append(request)
                fail, self.fail_next = self.fail_next, False
                kill, self.kill_next = self.kill_next, False
            self.entered.set()
            if kill:
                raise Killed
            if self.gate is not None:
                assert self.gate.wait(timeout=60)
            if fail:
                raise RuntimeError("storage unavailable")
            # A fresh id per run: a second run would answer differently from the first.
            return {"image_id": f"img-{uuid.uuid4().hex}", "server": request["body"]["server"]}

        return cast(CreateImage, create_image)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def create_image(recorder: Recorder, persistence_layer: BasePersistenceLayer) -> CreateImage:
    return recorder.make(persistence_layer)


def request(key: str, server: str = "srv-1") -> dict[str, Any]:
    return {"key": key, "body": {"server": server}}


def test_a_replayed_key_returns_the_first_result(recorder: Recorder, create_image: CreateImage) -> None:
    first = create_image(request=request("k-1"))
    replay = create_image(request=request("k-1"))
    other = create_image(request=request("k-2"))

    assert replay == first
    assert other != first
    assert len(recorder.runs) == 2


def test_the_same_key_with_another_body_is_refused(recorder: Recorder, create_image: CreateImage) -> None:
    create_image(request=request("k-1", server="srv-1"))
    with pytest.raises(IdempotencyValidationError):
        create_image(request=request("k-1", server="srv-2"))
    assert len(recorder.runs) == 1


def test_a_duplicate_during_the_first_run_does_not_run_twice(recorder: Recorder, create_image: CreateImage) -> None:
    recorder.gate = threading.Event()
    results: dict[str, object] = {}
    first = threading.Thread(target=lambda: results.update(first=create_image(request=request("k-1"))))
    first.start()
    assert recorder.entered.wait(timeout=60)

    with pytest.raises(IdempotencyAlreadyInProgressError):
        create_image(request=request("k-1"))

    recorder.gate.set()
    first.join(timeout=60)
    assert not first.is_alive()
    assert create_image(request=request("k-1")) == results["first"]
    assert len(recorder.runs) == 1


def test_twenty_racing_duplicates_run_once(
    recorder: Recorder,
    create_image: CreateImage,
    run_threads: Callable[[int, Callable[[int], object]], list[object]],
) -> None:
    results = run_threads(20, lambda _: create_image(request=request("k-race")))

    assert len(recorder.runs) == 1
    answers = [result for result in results if isinstance(result, dict)]
    refused = [result for result in results if isinstance(result, IdempotencyAlreadyInProgressError)]
    assert len(answers) + len(refused) == 20, results
    assert answers, "the winner answers"
    assert all(answer == answers[0] for answer in answers)
    assert create_image(request=request("k-race")) == answers[0]


def test_a_failed_run_can_be_retried(recorder: Recorder, create_image: CreateImage) -> None:
    recorder.fail_next = True
    with pytest.raises(RuntimeError, match="storage unavailable"):
        create_image(request=request("k-1"))
    retried = create_image(request=request("k-1"))
    assert create_image(request=request("k-1")) == retried
    assert len(recorder.runs) == 2


def test_the_record_of_a_run_killed_past_its_timeout_is_taken_over(
    recorder: Recorder, persistence_layer: BasePersistenceLayer
) -> None:
    # Killed at its Lambda timeout: the INPROGRESS record stays, its in-progress expiry already past.
    recorder.context = LambdaContextStub(remaining_millis=-60_000)
    create_image = recorder.make(persistence_layer)
    recorder.kill_next = True
    with pytest.raises(Killed):
        create_image(request=request("k-1"))

    result = create_image(request=request("k-1"))

    assert len(recorder.runs) == 2
    assert create_image(request=request("k-1")) == result
    assert len(recorder.runs) == 2


def test_the_record_of_a_run_still_within_its_timeout_is_respected(
    recorder: Recorder, persistence_layer: BasePersistenceLayer
) -> None:
    recorder.context = LambdaContextStub(remaining_millis=600_000)
    create_image = recorder.make(persistence_layer)
    recorder.kill_next = True
    with pytest.raises(Killed):
        create_image(request=request("k-1"))

    with pytest.raises(IdempotencyAlreadyInProgressError):
        create_image(request=request("k-1"))
    assert len(recorder.runs) == 1


def test_records_live_beside_the_state_with_the_documented_layout(
    create_image: CreateImage, backend_url: tuple[str, DynamoDBClient | None]
) -> None:
    result = create_image(request=request("k-1"))
    url, client = backend_url

    location = parse_state_url(url)
    if isinstance(location, SqliteLocation):
        with sqlite3.connect(location.path) as raw:
            rows = raw.execute("SELECT key, status, expiration, data FROM idempotency").fetchall()
        [(key, status, expiration, data)] = rows
    else:
        assert client is not None
        items = client.query(
            TableName=location.table,
            KeyConditionExpression="pk = :partition",
            ExpressionAttributeValues={":partition": {"S": IDEMPOTENCY_PARTITION}},
        )["Items"]
        [item] = items
        key, status = item["sk"]["S"], item[STATUS_ATTRIBUTE]["S"]
        expiration, data = int(item[TTL_ATTRIBUTE]["N"]), item[DATA_ATTRIBUTE]["S"]
    assert key.endswith("create_image#" + hashlib.md5(json.dumps("k-1").encode()).hexdigest())
    assert status == "COMPLETED"
    assert expiration > time.time()  # one hour of replay by default
    assert json.loads(data) == result
