"""The embedded engine: runs an Amazon States Language file in-process, unchanged from what AWS Step Functions runs.

It runs moto's Step Functions interpreter (moto ≥ 5.2, taken from LocalStack) in this process and registers each
Python handler as a Lambda function of the engine. A Task state whose `Resource` is such a function's ARN calls the
handler in this process: the interpreter's Lambda client is replaced, in this one module, by one that dispatches
registered functions to their callables, with no HTTP between them. A handler that raises answers like Lambda does
(`FunctionError: Unhandled`, a payload with `errorType` and `errorMessage`), so the ASL's `Retry` and `Catch` match
the exception's class name exactly as on AWS.

moto's server (its HTTP front, Lambda, IAM, CloudFormation ...) starts only when something asks for the engine's
`endpoint` or a `client()` (e.g. a test that deploys the SAM template into moto): an imaging run needs none of it,
and not importing it is a third of the engine's start-up. A function the engine does not know (one a stack created
and nobody bound) is invoked through that server, as moto would.

The engine is generic: it knows ASL, Lambda and moto, and nothing of what the state machine does. Not supported by
the interpreter (see DESIGN §3): JSONata and `Assign`, `startExecution.sync`, EXPRESS child workflows; state
machine creation does not check `Next` targets (lint the ASL separately); a Task's payload must be a JSON object.

The handlers' own boto3 calls are not intercepted: they go wherever their clients point (real files, a real S3 or
a separate moto server), which is why this does not use `moto.mock_aws`.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol


def _enter_moto_batch_without_its_models() -> None:
    """moto's interpreter imports `moto.batch.utils` (one enum, for its Batch task service); the package's
    `__init__` imports Batch's models and, with them, all of EC2's: 0.67 s of the engine's 1 s of imports, for a
    service no imaging workflow calls. The package is entered without its `__init__`: its submodules import as
    usual, and a name of the package itself (`batch_backends`) is taken from its models on first use."""
    if "moto.batch" in sys.modules:
        return
    spec = importlib.util.find_spec("moto.batch")
    if spec is None or spec.submodule_search_locations is None:
        return  # another layout of moto: import it as it comes
    package = types.ModuleType("moto.batch")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "moto.batch"

    def from_models(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module("moto.batch.models"), name)

    package.__getattr__ = from_models  # type: ignore[method-assign]
    sys.modules["moto.batch"] = package


_enter_moto_batch_without_its_models()

import boto3  # noqa: E402 - after the batch package is entered
from jsonpath_ng.ext.parser import ExtendedJsonPathParser  # type: ignore[import-untyped]  # noqa: E402
from jsonpath_ng.parser import JsonPathParser  # type: ignore[import-untyped]  # noqa: E402
from moto.moto_api._internal.models import moto_api_backend  # noqa: E402
from moto.stepfunctions.models import StepFunctionBackend  # noqa: E402
from moto.stepfunctions.parser.asl.component.common.path import (  # noqa: E402
    result_path as interpreter_result_path,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils  # noqa: E402
from moto.stepfunctions.parser.asl.utils import json_path as interpreter_json_path  # noqa: E402
from moto.stepfunctions.parser.backend.execution import Execution as InterpreterExecution  # noqa: E402
from moto.stepfunctions.parser.models import stepfunctions_parser_backends  # noqa: E402

if TYPE_CHECKING:
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from werkzeug.serving import BaseWSGIServer

REGION = "us-east-1"
ACCOUNT = "123456789012"
# The state machine's role: nothing in the embedded engine checks what it allows.
EXECUTION_ROLE = f"arn:aws:iam::{ACCOUNT}:role/local-engine"
DEFAULT_FUNCTION_TIMEOUT_S = 900
SERVER_POLL_S = 0.02
"""How often the server's loop looks for a shutdown request: stopping the engine waits at most this long."""
TERMINAL_EXECUTION_STATUSES = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"})


class LambdaContextLike(Protocol):
    """The attributes of AWS's LambdaContext that handlers (and Powertools) read."""

    function_name: str
    function_version: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str

    def get_remaining_time_in_millis(self) -> int: ...


Handler = Callable[[Any, Any], Any]


@dataclass
class LocalLambdaContext:
    """A LambdaContext for an in-process invoke: the remaining time counts down from the function's timeout."""

    function_name: str
    invoked_function_arn: str
    timeout_s: float
    memory_limit_in_mb: int = 1024
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = ""
    log_stream_name: str = "local"
    _deadline: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_s
        self.log_group_name = self.log_group_name or f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass(frozen=True)
class _Registered:
    handler: Handler
    timeout_s: float
    arn: str


class EngineError(Exception):
    """The engine could not start, deploy or run something (not a failure of the state machine itself)."""


