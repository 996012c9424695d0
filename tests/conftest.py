"""Fixtures shared by every test folder: the `imaging` command, qemu-img, the shared samples, small chains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _needed_tool(name: str) -> str:
    """Path of an external tool; a missing one fails under CI (the setup must install it) and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: run .ci/setup (it installs qemu-utils and zstd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return _needed_tool("qemu-img")


@pytest.fixture(scope="session")
def zstd_exe() -> str:
    return _needed_tool("zstd")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The shared sample disks made by independent tools; CI and the developers lay `shared/` beside the repo."""
    folder = REPO.parent / "shared" / "samples"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    return folder


@pytest.fixture(scope="session")
def imaging_exe() -> str:
    """The installed `imaging` console script of this interpreter's environment."""
    candidates = [Path(sysconfig.get_path("scripts")) / "imaging", Path(sys.executable).parent / "imaging"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("imaging")
    if found is None:
        pytest.fail("the `imaging` command is not installed: run .ci/setup (pip install -e '.[dev]')")
    return found


@pytest.fixture
def run_imaging(imaging_exe: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `imaging ARGS...` in tmp_path (away from the repository, its data directory there unless the environment
    names one), capturing text output.

    `input` may be str or bytes; with bytes the output is still decoded as text.
    """

    def run(*args: str | os.PathLike[str], input: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
        argv = [imaging_exe, *map(str, args)]
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        # Never the user's own data directory (the vhd commands read it for registered servers' layers).
        env.setdefault("IMAGING_DATA_DIR", str(tmp_path / "imaging-data"))
        if isinstance(input, bytes):
            raw = subprocess.run(argv, input=input, capture_output=True, cwd=tmp_path, env=env, timeout=300)
            return subprocess.CompletedProcess(
                raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
            )
        return subprocess.run(argv, input=input, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    return run


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server (S3, DynamoDB, ...) over HTTP for the whole test session; tests use unique buckets/tables."""
    from tests.support.moto_server import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and a region, so boto3 never reaches real AWS or reads the developer's profile."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
