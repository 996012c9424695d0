"""A head start (functions.imaging.head_start) is taken by the job's steps only when it is exactly their work.

References: images checked with `zstd -d` and `qemu-img convert` against the chain flattened by the independent
reader (tests/support/pyvhd.py); what the Compress step did is read from its output in the execution history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import vhdcore
from functions.handlers import compress
from functions.imaging import head_start
from functions.imaging.services import ImagingServices
from functions.settings import config_from_environment
from statemachine.engine import ExecutionResult
from tests.support.pyvhd import flatten
from tests.support.workflow import Env, build_sample_chain, image_raw, request, run

REPO = Path(__file__).resolve().parents[2]
AN_HOUR_AGO = time.time() - 3600


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Every test here checks images with the outside tools."""


@pytest.fixture(autouse=True)
def _no_head_start_left() -> Any:
    yield
    head_start._current = None


def quiet_chain(folder: Path) -> Path:
    """The sample chain, its files last modified an hour ago (a chain nobody writes)."""
    leaf = build_sample_chain(folder)
    for layer in vhdcore.open_chain(str(leaf)).layers:
        os.utime(layer.path, (AN_HOUR_AGO, AN_HOUR_AGO))
    return leaf


def started(env: Env, job_id: str, leaf: Path) -> head_start._HeadStart:
    services = ImagingServices(store=env.store, state=env.state, config=config_from_environment())
    head_start.begin(services, job_id, str(leaf))
    head = head_start._current
    assert head is not None and head.finished.wait(60)
    return head


def run_seen(body: dict[str, Any]) -> tuple[ExecutionResult, list[dict[str, Any]]]:
    """Run the workflow, and what the Compress step's items returned (their `compressed` and `reused` frames)."""
    outputs: list[dict[str, Any]] = []

    def seen(event: Any, context: Any) -> Any:
        output = compress.handler(event, context)
        outputs.append(output)
        return output

    return run(body, {"CompressFunctionArn": seen}), outputs


def test_frames_compressed_ahead_are_taken_when_the_chain_is_unchanged(env: Env) -> None:
    leaf = quiet_chain(env.root / "disks")
    expected = flatten(leaf)
    head = started(env, "job-h1", leaf)
    assert head.compressed and head.frames

    result, outputs = run_seen(request("job-h1", disk=leaf))

    assert result.succeeded, (result.error, result.cause)
    assert outputs == [
        {"compressed": 0, "reused": len(head.frames), "compressed_bytes": sum(f.compressed_bytes for f in head.frames)}
    ]
    assert image_raw(env, "img-job-h1") == expected
    job = env.state.get_job("job-h1")
    assert job.progress == 100
    assert list(env.store.list_objects("staging/")) == []


def test_a_chain_written_after_the_head_start_is_compressed_again(env: Env) -> None:
    leaf = quiet_chain(env.root / "disks")
    head = started(env, "job-h2", leaf)
    assert head.compressed
    vhdcore.write(str(leaf), 5 * 1024**2, b"written after the head start " * 1000)
    expected = flatten(leaf)

    result, outputs = run_seen(request("job-h2", disk=leaf))

    assert result.succeeded, (result.error, result.cause)
    [output] = outputs
    assert output["reused"] == 0 and output["compressed"] == len(head.frames)
    assert image_raw(env, "img-job-h2") == expected


def test_a_chain_modified_moments_before_is_estimated_but_not_compressed_ahead(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")  # just written: a writer may still be at it

    head = started(env, "job-h3", leaf)

    assert head.estimate is not None
    assert head.plan_json is None and not head.compressed
    assert list(env.store.list_objects("staging/job-h3/")) == []


def test_a_head_start_nobody_takes_is_removed(env: Env) -> None:
    leaf = quiet_chain(env.root / "disks")
    services = ImagingServices(store=env.store, state=env.state, config=config_from_environment())
    head = started(env, "job-h4", leaf)
    assert list(env.store.list_objects("staging/job-h4/"))

    head_start.end(services)

    assert head.finished.is_set()
    assert list(env.store.list_objects("staging/job-h4/")) == []
    assert head_start._current is None


def test_an_estimate_made_ahead_serves_only_the_chain_it_was_made_of(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    config = config_from_environment()
    level, chunk_size = config.level, config.chunk_size

    head = started(env, "job-h5", leaf)
    assert head_start.estimate_for(vhdcore.open_chain(str(leaf)), level, chunk_size) is head.estimate

    vhdcore.write(str(leaf), 0, b"written after the estimate" * 100)  # the chain changed meanwhile
    assert head_start.estimate_for(vhdcore.open_chain(str(leaf)), level, chunk_size) is None


def test_the_cli_compresses_a_quiet_disk_while_the_engine_loads(env: Env) -> None:
    leaf = quiet_chain(env.root / "disks")
    expected = flatten(leaf)
    command = [sys.executable, "-m", "statemachine.cli", "-v", "--log-format", "json", "image", "create"]

    done = subprocess.run(
        [*command, "--disk", str(leaf), "--wait", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),  # the store and state of `env` (the fixture set them in the environment)
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    logs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [compressed] = [log for log in logs if log.get("message") == "group compressed"]
    assert compressed["compressed"] == 0 and compressed["reused"] == compressed["count"]
    assert image_raw(env, record["id"]) == expected
    assert list(env.store.list_objects("staging/")) == []
