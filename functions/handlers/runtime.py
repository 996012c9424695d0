"""What every handler shares: the Powertools logger, tracer and metrics of the service, the `state_handler`
decorator, and `services()`, the store, state and tunables a handler uses (functions.settings: built once per process
from the environment, or the services the embedded engine installed with `use_services`).

Logs go to stderr (stdout is a CLI's result): JSON lines on Lambda (the Powertools format), plain text lines
(`time level function: message key=value ...`) elsewhere; `configure_logging` changes the level and the format.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar, cast

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter
from aws_lambda_powertools.tracing.base import BaseProvider
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel

from functions.imaging.services import ImagingConfig, ImagingServices
from functions.settings import Settings, config_from_environment
from functions.state import open_state_store
from functions.storage import open_object_store

if TYPE_CHECKING:
    from aws_lambda_powertools.logging.types import LogRecord

SERVICE_NAME = "imaging"
METRICS_NAMESPACE = "CloudImaging"

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is when a record is written (a test's capture or a redirect included)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class TextLogFormatter(LambdaPowertoolsFormatter):
    """Powertools' structured record as one line for people: `time level function: message key=value ...` (the
    other keys of the Lambda context left out), the traceback of an exception on the lines after it."""

    HIDDEN = frozenset(
        {
            "level",
            "location",
            "message",
            "timestamp",
            "service",
            "sampling_rate",
            "xray_trace_id",
            "cold_start",
            "function_name",
            "function_memory_size",
            "function_arn",
            "function_request_id",
            "exception",
            "exception_name",
            "exception_notes",
            "stack_trace",
        }
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(use_rfc3339=True, serialize_stacktrace=False, **kwargs)

    def serialize(self, log: LogRecord) -> str:
        fields = " ".join(f"{key}={_text_value(value)}" for key, value in log.items() if key not in self.HIDDEN)
        source = f" {log['function_name']}:" if log.get("function_name") else ""
        line = f"{log.get('timestamp', '')} {log.get('level', '')}{source} {log.get('message', '')}"
        if fields:
            line = f"{line} {fields}"
        if log.get("exception"):
            line = f"{line}\n{log['exception']}"
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return repr(text) if not text or any(ch.isspace() for ch in text) else text


def on_lambda() -> bool:
    """Running on AWS Lambda (its runtime names the function in the environment)."""
    return bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))


def default_log_format() -> LogFormat:
    return "json" if on_lambda() else "text"


def _formatter(log_format: LogFormat) -> LambdaPowertoolsFormatter:
    if log_format == "text":
        return TextLogFormatter(service=SERVICE_NAME)
    return LambdaPowertoolsFormatter(service=SERVICE_NAME)


# Module-level, as Powertools wants them: one logger, tracer and metrics set for every handler of the service.
logger = Logger(
    service=SERVICE_NAME, stream=cast(IO[str], _CurrentStderr()), logger_formatter=_formatter(default_log_format())
)


class _NoTracing(BaseProvider):
    """The tracer's provider off Lambda, where nothing collects traces: its segments do nothing, and aws_xray_sdk,
    whose import cost 0.12 s of every workflow command's start, is never loaded."""

    @contextlib.contextmanager
    def in_subsegment(self, name: str | None = None, **kwargs: Any) -> Generator[Any, None, None]:
        yield _NoSegment()

    @contextlib.asynccontextmanager
    async def in_subsegment_async(self, name: str | None = None, **kwargs: Any) -> AsyncGenerator[Any, None]:
        yield _NoSegment()

    def put_annotation(self, key: str, value: str | numbers.Number | bool) -> None:
        pass

    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None:
        pass

    def patch(self, modules: Sequence[str]) -> None:
        pass

    def patch_all(self) -> None:
        pass


class _NoSegment:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _tracer() -> Tracer:
    if on_lambda():
        return Tracer(service=SERVICE_NAME)
    return Tracer(service=SERVICE_NAME, provider=_NoTracing(), auto_patch=False)


tracer = _tracer()
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)


def configure_logging(level: str | int | None = None, log_format: LogFormat | None = None) -> None:
    """Set the service logger's level (e.g. "WARNING", logging.INFO) and its format ("json": Powertools' JSON lines;
    "text": one plain line per record); None leaves that setting as it is. Logs stay on stderr."""
    if level is not None:
        logger.setLevel(level.upper() if isinstance(level, str) else level)
    if log_format is not None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        logger.registered_handler.setFormatter(_formatter(log_format))


EventT = TypeVar("EventT", bound=BaseModel)


def state_handler(
    model: type[EventT],
) -> Callable[[Callable[[EventT, LambdaContext], dict[str, Any]]], Callable[[Any, LambdaContext], dict[str, Any]]]:
    """What every state's handler wears: the Lambda context in its logs, a trace, its metrics flushed, and its event
    parsed into `model` (a malformed event fails the state before any work)."""

    def wrap(
        function: Callable[[EventT, LambdaContext], dict[str, Any]],
    ) -> Callable[[Any, LambdaContext], dict[str, Any]]:
        parsed = event_parser(model=model)(function)
        wrapped: Callable[[Any, LambdaContext], dict[str, Any]] = logger.inject_lambda_context(
            tracer.capture_lambda_handler(metrics.log_metrics(parsed))
        )
        return wrapped

    return wrap


@functools.cache
def _services_for(
    store_url: str, state_url: str, endpoint_url: str | None, config: ImagingConfig, disks_url: str | None = None
) -> ImagingServices:
    return ImagingServices(
        store=open_object_store(store_url, endpoint_url=endpoint_url),
        state=open_state_store(state_url, endpoint_url=endpoint_url),
        config=config,
        disks=open_object_store(disks_url, endpoint_url=endpoint_url) if disks_url else None,
    )


_installed: list[ImagingServices] = []
_installed_guard = threading.Lock()


@contextmanager
def use_services(installed: ImagingServices) -> Iterator[ImagingServices]:
    """Make `installed` what `services()` returns in this process while the block runs (every thread: the embedded
    engine runs handlers on its own threads), instead of the services the environment names. Blocks may nest (the
    innermost wins); leaving one restores what was there before."""
    with _installed_guard:
        _installed.append(installed)
    try:
        yield installed
    finally:
        with _installed_guard:
            # Removed by identity: blocks of other threads may have been entered and left in any order.
            index = max(i for i, item in enumerate(_installed) if item is installed)
            del _installed[index]


def services() -> ImagingServices:
    """The services installed by `use_services` (the embedded engine's), else the store, state and tunables the
    environment names (cached: a warm Lambda reuses its clients)."""
    with _installed_guard:
        if _installed:
            return _installed[-1]
    settings = Settings.resolve()
    return _services_for(
        settings.store_url, settings.state_url, settings.endpoint_url, config_from_environment(), settings.disks_url
    )
