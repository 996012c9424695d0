"""The `imaging` command as the CLI tests run it: `cli` runs this checkout's `python -m statemachine.cli` in a child
process with a data directory of its own (in tmp_path) and small chunks; `leaf` is the sample chain to image
(tests/support/workflow.py). tests/functional/conftest.py registers both fixtures; `ok_json` and
`assert_one_line_error` read a command's result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.workflow import build_sample_chain

REPO = Path(__file__).resolve().parents[2]
MIB = 1024**2

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(tmp_path: Path) -> Run:
    """Run `imaging ARGS...` from this checkout in tmp_path, with its own data directory and small chunks."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGING_DATA_DIR": str(tmp_path / "data"),
        "IMAGING_CHUNK_SIZE": str(8 * MIB),
        "IMAGING_PART_SIZE": str(5 * MIB),
        "COLUMNS": "120",
        "NO_COLOR": "1",
    }
    for name in ("IMAGING_STORE", "IMAGING_STATE", "IMAGING_COALESCE_DEADLINE_S"):
        env.pop(name, None)

    def run(*args: str | Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "statemachine.cli", *map(str, args)]
        return subprocess.run(
            argv, capture_output=True, text=True, cwd=tmp_path, env={**env, **(extra_env or {})}, timeout=300
        )

    return run


@pytest.fixture
def leaf(tmp_path: Path) -> Path:
    return build_sample_chain(tmp_path / "disks")


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
"""A log record on stderr (the handlers' warnings, such as a failed job's, come before the command's error)."""


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> list[str]:
    """The error line and what follows it (its hint), past any log records."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines
