"""The `imaging` command: `imaging vhd|server|image|token|schedule|serve ...`.

Errors a user can cause never show a traceback: a `vhdcore.VhdError` or an OS error becomes one `error:` line on
stderr (plus a `hint:` line where one helps) and exit code 1; click's usage errors exit with 2.

A command imports only what it runs (DESIGN §6): the groups are loaded on demand from `COMMANDS` (their module is
imported when one of them runs, and `imaging --help` lists them from the table), so `imaging vhd ...`, `--help` and
`--version` never import boto3, moto, Powertools or the embedded engine; workflow commands import the engine when
they run one. Global options: `-v/--verbose` (INFO logs on stderr; WARNING by default) and `--log-format text|json`.

The package, one module per command group and one per concern they share:
- `vhd.py`, `server.py`, `image.py`, `tokens.py`, `schedules.py`, `serve.py`: the commands, thin over the domain
  (functions/) and vhdcore; what `vhd` and `image` print is in `vhd_output.py` and `image_output.py`;
- `jobs.py`: what the image commands do about jobs: recovery of dead runners, resume, Ctrl-C, following a run;
- `services.py`: `--store/--state/--endpoint-url`, the services opened there, the embedded workflow, domain errors
  as user errors; `write_guard.py`: nothing written over a file without `--force`, nor over a layer in use;
- `common.py` (the user error, sizes, `--json`, logging), `output.py` (JSON, fields, tables, sizes on stdout),
  `progress.py` (bars and JSON lines on stderr), `errors.py` (the hints under vhdcore and OS errors).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
from typing import Any, NamedTuple

import click

import vhdcore
from statemachine.cli.common import LogOptions, UserError, configure_logging
from statemachine.cli.errors import hint_for, os_error_message


class LazyCommand(NamedTuple):
    """A subcommand of `imaging` by the module and attribute that define it, and its one-line help (shown by
    `imaging --help` without importing the module; a test checks it against the command's own)."""

    module: str
    attribute: str
    short_help: str


COMMANDS: dict[str, LazyCommand] = {
    "vhd": LazyCommand(
        "statemachine.cli.vhd",
        "vhd",
        "Inspect, check, compare, flatten, create and write VHD chains (fixed, dynamic, differencing).",
    ),
    "server": LazyCommand(
        "statemachine.cli.server",
        "server",
        "Register servers (a name and the leaf of their disk chain) and look at them.",
    ),
    "image": LazyCommand(
        "statemachine.cli.image", "image", "Create images of servers (or of a disk chain) and manage them."
    ),
    "token": LazyCommand(
        "statemachine.cli.tokens", "token", "API tokens: each maps to one tenant; stored hashed, shown once."
    ),
    "schedule": LazyCommand(
        "statemachine.cli.schedules",
        "schedule",
        "Image servers on a schedule (daily or weekly, in UTC) and keep the newest N scheduled images.",
    ),
    "serve": LazyCommand(
        "statemachine.cli.serve",
        "serve",
        "Serve the HTTP API (the same code as on API Gateway) on waitress; images run in this process.",
    ),
}


class ImagingGroup(click.Group):
    """The `imaging` group: subcommands loaded on demand from `COMMANDS`, and the errors of bad input turned into
    one-line messages with exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        lazy = COMMANDS.get(cmd_name)
        if lazy is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module(lazy.module), lazy.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{lazy.module}.{lazy.attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from the table: `imaging --help` imports none of them."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            lazy = COMMANDS.get(name)
            if lazy is not None:
                rows.append((name, click.utils.make_default_short_help(lazy.short_help, limit)))
            else:
                command = self.commands[name]
                if not command.hidden:
                    rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except vhdcore.VhdError as err:
            raise UserError(str(err), hint=hint_for(err)) from err
        except OSError as err:
            if err.errno == errno.EPIPE:
                raise  # click stops quietly when the reader of our output went away
            raise UserError(os_error_message(err)) from err


def package_version() -> str:
    from importlib import metadata  # only for --version: reading the installed metadata takes a while

    try:
        return metadata.version("cloud-imaging")
    except metadata.PackageNotFoundError:
        return "unknown"


def show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"imaging, version {package_version()}")
    ctx.exit()


@click.group(cls=ImagingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=show_version,
    help="Show the version and exit.",
)
@click.option("-v", "--verbose", count=True, help="More logs on stderr: -v for INFO (default WARNING), -vv for DEBUG.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="IMAGING_LOG_FORMAT",
    help="Logs on stderr as plain lines or JSON lines [IMAGING_LOG_FORMAT].",
)
@click.pass_context
def imaging(ctx: click.Context, verbose: int, log_format: str) -> None:
    """Cloud Imaging: image servers' VHD chains (see `imaging vhd|server|image --help`).

    stdout carries a command's result only (with --json, exactly one JSON document); logs, progress and errors go
    to stderr.
    """
    options = LogOptions(verbose=verbose, log_format="json" if log_format == "json" else "text")
    ctx.obj = options
    configure_logging(options)


def main() -> None:
    """Entry point of the `imaging` console script.

    A command that ran the embedded engine leaves moto's hundreds of thousands of objects and its threads behind;
    tearing the interpreter down took longer than some whole commands. Once such a command has returned (its
    stores closed, its output written), the process flushes its streams and ends at once.
    """
    try:
        imaging.main(prog_name="imaging")
    except SystemExit as done:
        if "statemachine.engine" not in sys.modules:
            raise
        code = done.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code or 0)
