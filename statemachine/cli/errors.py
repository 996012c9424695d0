"""What the `imaging` command says about an error a user can cause: the one-line message of an OS error, and the
hint (a `hint:` line under the `error:` line) for the vhdcore errors where one helps (functions.imaging.errors
translates vhdcore's errors, here as everywhere). `ImagingGroup.invoke`
(statemachine/cli/__init__.py) turns both into a `UserError` with exit code 1."""

from __future__ import annotations

import vhdcore

NOT_A_VHD_HINT = "imaging reads VHD disks and chains (fixed, dynamic, differencing): convert others to one first"


def hint_for(err: vhdcore.VhdError) -> str | None:
    """The hint under a vhdcore error: the domain's one translation of vhdcore's errors (`vhd_hint`), except for a
    file that is no VHD at all."""
    if err.field == "footer.cookie":  # not a VHD at all: the message names the format found
        return NOT_A_VHD_HINT
    # Imported on an error only: `import statemachine.cli` (every command, --help, --version) loads no domain module.
    from functions.imaging.errors import vhd_hint

    return vhd_hint(err)


def os_error_message(err: OSError) -> str:
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename else reason
