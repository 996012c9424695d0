"""Fixtures of the native (vhdcore) test suite: qemu, the shared xo-chain3 sample."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # tests.support is imported from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from tests.support import qemu as qemu_tools  # noqa: E402
from tests.support.samples import Sample, sample_available, shared_dir, unpack_sample  # noqa: E402

IN_CI = bool(os.environ.get("CI"))


def _missing(what: str, remedy: str = "run .ci/setup (it installs qemu-utils and zstd)") -> None:
    """A missing prerequisite fails loudly in CI (whose setup provides it) and skips on a developer's machine."""
    message = f"{what}: {remedy}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def qemu() -> None:
    """Require qemu-img and qemu-io (Debian package qemu-utils)."""
    if not qemu_tools.have_qemu():
        _missing("qemu-img/qemu-io not found on PATH")


@pytest.fixture(scope="session")
def xo_chain3(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """shared/samples/xo-chain3, each layer `zstd -d`-ed into a temporary folder under its own name."""
    if not sample_available("xo-chain3"):
        _missing(
            f"shared sample missing under {shared_dir()}",
            "lay the shared folder beside the repository, or set IMAGING_SHARED_DIR to it",
        )
    if shutil.which("zstd") is None:
        _missing("zstd not found on PATH")
    return unpack_sample("xo-chain3", tmp_path_factory.mktemp("xo-chain3"))
