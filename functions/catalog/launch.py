"""Starting an imaging execution on AWS Step Functions; idempotent, as the execution is named after the job."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import TYPE_CHECKING

from functions.catalog.requests import Launcher
from functions.imaging.jobs import ImagingRequest

if TYPE_CHECKING:
    from mypy_boto3_stepfunctions.client import SFNClient


def execution_input(request: ImagingRequest) -> dict[str, object]:
    """The state machine's input: the request itself (Prepare's `request`)."""
    return {key: value for key, value in dataclasses.asdict(request).items() if value is not None}


def step_functions_launcher(client: SFNClient, state_machine_arn: str) -> Launcher:
    def launch(request: ImagingRequest) -> None:
        # A retried request finds the job's execution already running (same name, same input): nothing to do.
        with contextlib.suppress(client.exceptions.ExecutionAlreadyExists):
            client.start_execution(
                stateMachineArn=state_machine_arn, name=request.job_id, input=json.dumps(execution_input(request))
            )

    return launch
