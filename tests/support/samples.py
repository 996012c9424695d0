"""The shared sample chains (shared/samples/), made by independent tools."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The project's shared/ folder: $IMAGING_SHARED_DIR, else beside the repository (as CI lays it out)."""
    env = os.environ.get("IMAGING_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


@dataclass(frozen=True)
class Sample:
    """A decompressed sample chain: its folder, its leaf and its expected.json."""

    folder: Path
    leaf: Path
    expected: dict[str, Any]


def unpack_sample(name: str, dst: Path) -> Sample:
    """`zstd -d` every layer of shared/samples/NAME into `dst`, keeping the names (parents are found by name)."""
    src = shared_dir() / "samples" / name
    expected: dict[str, Any] = json.loads((src / "expected.json").read_text())
    for packed in sorted(src.glob("*.vhd.zst")):
        out = dst / packed.name.removesuffix(".zst")
        subprocess.run(["zstd", "-q", "-d", "-f", str(packed), "-o", str(out)], check=True, timeout=120)
    return Sample(folder=dst, leaf=dst / str(expected["leaf"]), expected=expected)


def sample_available(name: str) -> bool:
    return (shared_dir() / "samples" / name / "expected.json").is_file()
