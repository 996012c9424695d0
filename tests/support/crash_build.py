"""The vhdcore module with its test hooks (cargo feature `test-utils`): the coalesce crash hook
(`VHDCORE_COALESCE_CRASH_AFTER`) is compiled only there. The release module (the wheel, the Lambda layer and the
editable install the tests import) leaves it out; tests that need a process to abort at a chosen write run a child
on this build, found first on its PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUST = REPO / "rust_core"


def build_test_utils_module(into: Path) -> Path:
    """Builds `vhdcore-py` with `vhdcore/test-utils` (dev profile at opt-level 3, in its own target folder so the
    editable install's build is left alone) and lays out an importable `vhdcore` package under `into`; returns the
    folder to put on PYTHONPATH."""
    target = RUST / "target" / "test-utils"
    subprocess.run(
        [
            "cargo",
            "build",
            "--locked",
            "-p",
            "vhdcore-py",
            "--features",
            "vhdcore/test-utils",
            "--target-dir",
            str(target),
        ],
        cwd=RUST,
        env={**os.environ, "CARGO_PROFILE_DEV_OPT_LEVEL": "3", "CARGO_PROFILE_DEV_DEBUG": "0"},
        check=True,
        capture_output=True,
    )
    package = into / "vhdcore"
    shutil.copytree(RUST / "python" / "vhdcore", package, dirs_exist_ok=True)
    for stale in package.glob("_vhdcore*.so"):
        stale.unlink()
    shutil.copy(target / "debug" / "lib_vhdcore.so", package / "_vhdcore.abi3.so")
    return into
