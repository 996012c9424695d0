"""Opening a chain for imaging: a local leaf file (an absolute path) or a leaf in the object store (a key, see
store_chains); vhdcore's errors become the workflow's failures (errors.vhd_errors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import vhdcore
from functions.imaging.errors import DiskMissingError, vhd_errors
from functions.imaging.store_chains import is_store_key, open_store_chain
from functions.storage import ObjectStore


def open_disk(store: ObjectStore, leaf: str, layers: Sequence[str] | None = None) -> vhdcore.Chain:
    """The chain whose leaf is `leaf`: a file when `leaf` is an absolute path, else a key of `store` (its layers
    exactly `layers`, leaf first, when the chain is recorded; else found through the locators)."""
    if is_store_key(leaf):
        return open_store_chain(store, leaf, layers)
    path = Path(leaf)
    if not path.is_file():
        raise DiskMissingError(f"disk {leaf}: no such file")
    with vhd_errors():
        return vhdcore.open_chain(str(path))
