"""Editable installs of cloud-imaging: import `statemachine` and `functions` from the work tree.

maturin's editable wheel (`pip install -e .`, `maturin develop`) puts only its python-source,
`<work tree>/rust_core/python`, on sys.path (through `cloud_imaging.pth`). The application packages live at the
top of the work tree, so this finder, placed last on sys.meta_path, resolves exactly those two names there when
nothing else did. In a regular install (`pip install .`) both packages are in site-packages, are found first,
and this finder is never asked.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from types import ModuleType

PACKAGES = frozenset({"statemachine", "functions"})


def _work_tree() -> Path | None:
    for entry in sys.path:
        folder = Path(entry or ".")
        if folder.name == "python" and folder.parent.name == "rust_core":
            root = folder.parent.parent
            if (root / "pyproject.toml").is_file() and (root / "statemachine").is_dir():
                return root
    return None


class WorkTreeFinder(MetaPathFinder):
    """Finds the top-level packages `statemachine` and `functions` in an editable work tree."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in PACKAGES:
            return None
        root = _work_tree()
        if root is None:
            return None
        return PathFinder.find_spec(fullname, [str(root)])


def install() -> None:
    if not any(isinstance(finder, WorkTreeFinder) for finder in sys.meta_path):
        sys.meta_path.append(WorkTreeFinder())
