"""The AWS mode: the API and schedule Lambda handlers with API Gateway / EventBridge events, DynamoDB, S3 and Step
Functions in moto (in-process). Executions are only recorded here (moto runs no Lambdas): that they are started once,
named after their job, is what these tests check; the workflow itself is tested on the embedded engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from moto import mock_aws

from functions.handlers import api as api_handler
from functions.handlers import runtime
from functions.handlers import schedule as schedule_handler
from functions.state import Server, create_table, open_state_store
from statemachine.engine import LocalLambdaContext
from statemachine.serve import proxy_event

TABLE = "imaging-state"
BUCKET = "imaging-images"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, aws_test_env: None) -> Iterator[Any]:
    with mock_aws():
        create_table(boto3.client("dynamodb"), TABLE)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        sfn = boto3.client("stepfunctions")
        machine = sfn.create_state_machine(
            name="imaging",
            definition=json.dumps({"StartAt": "P", "States": {"P": {"Type": "Pass", "End": True}}}),
            roleArn="arn:aws:iam::123456789012:role/imaging",
        )["stateMachineArn"]
        monkeypatch.setenv("IMAGING_STATE", f"dynamodb://{TABLE}")
        monkeypatch.setenv("IMAGING_STORE", f"s3://{BUCKET}")
        monkeypatch.setenv("IMAGING_STATE_MACHINE_ARN", machine)
        monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
        monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
        for cached in (api_handler._app, schedule_handler._launcher, runtime._services_for):
            cached.cache_clear()
        state = open_state_store(f"dynamodb://{TABLE}")
        now = datetime.now(UTC)
        state.put_server(Server(id="web", tenant="alpha", name="web", disk="/srv/disks/web.vhd", created_at=now))
        yield sfn, machine, state
        for cached in (api_handler._app, schedule_handler._launcher, runtime._services_for):
            cached.cache_clear()


def call(method: str, path: str, tenant: str | None, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    event = proxy_event(method, path, headers or {}, json.dumps(body) if body is not None else None, "192.0.2.1")
    if tenant is not None:  # what a Cognito authorizer puts in the request context
        event["requestContext"]["authorizer"] = {"claims": {"custom:tenant": tenant}}
    context = LocalLambdaContext(function_name="imaging-api", invoked_function_arn="arn:api", timeout_s=29)
    answer = api_handler.handler(event, context)
    return answer["statusCode"], json.loads(answer["body"]) if answer.get("body") else None


def executions(sfn: Any, machine: str) -> list[dict[str, Any]]:
    return list(sfn.list_executions(stateMachineArn=machine)["executions"])


def test_create_status_idempotency_tenancy_and_conflict(aws: Any) -> None:
    sfn, machine, _ = aws
    assert call("GET", "/v1/servers/web/images", tenant=None)[0] == 401

    status, created = call("POST", "/v1/servers/web/images", "alpha", {"name": "n"}, {"Idempotency-Key": "k1"})
    assert status == 202 and created["status"] == "QUEUED"
    replay = call("POST", "/v1/servers/web/images", "alpha", {"name": "n"}, {"Idempotency-Key": "k1"})
    assert replay == (202, created)
    assert call("POST", "/v1/servers/web/images", "alpha", {"name": "m"}, {"Idempotency-Key": "k1"})[0] == 422

    started = executions(sfn, machine)
    assert [e["name"] for e in started] == [created["job_id"]]
    described = sfn.describe_execution(executionArn=started[0]["executionArn"])
    assert json.loads(described["input"])["image_id"] == created["id"]

    assert call("GET", f"/v1/images/{created['id']}", "alpha")[1]["progress"] == 0
    assert call("GET", f"/v1/images/{created['id']}", "beta")[0] == 404
    assert call("POST", "/v1/servers/web/images", "beta")[0] == 404
    busy = call("POST", "/v1/servers/web/images", "alpha")
    assert busy[0] == 409 and busy[1]["job_id"] == created["job_id"]
    # ... and the running job's image, which a route can read (the job id alone is for operators).
    assert busy[1]["image_id"] == created["id"] and f"GET /v1/images/{created['id']}" in busy[1]["hint"]


def test_schedule_crud_and_a_triple_delivered_timer_start_one_execution(aws: Any) -> None:
    sfn, machine, state = aws
    status, shown = call("PUT", "/v1/servers/web/image-schedule", "alpha", {"frequency": "daily", "at": "00:00"})
    assert status == 200 and shown["retention"] == 7
    assert call("GET", "/v1/servers/web/image-schedule", "alpha") == (200, shown)
    # Make the schedule older than today's window, so that it is due now.
    stored = state.get_schedule("web")
    state.put_schedule(stored.model_copy(update={"created_at": datetime(2026, 1, 1, tzinfo=UTC)}))

    event = {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}
    context = LocalLambdaContext(function_name="imaging-schedule", invoked_function_arn="arn:schedule", timeout_s=60)
    answers = [schedule_handler.handler(event, context) for _ in range(3)]
    assert len(answers[0]["started"]) == 1 and answers[1]["started"] == answers[2]["started"] == []
    assert len(executions(sfn, machine)) == 1
    assert len(state.list_images(server_id="web")) == 1

    assert call("DELETE", "/v1/servers/web/image-schedule", "alpha")[0] == 204
    assert call("GET", "/v1/servers/web/image-schedule", "alpha")[0] == 404
