"""Shared plumbing of the `imaging` command line: the user error (one `error:` line, exit code 1), size arguments,
the `--json` flag, input files, and the global logging options (`-v`, `--log-format`) with the logging they set.

Output discipline (DESIGN §6): stdout carries a command's result only (with `--json`, exactly one JSON document);
errors, logs and progress go to stderr. How results are printed is in statemachine/cli/output.py, progress in
statemachine/cli/progress.py.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

KIB = 1024
UNITS = {"": 1, "b": 1, "k": KIB, "m": KIB**2, "g": KIB**3, "t": KIB**4, "p": KIB**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


class UserError(click.ClickException):
    """A bad input: one `error:` line on stderr, an optional `hint:` line, exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def show(self, file: IO[Any] | None = None) -> None:
        out = file if file is not None else sys.stderr
        click.echo(f"error: {one_line(self.format_message())}", file=out)
        if self.hint:
            click.echo(f"hint: {one_line(self.hint)}", file=out)


def one_line(text: str) -> str:
    """Fold a message onto one line so that every error is exactly one line."""
    return " ".join(text.split())


def parse_size(text: str) -> int:
    """Parse a size in bytes: "1048576", "512M", "10G", "1.5GiB", "4k" (units are powers of 1024, like qemu-img)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use bytes or a number with K, M, G, T, e.g. 10G)")
    number, unit = match.groups()
    value = float(number) * UNITS[unit.lower()]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


class SizeParam(click.ParamType[int]):
    """A click parameter holding a size in bytes, written with or without a binary unit."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


SIZE = SizeParam()


def json_option(func: F) -> F:
    """The `--json` flag every command takes: machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(func)


def require_file(path: str) -> None:
    """Fail with exit code 1 (a bad input, not a usage error) when an input file is missing."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file", hint="check the path; a chain is opened from its leaf file")
    if p.is_dir():
        raise UserError(f"{path}: is a directory, not a VHD file")


LogFormat = Literal["json", "text"]
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "werkzeug", "moto")
"""Libraries whose INFO records are noise to a user: they log at WARNING and above unless `-vv`."""


@dataclass(frozen=True)
class LogOptions:
    """The global `-v/--verbose` count and `--log-format` of this invocation."""

    verbose: int = 0
    log_format: LogFormat = "text"

    @property
    def level(self) -> int:
        """WARNING by default, INFO with -v, DEBUG with -vv."""
        return logging.WARNING if self.verbose <= 0 else logging.INFO if self.verbose == 1 else logging.DEBUG


def log_options() -> LogOptions:
    """The logging options of the running command (the defaults outside one)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(LogOptions) if ctx is not None else None
    return found if found is not None else LogOptions()


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record (timestamp, level, logger, message; the traceback of an exception)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{record.msecs:03.0f}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(options: LogOptions) -> None:
    """Send the process's log records to stderr at the level of `options`, in its format (the handlers' Powertools
    logger is set the same way when a workflow starts: statemachine.cli.services.embedded_workflow)."""
    handler = logging.StreamHandler(sys.stderr)
    if options.log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(options.level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(options.level if options.verbose >= 2 else max(options.level, logging.WARNING))
