"""The imaging workflow on the embedded engine: statemachine/imaging.asl.json, unchanged, with its `${...}`
function ARNs bound to the handlers of functions/handlers running in this process.

Powertools' tracing and metrics output are switched off and its logs kept to warnings unless the environment
already says otherwise (a CLI's stdout is for the user).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from statemachine.engine import ExecutionResult, Handler, LocalEngine

for _variable, _value in (
    ("POWERTOOLS_TRACE_DISABLED", "true"),
    ("POWERTOOLS_METRICS_DISABLED", "true"),
    ("POWERTOOLS_LOG_LEVEL", "ERROR"),
    ("POWERTOOLS_SERVICE_NAME", "imaging"),
):
    os.environ.setdefault(_variable, _value)

from functions.handlers import (  # noqa: E402 - the Powertools settings above must precede their import
    coalesce,
    compress,
    estimate,
    failed,
    finalize,
    prepare,
    snapshot,
    upload,
)

ASL_PATH = Path(__file__).with_name("imaging.asl.json")
STATE_MACHINE_NAME = "imaging"
HANDLERS: Mapping[str, tuple[str, Handler]] = {
    "PrepareFunctionArn": ("imaging-prepare", prepare.handler),
    "CoalesceFunctionArn": ("imaging-coalesce", coalesce.handler),
    "SnapshotFunctionArn": ("imaging-snapshot", snapshot.handler),
    "EstimateFunctionArn": ("imaging-estimate", estimate.handler),
    "CompressFunctionArn": ("imaging-compress", compress.handler),
    "UploadFunctionArn": ("imaging-upload", upload.handler),
    "FinalizeFunctionArn": ("imaging-finalize", finalize.handler),
    "FailFunctionArn": ("imaging-fail", failed.handler),
}


class LocalImaging:
    """Runs imaging executions in this process. `overrides` replaces handlers by substitution name (tests inject
    faults this way)."""

    def __init__(self, overrides: Mapping[str, Handler] | None = None) -> None:
        unknown = set(overrides or {}) - set(HANDLERS)
        if unknown:
            raise ValueError(f"no such function in the workflow: {', '.join(sorted(unknown))}")
        self._overrides = dict(overrides or {})
        self._engine = LocalEngine()
        self._machine = ""

    def __enter__(self) -> LocalImaging:
        self._engine.start()
        try:
            substitutions = {
                name: self._engine.register_function(function, self._overrides.get(name, handler))
                for name, (function, handler) in HANDLERS.items()
            }
            self._machine = self._engine.create_state_machine(STATE_MACHINE_NAME, ASL_PATH.read_text(), substitutions)
        except BaseException:
            self._engine.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._engine.stop()

    def start(self, request: Mapping[str, Any]) -> str:
        """Start imaging `request` (job_id, image_id, tenant, name, server_id or disk); the job id names the run."""
        return self._engine.start_execution(self._machine, dict(request), name=str(request["job_id"]))

    def status(self, execution_arn: str) -> str:
        return self._engine.status(execution_arn)

    def wait(self, execution_arn: str, timeout_s: float | None = None) -> ExecutionResult:
        return self._engine.wait(execution_arn, timeout_s)

    def run(self, request: Mapping[str, Any], timeout_s: float | None = None) -> ExecutionResult:
        return self.wait(self.start(request), timeout_s)