@dataclass(frozen=True)
class ExecutionResult:
    """How an execution ended: its status, its output (parsed JSON) or its error and cause, and its history."""

    execution_arn: str
    status: str
    output: Any
    error: str | None
    cause: str | None
    events: list[dict[str, Any]]

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    def states_entered(self) -> list[str]:
        """Names of the states entered, in order (Map iterations included)."""
        names = []
        for event in self.events:
            details = event.get("stateEnteredEventDetails")
            if details:
                names.append(str(details["name"]))
        return names


# Function ARN -> handler, for every engine of this process.
_REGISTRY: dict[str, _Registered] = {}
_REGISTRY_LOCK = threading.Lock()
_ACTIVE_ENGINE: LocalEngine | None = None


def _lambda_error_payload(error: BaseException) -> bytes:
    payload = {
        "errorType": type(error).__name__,
        "errorMessage": str(error),
        "stackTrace": traceback.format_exception(error)[-8:],
    }
    return json.dumps(payload).encode()


def _arn_of(function_name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"


def _registered(function_name: str) -> _Registered | None:
    arn = function_name if function_name.startswith("arn:") else _arn_of(function_name)
    with _REGISTRY_LOCK:
        return _REGISTRY.get(arn)


def _run_registered(registered: _Registered, payload: bytes | str | None) -> tuple[bytes, bool]:
    """Invoke a registered function as Lambda would: its response payload, and whether that is a function error
    (every exception of the handler is one, as on AWS)."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    event = json.loads(text) if text else {}
    name = registered.arn.rsplit(":", 1)[-1]
    context = LocalLambdaContext(
        function_name=name, invoked_function_arn=registered.arn, timeout_s=registered.timeout_s
    )
    try:
        result = registered.handler(event, context)
    except Exception as error:
        return _lambda_error_payload(error), True
    return json.dumps(result).encode(), False


class _InProcessLambda:
    """The interpreter's Lambda client: a registered function runs in this process (its answer shaped as boto3's
    `invoke` returns it); any other is invoked through moto's server."""

    def __init__(self, region: str, state_credentials: Any) -> None:
        self._region = region
        self._credentials = state_credentials

    def invoke(self, **parameters: Any) -> dict[str, Any]:
        registered = _registered(str(parameters["FunctionName"]))
        if registered is None:
            return _server_client(self._region, "lambda", self._credentials).invoke(**parameters)  # type: ignore[no-any-return]
        payload, failed = _run_registered(registered, parameters.get("Payload"))
        response: dict[str, Any] = {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": BytesIO(payload)}
        if failed:
            response["FunctionError"] = "Unhandled"
        return response


_server_clients: dict[tuple[str, str, str | None], Any] = {}


def _server_client(region: str, service: str, state_credentials: Any = None) -> Any:
    """The interpreter's boto3 client for a service of moto's server (started on first need), made once per
    (region, service, server port) instead of once per Task; boto3 clients are safe across threads."""
    engine = _ACTIVE_ENGINE
    if engine is None:
        raise EngineError(f"a Task calls {service} while no engine runs")
    engine.endpoint  # noqa: B018 - starts the server (and sets MOTO_PORT) if it is not running yet
    key = (region, service, os.environ.get("MOTO_PORT"))
    client = _server_clients.get(key)
    if client is None:
        client = _server_clients[key] = _ORIGINAL_CLIENT_FOR(region, service, state_credentials)
    return client


def _task_client(region: str, service: str, state_credentials: Any = None) -> Any:
    if service == "lambda":
        return _InProcessLambda(region, state_credentials)
    return _server_client(region, service, state_credentials)


_ORIGINAL_CLIENT_FOR = lambda_eval_utils.boto_client_for  # type: ignore[attr-defined]
lambda_eval_utils.boto_client_for = _task_client  # type: ignore[attr-defined]


def _parse_once(module: types.ModuleType, parser_class: type[Any]) -> None:
    """The interpreter parses every JSONPath of every state each time it evaluates it, and jsonpath_ng builds a
    whole LALR parser (ply's yacc tables) for each parse: half the interpreter's time between two states went
    there. Here one parser (built once, used under a lock: its parse keeps state) parses each text once per
    process; a parsed path is immutable (its `find` is pure)."""
    parser = parser_class()
    lock = threading.Lock()

    @functools.lru_cache(maxsize=4096)
    def parse(text: str) -> Any:
        with lock:
            return parser.parse(text)

    module.parse = parse  # type: ignore[attr-defined]


_parse_once(interpreter_json_path, ExtendedJsonPathParser)
_parse_once(interpreter_result_path, JsonPathParser)


def _shared_on_deepcopy(self: InterpreterExecution, memo: dict[int, Any]) -> InterpreterExecution:
    return self


# moto deep-copies a state machine, with its past executions, when it starts a new one; a past execution's worker
# holds locks that cannot be copied, so every second execution failed with HTTP 500. The copy only needs the
# definition: past executions are shared, not copied.
InterpreterExecution.__deepcopy__ = _shared_on_deepcopy  # type: ignore[attr-defined]


def substitute(definition: str, substitutions: Mapping[str, str]) -> str:
    """Replace every `${Name}` in an ASL text, as CloudFormation's DefinitionSubstitutions do; unknown names fail."""
    out = definition
    for name, value in substitutions.items():
        out = out.replace("${" + name + "}", value)
    start = out.find("${")
    if start >= 0:
        end = out.find("}", start)
        raise EngineError(f"no substitution given for {out[start : end + 1]} in the state machine definition")
    return out


def _dispatch_registered_over_http() -> None:
    """Patch moto's simple Lambda backend (imported with the server, once) so that an invoke that reaches the server
    for a function bound here (e.g. one a CloudFormation stack created) runs its handler in this process."""
    from moto.awslambda_simple.models import LambdaSimpleBackend

    original = LambdaSimpleBackend.invoke
    if getattr(original, "dispatches_registered", False):
        return

    def invoke(
        self: LambdaSimpleBackend,
        function_name: str,
        qualifier: str | None,
        body: Any,
        headers: Any,
        response_headers: Any,
    ) -> str | bytes | None:
        registered = _registered(function_name)
        if registered is None:
            return original(self, function_name, qualifier, body, headers, response_headers)
        payload, failed = _run_registered(registered, body)
        if failed:
            response_headers["x-amz-function-error"] = "Unhandled"
        return payload

    invoke.dispatches_registered = True  # type: ignore[attr-defined]
    LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign]


