"""Opening a chain for imaging: vhdcore's errors become the workflow's DISK_MISSING / DISK_CORRUPT failures."""

from __future__ import annotations

from pathlib import Path

import vhdcore
from functions.imaging.errors import DiskCorruptError, DiskMissingError


def open_disk(leaf: str) -> vhdcore.Chain:
    """The chain whose leaf is `leaf` (an absolute path is used, so layer paths do not depend on the cwd)."""
    path = Path(leaf).absolute()
    if not path.is_file():
        raise DiskMissingError(f"disk {leaf}: no such file")
    try:
        return vhdcore.open_chain(str(path))
    except vhdcore.MissingParentError as error:
        raise DiskMissingError(str(error)) from error
    except vhdcore.VhdError as error:
        raise DiskCorruptError(str(error)) from error
