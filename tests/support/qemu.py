"""Thin wrappers around qemu-img and qemu-io, used as the outside reference for fixed and dynamic VHDs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

QEMU_TIMEOUT = 120


def have_qemu() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def create_vpc(path: str | os.PathLike[str], size: int, subformat: Literal["fixed", "dynamic"]) -> None:
    """`qemu-img create -f vpc` with the exact size (force_size=on)."""
    _run(["qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on", str(path), str(size)])


def io_write_pattern(path: str | os.PathLike[str], fmt: str, offset: int, length: int, pattern: int) -> None:
    _run(["qemu-io", "-f", fmt, "-c", f"write -q -P {pattern} {offset} {length}", str(path)])


def io_write_file(path: str | os.PathLike[str], fmt: str, offset: int, source: str | os.PathLike[str]) -> None:
    """Write the whole content of `source` at `offset` (qemu-io `write -s`)."""
    length = Path(source).stat().st_size
    _run(["qemu-io", "-f", fmt, "-c", f"write -q -s {source} {offset} {length}", str(path)])


def io_write_many(path: str | os.PathLike[str], fmt: str, commands: list[str]) -> None:
    """Several qemu-io commands in one process (each `-c`)."""
    args = ["qemu-io", "-f", fmt]
    for cmd in commands:
        args += ["-c", cmd]
    _run([*args, str(path)])


def convert_to_raw(src: str | os.PathLike[str], dst: str | os.PathLike[str], fmt: str = "vpc") -> bytes:
    _run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(src), str(dst)])
    return Path(dst).read_bytes()


def info(path: str | os.PathLike[str], fmt: str = "vpc") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(_run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)]))
    return out


def check(path: str | os.PathLike[str], fmt: str = "vpc") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "check", "-f", fmt, str(path)], capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False
    )
