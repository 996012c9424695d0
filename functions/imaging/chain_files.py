"""The files beside a chain's layers: the candidates for other children of its layers, which a coalesce must never
strand. vhdcore keeps its coalesce journal and lock beside the chain under `COALESCE_FILES_PREFIX`: those are not
disks. Light on purpose (no store, no state): `imaging vhd coalesce` and the workflow's Coalesce both use it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

COALESCE_FILES_PREFIX = ".vhdcore-coalesce"
"""vhdcore's journal and lock files beside a chain: not disks."""


def disk_files_in(folder: Path) -> Iterator[Path]:
    """The files of `folder` that may be disks (all but coalesce's own files)."""
    return (path for path in folder.iterdir() if path.is_file() and not path.name.startswith(COALESCE_FILES_PREFIX))


def sibling_files(leaf: str) -> list[str]:
    """The other files of the leaf's folder (the leaf's real folder, links resolved), sorted."""
    return sorted(str(path) for path in disk_files_in(Path(leaf).resolve().parent))
