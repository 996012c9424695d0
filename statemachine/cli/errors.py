"""What the `imaging` command says about an error a user can cause: the one-line message of an OS error, and the
hint (a `hint:` line under the `error:` line) for the vhdcore errors where one helps. `ImagingGroup.invoke`
(statemachine/cli/__init__.py) turns both into a `UserError` with exit code 1."""

from __future__ import annotations

import vhdcore

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


NOT_A_VHD_HINT = "imaging reads VHD disks and chains (fixed, dynamic, differencing): convert others to one first"


def hint_for(err: vhdcore.VhdError) -> str | None:
    if err.field == "footer.cookie":  # not a VHD at all: the message names the format found
        return NOT_A_VHD_HINT
    for cls, hint in HINTS:
        if isinstance(err, cls):
            return hint
    return None


def os_error_message(err: OSError) -> str:
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename else reason