class _Server:
    """moto's server app on a loopback port, in a thread, stopped within SERVER_POLL_S (moto's ThreadedMotoServer
    polls every 0.5 s, which every command paid on exit)."""

    def __init__(self, host: str, port: int) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        _dispatch_registered_over_http()
        moto_api_backend.set_config({"lambda": {"use_docker": False}})
        self._wsgi: BaseWSGIServer = make_server(host, port, DomainDispatcherApplication(create_backend_app), True)
        self._thread = threading.Thread(
            target=self._wsgi.serve_forever, kwargs={"poll_interval": SERVER_POLL_S}, name="engine", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._wsgi.shutdown()
        self._wsgi.server_close()
        self._thread.join()


class LocalEngine:
    """Runs ASL state machines in this process on moto's Step Functions interpreter.

    Use as a context manager; one engine runs per process at a time. What the engine itself does to moto (its
    configuration, the state machines, the executions' status) it does through moto's backends in this process;
    the interpreter calls registered functions in this process too. moto's server starts on first use of
    `endpoint` or `client()` (the interpreter then finds it through the `MOTO_PORT` environment variable).
    """

    def __init__(self, *, quiet: bool = True, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._quiet = quiet
        self._server: _Server | None = None
        self._endpoint = ""
        self._running = False
        self._server_lock = threading.Lock()
        self._arns: list[str] = []
        self._previous_port: str | None = None

    # --- life cycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        global _ACTIVE_ENGINE
        with _REGISTRY_LOCK:
            if _ACTIVE_ENGINE is not None:
                raise EngineError("another local engine is already running in this process")
            _ACTIVE_ENGINE = self
        try:
            if self._quiet:
                # The interpreter logs every failed state as an exception; the execution history says it better.
                for name in ("moto", "werkzeug"):
                    logging.getLogger(name).setLevel(logging.CRITICAL)
            moto_api_backend.set_config({"stepfunctions": {"execute_state_machine": True}})
            self._running = True
            # moto and botocore leave hundreds of thousands of long-lived objects; freezing them keeps the full
            # collections that the executions' allocations trigger from scanning them again (measured: ~5% of an
            # imaging run's CPU went to the collector).
            gc.freeze()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        global _ACTIVE_ENGINE
        with _REGISTRY_LOCK:
            for arn in self._arns:
                _REGISTRY.pop(arn, None)
            self._arns.clear()
            if _ACTIVE_ENGINE is self:
                _ACTIVE_ENGINE = None
        self._running = False
        with self._server_lock:
            self._stop_server()

    def _stop_server(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            if self._previous_port is None:
                os.environ.pop("MOTO_PORT", None)
            else:
                os.environ["MOTO_PORT"] = self._previous_port
            self._endpoint = ""

    @property
    def endpoint(self) -> str:
        """The URL of moto's server, started now if it is not running yet."""
        with self._server_lock:
            if not self._running:
                raise EngineError("the engine is not running")
            if self._server is None:
                port = self._port or _free_port(self._host)
                self._server = _Server(self._host, port)
                self._endpoint = f"http://{self._host}:{port}"
                self._previous_port = os.environ.get("MOTO_PORT")
                os.environ["MOTO_PORT"] = str(port)
            return self._endpoint

    def client(self, service: str) -> Any:
        """A boto3 client for the engine's own server (e.g. s3, cloudformation, stepfunctions), started if need be."""
        endpoint = self.endpoint
        make_client: Any = boto3.client  # the stubs type each service's client; this one is generic
        return make_client(
            service,
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )

    # --- deployment --------------------------------------------------------------------------------------------
    def register_function(self, name: str, handler: Handler, *, timeout_s: float = DEFAULT_FUNCTION_TIMEOUT_S) -> str:
        """A Lambda function `name` whose invocations (by the interpreter) run `handler(event, context)` here;
        returns its ARN."""
        arn = _arn_of(name)
        with _REGISTRY_LOCK:
            if arn in _REGISTRY:
                raise EngineError(f"a function named {name!r} is already registered")
        if not self._running:
            raise EngineError("the engine is not running")
        with _REGISTRY_LOCK:
            _REGISTRY[arn] = _Registered(handler=handler, timeout_s=timeout_s, arn=arn)
            self._arns.append(arn)
        return arn

    def bind_function(self, arn: str, handler: Handler, *, timeout_s: float = DEFAULT_FUNCTION_TIMEOUT_S) -> None:
        """Run `handler` for an existing function of the server (e.g. one a CloudFormation stack created)."""
        with _REGISTRY_LOCK:
            if arn in _REGISTRY:
                raise EngineError(f"function {arn} is already bound")
            _REGISTRY[arn] = _Registered(handler=handler, timeout_s=timeout_s, arn=arn)
            self._arns.append(arn)

    def create_state_machine(self, name: str, definition: str, substitutions: Mapping[str, str] | None = None) -> str:
        """Create (or update) a STANDARD state machine from an ASL text with its `${...}` substitutions applied."""
        text = substitute(definition, substitutions or {})
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise EngineError(f"the state machine definition is not JSON: {error}") from error
        machines = _machines()
        for machine in machines.state_machines:
            if machine.name == name:
                machines.update_state_machine(machine.arn, definition=text)
                return str(machine.arn)
        # moto's interpreter backend parses a new definition to validate it, and every execution parses it again:
        # the machine is made by the base backend (no first parse, ~0.15 s of every command that runs a workflow);
        # a malformed definition fails its first execution instead, and ours is linted (statelint) in the tests.
        created = StepFunctionBackend.create_state_machine(machines, name=name, definition=text, roleArn=EXECUTION_ROLE)
        return str(created.arn)

    # --- executions --------------------------------------------------------------------------------------------
    def start_execution(self, state_machine_arn: str, payload: Any, name: str | None = None) -> str:
        """Start an execution (always named: moto needs it) and return its ARN without waiting."""
        execution = _machines().start_execution(
            state_machine_arn, name=name or str(uuid.uuid4()), execution_input=json.dumps(payload)
        )
        return str(execution.exec_arn)

    def status(self, execution_arn: str) -> str:
        """The execution's status, read from the interpreter (cheap enough to poll often)."""
        return str(_machines().describe_execution(execution_arn).status)

    def wait(self, execution_arn: str, timeout_s: float | None = None) -> ExecutionResult:
        """Wait until the execution ends (polling its status, as a Step Functions client does) and return it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = 0.005
        while self.status(execution_arn) not in TERMINAL_EXECUTION_STATUSES:
            if deadline is not None and time.monotonic() > deadline:
                raise EngineError(f"execution {execution_arn} still running after {timeout_s} s")
            time.sleep(interval)
            interval = min(interval * 2, 0.05)
        execution = _machines().describe_execution(execution_arn)
        described = execution.to_describe_output()
        output = described.get("output")
        return ExecutionResult(
            execution_arn=execution_arn,
            status=str(execution.status),
            output=json.loads(output) if output else None,
            error=described.get("error"),
            cause=described.get("cause"),
            events=list(self.history(execution_arn)),
        )

    def run(
        self, state_machine_arn: str, payload: Any, name: str | None = None, timeout_s: float | None = None
    ) -> ExecutionResult:
        """Start an execution and wait for its end."""
        return self.wait(self.start_execution(state_machine_arn, payload, name), timeout_s)

    def history(self, execution_arn: str) -> Iterator[dict[str, Any]]:
        events: list[dict[str, Any]] = _machines().get_execution_history(execution_arn)["events"]
        yield from events


def _machines() -> Any:
    """moto's Step Functions backend with the interpreter (what its server answers with, once configured)."""
    return stepfunctions_parser_backends[ACCOUNT][REGION]


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


__all__ = [
    "EngineError",
    "ExecutionResult",
    "LambdaContextLike",
    "LocalEngine",
    "LocalLambdaContext",
    "substitute",
]
