"""The `imaging` command: `imaging vhd ...` today; servers, images, schedules and the API server later.

Errors a user can cause never show a traceback: a `vhdcore.VhdError` or an OS error becomes one `error:` line on
stderr (plus a `hint:` line where one helps) and exit code 1; click's usage errors exit with 2.
"""

from __future__ import annotations

import errno
from importlib import metadata
from typing import Any

import click

import vhdcore
from statemachine.cli_api import schedule, serve, token
from statemachine.cli_common import UserError
from statemachine.cli_image import image
from statemachine.cli_server import server
from statemachine.cli_vhd import vhd

HINTS: list[tuple[type[vhdcore.VhdError], str]] = [
    (
        vhdcore.MissingParentError,
        "a child finds its parent by the names recorded in it, relative to the child's folder: "
        "keep the chain's files together and unrenamed",
    ),
    (
        vhdcore.ParentMismatchError,
        "the parent file is not the disk this child was created on (its UUID differs): it was replaced or re-created",
    ),
    (
        vhdcore.CoalescePendingError,
        "run `imaging vhd coalesce` on the chain's leaf to finish the interrupted coalesce; the content is intact",
    ),
    (vhdcore.ChainCycleError, "the chain's parent links loop back; run `imaging vhd check` on the leaf"),
    (vhdcore.ChainTooDeepError, "the chain is deeper than the depth cap; coalesce it to shorten it"),
    (vhdcore.UnsupportedError, "this VHD uses a feature vhdcore does not support"),
    (vhdcore.VhdFormatError, "run `imaging vhd check PATH` to list every problem of the chain"),
]


def hint_for(err: vhdcore.VhdError) -> str | None:
    for cls, hint in HINTS:
        if isinstance(err, cls):
            return hint
    return None


def os_error_message(err: OSError) -> str:
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename else reason


class ImagingGroup(click.Group):
    """A click group that turns the errors of bad input into one-line messages with exit code 1."""

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
    try:
        return metadata.version("cloud-imaging")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group(cls=ImagingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_version(), prog_name="imaging")
def imaging() -> None:
    """Cloud Imaging: image servers' VHD chains (see `imaging vhd|server|image --help`)."""


imaging.add_command(vhd)
imaging.add_command(server)
imaging.add_command(image)
imaging.add_command(token)
imaging.add_command(schedule)
imaging.add_command(serve)


def main() -> None:
    """Entry point of the `imaging` console script."""
    imaging.main(prog_name="imaging")


if __name__ == "__main__":
    main()
