"""Cancel and resume on the real ASL with the real handlers, in this process (DESIGN §3, "Jobs outlive their
runners"): a cancelled job fails through the ASL's Catch (the Failed state runs the failure path); a job whose
runner is gone runs again under its own id from what it stored (Snapshot and Estimate find their records, Compress
reuses every frame, Coalesce is not run again), and its old runner, coming back, changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functions.catalog.launch import execution_input
from functions.handlers import upload
from functions.imaging.cancel import request_cancel
from functions.imaging.jobs import ImagingRequest
from functions.imaging.recovery import hand_over, recover_jobs
from functions.imaging.services import ImagingServices
from functions.state import SqliteStateStore, Status
from functions.storage import FileObjectStore
from statemachine.engine import ExecutionResult
from statemachine.local import LocalImaging
from tests.support.pyvhd import flatten
from tests.support.workflow import (
    TIMEOUT_S,
    Env,
    build_sample_chain,
    configure_workflow,
    image_raw,
    register_server,
    request,
)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A file store and SQLite state in tmp_path, the workflow's settings pointing at them."""
    configure_workflow(monkeypatch, (tmp_path / "store").as_uri(), tmp_path / "state.sqlite3")
    state = SqliteStateStore(tmp_path / "state.sqlite3")
    yield Env(tmp_path, FileObjectStore(tmp_path / "store"), state)
    state.close()


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Images are checked with the outside tools."""


@pytest.fixture(autouse=True)
def _staged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGING_OBJECT_LAYOUT", "staged")  # frames staged and sent as parts, as on S3


def services_of(env: Env) -> ImagingServices:
    from functions.settings import config_from_environment

    return ImagingServices(store=env.store, state=env.state, config=config_from_environment())


def held_upload() -> tuple[Any, threading.Event, threading.Event]:
    """An Upload handler whose first call waits for `release` (after saying it `entered`), then fails; the later
    calls are the real handler."""
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def handler(event: Any, context: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            release.wait(TIMEOUT_S)
            raise RuntimeError("the first runner came back after it was given up")
        return upload.handler(event, context)

    return handler, entered, release


def test_a_cancelled_job_fails_through_the_catch_path(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    register_server(env, leaf)
    handler, entered, release = held_upload()
    services = services_of(env)
    # The held step fails once released; the Catch sends the execution to Failed, which finds the cancel.
    result = cancelled_while_held(env, services, handler, entered, release, "job-cancel-catch")
    job = env.state.get_job("job-cancel-catch")
    assert result.status == "FAILED" and "Failed" in result.states_entered()
    assert (job.status, job.error_code) == (Status.ERROR, "CANCELLED")
    assert env.state.get_image("img-job-cancel-catch").status is Status.ERROR
    assert env.state.get_lock("web1") is None
    assert list(env.store.list_objects("staging/")) == []
    assert env.store.list_multipart_uploads() == []


def test_a_cancel_is_seen_by_the_running_step_at_its_next_part(env: Env) -> None:
    """Without any step failing on its own: the Upload step reads the cancel before its next part."""
    leaf = build_sample_chain(env.root / "disks")
    register_server(env, leaf)
    services = services_of(env)
    entered, release = threading.Event(), threading.Event()

    def upload_after_the_cancel(event: Any, context: Any) -> Any:
        entered.set()
        release.wait(TIMEOUT_S)
        return upload.handler(event, context)

    result = cancelled_while_held(env, services, upload_after_the_cancel, entered, release, "job-cancel-part")
    job = env.state.get_job("job-cancel-part")
    assert (job.status, job.error_code) == (Status.ERROR, "CANCELLED"), job.history[-1].detail
    assert "JobCancelledError" in (job.history[-1].detail or "")
    assert result.status == "FAILED"
    assert env.state.get_lock("web1") is None
    assert list(env.store.list_objects("staging/")) == []
    assert env.store.list_multipart_uploads() == []


def cancelled_while_held(
    env: Env, services: ImagingServices, handler: Any, entered: threading.Event, release: threading.Event, job: str
) -> ExecutionResult:
    """Image web1 as `job` with `handler` as its Upload step; once the step is entered, cancel the job (on a thread:
    the canceller waits for the runner), release the step when the cancel is recorded, and return the execution."""
    with LocalImaging({"UploadFunctionArn": handler}, services=services) as workflow:
        execution = workflow.start(request(job, server="web1"))
        assert entered.wait(TIMEOUT_S)
        cancelling = threading.Thread(target=request_cancel, args=(services, f"img-{job}"), kwargs={"wait_s": 60})
        cancelling.start()
        _wait_for_cancel_flag(env, job)
        release.set()
        result = workflow.wait(execution, TIMEOUT_S)
        cancelling.join(TIMEOUT_S)
    return result


def _wait_for_cancel_flag(env: Env, job_id: str) -> None:
    flagged = threading.Event()
    while not flagged.wait(0.01):
        if env.state.get_job(job_id).cancel_requested_at is not None:
            flagged.set()


def test_a_job_given_up_by_its_runner_is_resumed_under_its_own_id_from_what_it_stored(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    register_server(env, leaf)
    services = services_of(env)
    handler, entered, release = held_upload()
    with LocalImaging({"UploadFunctionArn": handler}, services=services) as workflow:
        first = workflow.start(request("job-resume-own-id", server="web1"))
        assert entered.wait(TIMEOUT_S)
        disk_before = env.state.get_server("web1").disk
        assert hand_over(services, ["job-resume-own-id"]) == ["job-resume-own-id"]  # as a stopping server does
        started: list[str] = []

        def resume(resumed: ImagingRequest, name: str) -> None:
            started.append(workflow.start(execution_input(resumed), name=name))

        recovered = recover_jobs(services, resume=resume)
        assert [(item.job_id, item.action) for item in recovered] == [("job-resume-own-id", "resumed")]
        second = workflow.wait(started[0], TIMEOUT_S)
        release.set()  # the first runner wakes up and fails: the job it had is done, nothing may change
        workflow.wait(first, TIMEOUT_S)

    assert second.succeeded, (second.error, second.cause)
    states = second.states_entered()
    assert states[:4] == ["Prepare", "Resuming?", "Snapshot", "Estimate"] and "Coalesce" not in states
    assert second.output["plan"]["groups"] == [
        {"first": 0, "count": 2},
        {"first": 2, "count": 2},
        {"first": 4, "count": 2},
    ]
    job = env.state.get_job("job-resume-own-id")
    assert (job.status, job.runs, job.execution_name) == (Status.ACTIVE, 2, "job-resume-own-id-run2")
    assert env.state.get_image("img-job-resume-own-id").status is Status.ACTIVE
    assert env.state.get_server("web1").disk == disk_before, "frozen once: the resumed run took no new snapshot"
    assert image_raw(env, "img-job-resume-own-id") == expected
    assert env.state.get_lock("web1") is None
    assert list(env.store.list_objects("staging/")) == []
    assert env.store.list_multipart_uploads() == []
    assert [info.key for info in env.store.list_objects("images/")] == [
        "images/img-job-resume-own-id/image.vhd.zst",
        "images/img-job-resume-own-id/manifest.json",
    ]
