"""`imaging serve` in a subprocess for the HTTP tests: a data dir of its own, a free port, its address read from the
first line it prints; plus the small chains and tokens those tests register."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import vhdcore
from functions.state import Server, open_state_store

MIB = 1024**2


@dataclass
class Served:
    url: str
    host: str
    port: int
    process: subprocess.Popen[str]
    stderr: Path


def imaging(data_dir: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`imaging ARGS...` with IMAGING_DATA_DIR=data_dir (this interpreter, so the work tree's code runs)."""
    env = {**os.environ, "IMAGING_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "statemachine.cli", *args], capture_output=True, text=True, env=env, timeout=timeout_s
    )


def new_token(data_dir: Path, tenant: str) -> str:
    created = imaging(data_dir, "token", "create", tenant, "--json")
    assert created.returncode == 0, created.stderr
    token: str = json.loads(created.stdout)["token"]
    return token


def make_chain(folder: Path, seed: int) -> Path:
    """A depth-2 chain of 32 MiB with text, random and zero data, written by our writer."""
    folder.mkdir(parents=True)
    base, leaf = folder / "base.vhd", folder / "leaf.vhd"
    vhdcore.create(str(base), 32 * MIB)
    rng = random.Random(seed)
    vhdcore.write(str(base), 0, bytes(rng.getrandbits(8) for _ in range(256 * 1024)))
    vhdcore.write(str(base), 4 * MIB, b"cloud imaging " * 150_000)
    vhdcore.snapshot(str(base), str(leaf))
    vhdcore.write(str(leaf), 5 * MIB + 123, b"changed in the leaf " * 10_000)
    return leaf


def register(data_dir: Path, server_id: str, tenant: str, disk: Path) -> None:
    """A server record of `tenant`, written to the state store as `imaging server add` would."""
    state = open_state_store(f"sqlite:///{data_dir / 'state.sqlite3'}")
    try:
        now = datetime.now(UTC)
        state.put_server(Server(id=server_id, tenant=tenant, name=server_id, disk=str(disk), created_at=now))
    finally:
        state.close()


@contextmanager
def serving(data_dir: Path, *args: str, options: tuple[str, ...] = ()) -> Iterator[Served]:
    """`imaging OPTIONS... serve --port 0 ARGS...` until the block ends (then SIGTERM, and SIGKILL if it does not
    stop)."""
    env = {**os.environ, "IMAGING_DATA_DIR": str(data_dir)}
    data_dir.mkdir(parents=True, exist_ok=True)
    stderr = data_dir.parent / f"serve-{os.getpid()}-{id(args)}.stderr"
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "statemachine.cli", *options, "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # blocks until the server listens (or exits)
        assert first, f"serve exited: {stderr.read_text()}"
        url = json.loads(first)["listening"]
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        yield Served(url, parts.hostname, parts.port, process, stderr)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
