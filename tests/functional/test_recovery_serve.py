"""`imaging serve` and jobs that outlive it (DESIGN §3 and §9; issue 14 items 2 and 4): SIGTERM during a job hands
it over, and the next start resumes it (what it stored kept) so that its image ends ACTIVE and its server is free;
a server SIGKILLed during a job leaves a job that the next start recovers as soon as its heartbeat is stale. And the
DynamoDB backend keeps the job's new fields and finds unfinished jobs (moto server).
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from functions.state import Job, JobEvent, Status, create_table, open_state_store
from tests.functional.test_recovery import (
    FAST_RECOVERY,
    Cli,
    assert_nothing_left,
    build_slow_chain,
    image_raw,
    job_of,
    lock_holder,
    make_cli,
    running_job,
    stored_parts,
    wait_for,
)
from tests.support.pyvhd import flatten


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return make_cli(tmp_path)


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Images are checked with the outside tools."""


@contextmanager
def served(cli: Cli) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`imaging serve --port 0` as a child process; its address from the first line it prints."""
    process = cli.start("serve", "--port", "0")
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        yield process, first["listening"]
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def post(url: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 202
        data: dict[str, Any] = json.loads(answer.read())
        return data


def finished(cli: Cli, job: Job) -> bool:
    """The job's image ended (ACTIVE once its manifest is written, or ERROR) and its server's lock is free."""
    state = cli.state()
    try:
        ended = state.get_image(job.image_id).status in (Status.ACTIVE, Status.ERROR)
    finally:
        state.close()
    return ended and lock_holder(cli) is None


def prepared(cli: Cli) -> tuple[str, bytes]:
    """A registered legacy server of tenant acme (slow to upload), a token for acme, the chain's flattened bytes."""
    leaf = build_slow_chain(cli.root / "srv" / "web1")
    added = cli.run("server", "add", "web1", "--disk", leaf, "--tenant", "acme", "--flavor", "legacy", "--json")
    assert added.returncode == 0, added.stderr
    created = cli.run("token", "create", "acme", "--json")
    assert created.returncode == 0, created.stderr
    return str(json.loads(created.stdout)["token"]), flatten(leaf)


def test_sigterm_during_a_job_hands_it_over_and_the_next_start_resumes_it(cli: Cli) -> None:
    token, expected = prepared(cli)
    with served(cli) as (server, url):
        image = post(f"{url}/v1/servers/web1/images", token, {"name": "nightly"})
        job = wait_for("the job to upload", lambda: running_job(cli))
        assert job.image_id == image["id"]
        wait_for("two parts stored", lambda: len(stored_parts(cli)) >= 2)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    stored = len(stored_parts(cli))
    handed = job_of(cli, job.id)
    assert handed.abandoned_at is not None and handed.status is Status.UPLOADING, "handed over, not failed"

    with served(cli):  # its start resumes the job at once, without waiting for the heartbeat to go stale
        wait_for("the resumed job to end", lambda: finished(cli, job))
    ended = job_of(cli, job.id)
    assert (ended.status, ended.runs) == (Status.ACTIVE, 2), ended.error_code
    manifest = json.loads((cli.store / "images" / job.image_id / "manifest.json").read_bytes())
    assert sum(part["kept"] for part in manifest["parts"]) == stored, "the parts stored before SIGTERM were kept"
    image_bytes = (cli.store / "images" / job.image_id / "image.vhd.zst").read_bytes()
    assert image_raw(cli.root, image_bytes, "served") == expected
    assert lock_holder(cli) is None
    assert_nothing_left(cli.store, killed=True)


def test_a_sigkilled_server_leaves_a_job_that_the_next_start_recovers(cli: Cli) -> None:
    token, expected = prepared(cli)
    cli.env |= FAST_RECOVERY
    with served(cli) as (server, url):
        post(f"{url}/v1/servers/web1/images", token, {"name": "nightly"})
        job = wait_for("the job to upload", lambda: running_job(cli))
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    assert job_of(cli, job.id).abandoned_at is None, "nothing handed it over"

    with served(cli):
        wait_for("the resumed job to end", lambda: finished(cli, job))
    ended = job_of(cli, job.id)
    assert (ended.status, ended.runs) == (Status.ACTIVE, 2), ended.error_code
    image_bytes = (cli.store / "images" / job.image_id / "image.vhd.zst").read_bytes()
    assert image_raw(cli.root, image_bytes, "killed") == expected
    assert lock_holder(cli) is None
    assert_nothing_left(cli.store, killed=True)


def test_dynamodb_keeps_the_job_heartbeat_cancel_and_runs_and_lists_unfinished_jobs(
    aws_test_env: None, moto_endpoint: str
) -> None:
    client = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1")
    table = f"imaging-{uuid.uuid4().hex[:12]}"
    create_table(client, table)
    state = open_state_store(f"dynamodb://{table}", client=client)
    at = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    running = Job.queued(at=at, id="job-a", tenant="acme", server_id="web1", image_id="img-a")
    on_disk = Job.queued(at=at + timedelta(seconds=1), id="job-b", tenant="acme", disk="/srv/x.vhd", image_id="img-b")
    finished = Job.queued(at=at + timedelta(seconds=2), id="job-c", tenant="acme", server_id="web2", image_id="img-c")
    for job in (running, on_disk, finished):
        state.create_job(job)
    beat = at + timedelta(seconds=30)
    stored = state.update_job(
        state.get_job("job-a").revised(
            heartbeat_at=beat, cancel_requested_at=beat, abandoned_at=beat + timedelta(seconds=1), runs=2
        )
    )
    ended = state.get_job("job-c").transition(Status.ERROR, at=beat, error_code="INTERRUPTED", error_hint="again")
    state.update_job(ended)

    again = state.get_job("job-a")
    assert again == stored
    assert (again.heartbeat_at, again.cancel_requested_at, again.runs) == (beat, beat, 2)
    assert again.abandoned_at == beat + timedelta(seconds=1)
    assert again.last_sign_of_life == beat
    assert [job.id for job in state.list_unfinished_jobs()] == ["job-a", "job-b"]
    assert state.get_job("job-c").history[-1] == JobEvent(status=Status.ERROR, at=beat, detail=None)
