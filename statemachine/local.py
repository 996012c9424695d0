"""The imaging workflow on the embedded engine: statemachine/imaging.asl.json, unchanged, with its `${...}`
function ARNs bound to the handlers of functions/handlers running in this process.

The handlers find their store, state and tunables with `functions.handlers.runtime.services()`: the services
given to `LocalImaging(services=...)` while it runs, else those the environment names (IMAGING_STORE, ...).

Powertools' tracing and metrics output are switched off in this process: there is no X-Ray daemon or CloudWatch
agent here, and metrics (EMF JSON printed on stdout) would mix with a CLI's result. The handlers' logs go to stderr,
at WARNING unless POWERTOOLS_LOG_LEVEL says otherwise or the caller sets a level (`log_level=`, the CLI's `-v`).

While executions it started run, a pump thread writes their jobs' heartbeats every HEARTBEAT_INTERVAL_S (DESIGN §3,
"Jobs outlive their runners"): a job whose process dies stops beating, and the next recovery finds it. The steps
beat too (at their start and with every frame or part), which is all a job has on Lambda.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from statemachine.engine import ExecutionResult, Handler, LocalEngine

os.environ["POWERTOOLS_TRACE_DISABLED"] = "true"
os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
for _variable, _value in (("POWERTOOLS_LOG_LEVEL", "WARNING"), ("POWERTOOLS_SERVICE_NAME", "imaging")):
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
from functions.handlers.runtime import LogFormat, configure_logging, use_services  # noqa: E402
from functions.handlers.runtime import services as current_services  # noqa: E402
from functions.imaging.jobs import HEARTBEAT_INTERVAL_S, beat_quietly  # noqa: E402
from statemachine.engine import TERMINAL_EXECUTION_STATUSES  # noqa: E402

if TYPE_CHECKING:
    from functions.imaging.services import ImagingServices

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
    faults this way). `services`, when given, is what the handlers use while this runs (installed with
    `runtime.use_services`, restored on exit); else they use the services the environment names. `log_level` and
    `log_format` ("text" or "json"), when given, set the handlers' logging (on stderr)."""

    def __init__(
        self,
        overrides: Mapping[str, Handler] | None = None,
        *,
        services: ImagingServices | None = None,
        log_level: str | int | None = None,
        log_format: LogFormat | None = None,
    ) -> None:
        unknown = set(overrides or {}) - set(HANDLERS)
        if unknown:
            raise ValueError(f"no such function in the workflow: {', '.join(sorted(unknown))}")
        self._overrides = dict(overrides or {})
        self._services = services
        self._log_level = log_level
        self._log_format = log_format
        self._engine = LocalEngine()
        self._machine = ""
        self._installed = ExitStack()
        self._running: dict[str, str] = {}
        """Execution ARN -> job id, of the executions started here and not seen ended."""
        self._running_lock = threading.Lock()
        self._pump_stop = threading.Event()
        self._pump: threading.Thread | None = None

    def __enter__(self) -> LocalImaging:
        configure_logging(self._log_level, self._log_format)
        if self._services is not None:
            self._installed.enter_context(use_services(self._services))
        try:
            self._engine.start()
        except BaseException:
            self._installed.close()
            raise
        try:
            substitutions = {
                name: self._engine.register_function(function, self._overrides.get(name, handler))
                for name, (function, handler) in HANDLERS.items()
            }
            self._machine = self._engine.create_state_machine(STATE_MACHINE_NAME, ASL_PATH.read_text(), substitutions)
        except BaseException:
            try:
                self._engine.stop()
            finally:
                self._installed.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._pump_stop.set()
        try:
            self._engine.stop()
        finally:
            self._installed.close()

    def start(self, request: Mapping[str, Any], name: str | None = None) -> str:
        """Start imaging `request` (job_id, image_id, tenant, name, server_id or disk); the job id names the run
        unless `name` is given (a resumed job's new execution)."""
        job_id = str(request["job_id"])
        arn = self._engine.start_execution(self._machine, dict(request), name=name or job_id)
        with self._running_lock:
            self._running[arn] = job_id
            if self._pump is None:
                self._pump = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)
                self._pump.start()
        return arn

    def running_jobs(self) -> list[str]:
        """The jobs of the executions started here that are still running (to hand over when stopping)."""
        with self._running_lock:
            running = list(self._running.items())
        return [job for arn, job in running if self.status(arn) not in TERMINAL_EXECUTION_STATUSES]

    def _beat(self) -> None:
        """The pump: every HEARTBEAT_INTERVAL_S, each running job's heartbeat (one small write per job)."""
        while not self._pump_stop.wait(HEARTBEAT_INTERVAL_S):
            with self._running_lock:
                running = list(self._running.items())
            target = self._services or current_services()
            for arn, job_id in running:
                try:
                    alive = self.status(arn) not in TERMINAL_EXECUTION_STATUSES and beat_quietly(target, job_id)
                except Exception:  # a heartbeat lost to a busy store is retried at the next beat
                    continue
                if not alive:
                    with self._running_lock:
                        self._running.pop(arn, None)

    def status(self, execution_arn: str) -> str:
        return self._engine.status(execution_arn)

    def wait(self, execution_arn: str, timeout_s: float | None = None) -> ExecutionResult:
        return self._engine.wait(execution_arn, timeout_s)

    def run(self, request: Mapping[str, Any], timeout_s: float | None = None) -> ExecutionResult:
        return self.wait(self.start(request), timeout_s)
