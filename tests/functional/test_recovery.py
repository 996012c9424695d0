"""Jobs outlive their runners (DESIGN §3; issue 14 items 2, 3 and 7), through the CLI in child processes, as an
operator meets them: a SIGKILLed `imaging image create`, Ctrl-C on it in a terminal (a pty), `imaging image
cancel` of a running job, a resumed job on the file store and on S3 (a moto server behind a counting proxy), and
what is left on disk afterwards (staging, multipart uploads, lock files, empty folders).

Jobs are made slow enough to be caught running without any hook in the code: the server's flavor is `legacy`
(12.5 MB/s of upload bandwidth) and its frames are staged and sent as parts (IMAGING_OBJECT_LAYOUT=staged), so a
job spends seconds uploading. The tests wait for what they need (a job's status in the SQLite state, a number of
stored parts), never for a fixed time. Images are checked with `zstd -d` and `qemu-img` against the chain
flattened by tests/support/pyvhd.
"""

from __future__ import annotations

import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

import vhdcore
from functions.catalog.launch import execution_input
from functions.imaging.jobs import ImagingRequest
from functions.imaging.recovery import recover_jobs
from functions.imaging.services import ImagingConfig, ImagingServices
from functions.state import Job, NotFoundError, SqliteStateStore, Status
from functions.storage import FileObjectStore, ObjectStore, open_object_store
from functions.storage.objects import PartInfo
from statemachine.local import LocalImaging
from tests.functional.storage.faulty_proxy import FaultPlan, faulty_proxy
from tests.support.pyvhd import flatten

REPO = Path(__file__).resolve().parents[2]
MIB = 1024**2
CHUNK = 8 * MIB
DISK = 96 * MIB
WAIT_S = 120.0
"""The longest any condition is waited for (a failing test ends by then)."""


def build_slow_chain(folder: Path, seed: int = 3) -> Path:
    """A depth-2 chain of 96 MiB whose 8 MiB chunks each hold 3 MiB of random bytes: frames of about 3 MiB, sent
    two to a 6 MiB part, six parts in all."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.vhd"
    vhdcore.create(str(base), DISK)
    for chunk in range(DISK // CHUNK):
        vhdcore.write(str(base), chunk * CHUNK, rng.randbytes(3 * MIB))
    leaf = folder / "leaf.vhd"
    vhdcore.snapshot(str(base), str(leaf))
    vhdcore.write(str(leaf), 5 * MIB + 4096, b"written after the snapshot " * 2000)
    return leaf


@dataclass
class Cli:
    root: Path
    env: dict[str, str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def store(self) -> Path:
        return self.data / "store"

    def argv(self, *args: str | Path) -> list[str]:
        return [sys.executable, "-m", "statemachine.cli", *map(str, args)]

    def run(self, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, cwd=self.root, env=self.env, timeout=timeout
        )

    def start(self, *args: str | Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
            env=self.env,
        )

    def state(self) -> SqliteStateStore:
        return SqliteStateStore(self.data / "state.sqlite3")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return make_cli(tmp_path)


def make_cli(tmp_path: Path) -> Cli:
    """`imaging` in child processes with a data dir of their own, 8 MiB chunks, 5 MiB parts and staged frames."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGING_DATA_DIR": str(tmp_path / "data"),
        "IMAGING_CHUNK_SIZE": str(CHUNK),
        "IMAGING_PART_SIZE": str(5 * MIB),
        "IMAGING_OBJECT_LAYOUT": "staged",
        "COLUMNS": "120",
        "NO_COLOR": "1",
    }
    for name in ("IMAGING_STORE", "IMAGING_STATE", "IMAGING_DISKS", "IMAGING_JOB_STALE_S", "IMAGING_HEARTBEAT_S"):
        env.pop(name, None)
    return Cli(tmp_path, env)


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Every image here is checked with the outside tools."""


def wait_for(what: str, condition: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


def register(cli: Cli, leaf: Path, server: str = "web1") -> None:
    added = cli.run("server", "add", server, "--disk", leaf, "--flavor", "legacy", "--json")
    assert added.returncode == 0, added.stderr


def running_job(cli: Cli, server: str = "web1", statuses: tuple[Status, ...] = (Status.UPLOADING,)) -> Job | None:
    state = cli.state()
    try:
        jobs = [job for job in state.list_jobs(server) if job.status in statuses]
    finally:
        state.close()
    return jobs[-1] if jobs else None


def stored_parts(cli: Cli) -> list[Path]:
    return sorted(cli.store.glob(".imaging-store/uploads/*/part-*"))


def image_raw(root: Path, compressed: bytes, name: str) -> bytes:
    packed, vhd, raw = root / f"{name}.vhd.zst", root / f"{name}.vhd", root / f"{name}.raw"
    packed.write_bytes(compressed)
    subprocess.run(["zstd", "-d", "-q", "-f", str(packed), "-o", str(vhd)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(raw)], check=True)
    return raw.read_bytes()


def assert_nothing_left(store: Path, *, killed: bool = False) -> None:
    """No staging, no multipart upload, no temp or lock file, no empty folder in a file store. After a SIGKILL
    (`killed`), the temp file of a write the kill cut short may remain until the store's sweep finds it stale:
    the sweep is run first, as if that time had passed."""
    if killed:
        FileObjectStore(store).sweep_leftovers(older_than_s=0.0)
    assert not (store / "staging").exists() or not any((store / "staging").rglob("*")), "staging left"
    area = store / ".imaging-store"
    assert list((area / "uploads").iterdir()) == [], "multipart uploads left"
    assert list((area / "locks").iterdir()) == [], "lock files left"
    leftovers = [path for path in (area / "tmp").iterdir() if not path.name.endswith(".probe")]
    assert leftovers == [], "temp files left"
    empty = [
        path
        for path in store.rglob("*")
        if path.is_dir() and not any(path.iterdir()) and area not in (path, *path.parents)
    ]
    assert empty == [], f"empty folders left: {empty}"


def lock_holder(cli: Cli, server: str = "web1") -> str | None:
    state = cli.state()
    try:
        lock = state.get_lock(server)
    finally:
        state.close()
    return lock.owner if lock is not None else None


def job_of(cli: Cli, job_id: str) -> Job:
    state = cli.state()
    try:
        return state.get_job(job_id)
    finally:
        state.close()


FAST_RECOVERY = {"IMAGING_JOB_STALE_S": "3", "IMAGING_HEARTBEAT_S": "0.5"}
"""A runner's death seen after 3 s instead of 45 (its heartbeat every half second keeps a live job fresh)."""


def killed_mid_upload(cli: Cli, server: str = "web1") -> Job:
    """A registered server's `image create` SIGKILLed while its job uploads; the job as the kill left it."""
    register(cli, build_slow_chain(cli.root / "srv" / server), server)
    creator = cli.start("image", "create", server, "--json")
    job: Job = wait_for("the job to upload", lambda: running_job(cli, server))
    creator.send_signal(signal.SIGKILL)
    creator.wait(timeout=30)
    return job


# --- a SIGKILLed runner ---------------------------------------------------------------------------------------------
def test_a_sigkilled_image_create_frees_its_server_within_a_minute_of_the_next_image_list(cli: Cli) -> None:
    """The real threshold (no tunable): the job's heartbeat stops with its process, and `image list` fails it
    INTERRUPTED once it is stale, its lock released and its staging and upload removed."""
    job = killed_mid_upload(cli)
    assert lock_holder(cli) == job.id, "killed mid-job, it still holds its server"

    first_call = time.monotonic()

    def freed() -> bool:
        listed = cli.run("image", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        return lock_holder(cli) is None

    wait_for("the server to be free", freed, timeout=70, interval=1.0)
    assert time.monotonic() - first_call < 60
    ended = job_of(cli, job.id)
    assert (ended.status, ended.error_code) == (Status.ERROR, "INTERRUPTED")
    assert ended.error_hint and "image the server again" in ended.error_hint
    listed = json.loads(cli.run("image", "list", "--json").stdout)
    assert [(item["id"], item["status"]) for item in listed] == [(job.image_id, "ERROR")]
    assert_nothing_left(cli.store, killed=True)

    again = cli.run("image", "create", "web1", "--json")  # the server takes a new image at once
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "ACTIVE"


def test_a_sigkilled_job_is_resumed_by_the_next_image_create_and_sends_only_the_missing_parts(cli: Cli) -> None:
    leaf = build_slow_chain(cli.root / "srv" / "web1")
    expected = flatten(leaf)
    register(cli, leaf)
    cli.env |= FAST_RECOVERY
    creator = cli.start("image", "create", "web1", "--json")
    wait_for("three parts stored", lambda: len(stored_parts(cli)) >= 3)
    creator.send_signal(signal.SIGKILL)
    creator.wait(timeout=30)
    killed = wait_for("the killed job", lambda: running_job(cli))
    kept = {path.name: path.stat().st_ino for path in stored_parts(cli)}
    assert 3 <= len(kept) < 6, kept
    wait_for("the job to go stale", lambda: _stale(cli, killed.id), timeout=30, interval=0.2)

    resumed = cli.run("image", "create", "web1", "--json")

    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming job {killed.id}" in resumed.stderr
    record = json.loads(resumed.stdout)
    assert record["id"] == killed.image_id, "the same job and image, not a new one"
    manifest = record["manifest"]
    parts = manifest["parts"]
    assert sum(part["kept"] for part in parts) == len(kept), "every part stored before the kill was kept"
    assert len(parts) == manifest["part_count"] > len(kept)
    assert job_of(cli, killed.id).runs == 2
    image = (cli.store / "images" / killed.image_id / "image.vhd.zst").read_bytes()
    assert image_raw(cli.root, image, "resumed") == expected
    listed = json.loads(cli.run("image", "list", "--json").stdout)
    assert [item["id"] for item in listed] == [killed.image_id], "one image"
    assert_nothing_left(cli.store, killed=True)


def _stale(cli: Cli, job_id: str) -> bool:
    from functions.imaging.jobs import is_stale
    from functions.state.clock import system_clock

    return is_stale(job_of(cli, job_id), system_clock(), 3.0)


def test_a_job_resumed_by_recovery_on_the_file_store_sends_only_the_missing_parts(cli: Cli) -> None:
    """Recovery with a runner (what `imaging serve` does at its start), in this process, with the store's
    requests counted: the parts stored before the kill are neither sent nor copied again."""
    leaf = build_slow_chain(cli.root / "srv" / "web1")
    expected = flatten(leaf)
    register(cli, leaf)
    creator = cli.start("image", "create", "web1", "--json")
    wait_for("three parts stored", lambda: len(stored_parts(cli)) >= 3)
    creator.send_signal(signal.SIGKILL)
    creator.wait(timeout=30)
    before = len(stored_parts(cli))
    store = CountingStore(FileObjectStore(cli.store))

    job = resume_in_process(cli, store)

    manifest = json.loads((cli.store / "images" / job.image_id / "manifest.json").read_bytes())
    assert store.parts_sent == manifest["part_count"] - before
    assert store.parts_sent > 0
    image = (cli.store / "images" / job.image_id / "image.vhd.zst").read_bytes()
    assert image_raw(cli.root, image, "recovered") == expected
    assert_nothing_left(cli.store, killed=True)


class CountingStore:
    """An ObjectStore that counts the parts it is asked to store (sent or copied)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.parts_sent = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes, crc32c: int) -> PartInfo:
        self.parts_sent += 1
        return self.inner.upload_part(key, upload_id, number, data, crc32c)

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, start: int, length: int
    ) -> PartInfo:
        self.parts_sent += 1
        return self.inner.upload_part_copy(key, upload_id, number, source_key, start, length)


def resume_in_process(cli: Cli, store: Any) -> Job:
    """Recover the killed job (stale at once: a zero threshold) with a runner in this process; wait for its end."""
    state = cli.state()
    services = ImagingServices(
        store=store, state=state, config=ImagingConfig(chunk_size=CHUNK, part_size=5 * MIB, object_layout="staged")
    )
    try:
        with LocalImaging(services=services) as workflow:
            executions: list[str] = []

            def resume(request: ImagingRequest, name: str) -> None:
                executions.append(workflow.start(execution_input(request), name=name))

            recovered = recover_jobs(services, resume=resume, stale_after_s=0.0)
            assert [item.action for item in recovered] == ["resumed"]
            result = workflow.wait(executions[0], timeout_s=WAIT_S)
            assert result.succeeded, (result.error, result.cause)
        job = state.get_job(recovered[0].job_id)
        assert job.status is Status.ACTIVE and job.runs == 2
        assert state.get_lock("web1") is None
        return job
    finally:
        state.close()


def test_a_job_killed_on_s3_is_resumed_by_image_create_sending_only_the_missing_parts(
    cli: Cli, aws_test_env: None, moto_endpoint: str
) -> None:
    """On S3 (a moto server behind a proxy that counts UploadPart and UploadPartCopy requests)."""
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"img-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=bucket)
    leaf = build_slow_chain(cli.root / "srv" / "web1")
    expected = flatten(leaf)
    plan = FaultPlan(window=None)
    with faulty_proxy(moto_endpoint, plan) as proxy:
        cli.env |= {
            **{name: os.environ[name] for name in os.environ if name.startswith("AWS_")},
            "AWS_ENDPOINT_URL": proxy,
            "IMAGING_STORE": f"s3://{bucket}/cloud",
            **FAST_RECOVERY,
        }
        register(cli, leaf)
        store = open_object_store(f"s3://{bucket}/cloud", endpoint_url=moto_endpoint)

        def parts_on_s3() -> int:
            uploads = store.list_multipart_uploads("images/")
            return sum(len(store.list_parts(upload.key, upload.upload_id)) for upload in uploads)

        creator = cli.start("image", "create", "web1", "--json")
        wait_for("three parts stored", lambda: parts_on_s3() >= 3, interval=0.05)
        creator.send_signal(signal.SIGKILL)
        creator.wait(timeout=30)
        assert plan.wait_idle(30)
        before = parts_on_s3()
        killed = wait_for("the killed job", lambda: running_job(cli))
        wait_for("the job to go stale", lambda: _stale(cli, killed.id), timeout=30, interval=0.2)
        plan.forwarded_parts.clear()

        resumed = cli.run("image", "create", "web1", "--json")

        assert resumed.returncode == 0, resumed.stderr
        record = json.loads(resumed.stdout)
        assert record["id"] == killed.image_id
        manifest = record["manifest"]
        sent = sum(plan.forwarded_parts.values())
        assert sent == manifest["part_count"] - before, (sent, manifest["part_count"], before)
        assert sum(part["kept"] for part in manifest["parts"]) == before
        assert image_raw(cli.root, store.get(f"images/{killed.image_id}/image.vhd.zst"), "s3") == expected
        assert store.list_multipart_uploads() == []
        assert list(store.list_objects("staging/")) == []
        listed = json.loads(cli.run("image", "list", "--json").stdout)
        assert [item["id"] for item in listed] == [killed.image_id]


# --- cancel ---------------------------------------------------------------------------------------------------------
def test_image_cancel_stops_a_running_job_through_its_failure_path(cli: Cli) -> None:
    register(cli, build_slow_chain(cli.root / "srv" / "web1"))
    creator = cli.start("image", "create", "web1", "--json")
    job = wait_for("the job to upload", lambda: running_job(cli))

    cancelled = cli.run("image", "cancel", job.image_id, "--json")

    assert cancelled.returncode == 0, cancelled.stderr
    outcome = json.loads(cancelled.stdout)
    assert outcome == {
        "image_id": job.image_id,
        "job_id": job.id,
        "status": "ERROR",
        "error_code": "CANCELLED",
        "requested": True,
        "stopped_by": "runner",
        "cancelled": True,
    }
    _out, err = creator.communicate(timeout=60)
    assert creator.returncode == 1 and "CANCELLED" in err and "Traceback" not in err
    assert lock_holder(cli) is None
    assert_nothing_left(cli.store)
    again = cli.run("image", "cancel", job.image_id)
    assert again.returncode == 1 and "no running job" in again.stderr


def test_image_cancel_of_a_job_whose_runner_died_runs_its_failure_path_itself(cli: Cli) -> None:
    cli.env |= FAST_RECOVERY
    job = killed_mid_upload(cli)

    cancelled = cli.run("image", "cancel", job.image_id, "--json")

    assert cancelled.returncode == 0, cancelled.stderr
    outcome = json.loads(cancelled.stdout)
    assert (outcome["error_code"], outcome["stopped_by"]) == ("CANCELLED", "canceller")
    assert lock_holder(cli) is None
    assert_nothing_left(cli.store, killed=True)


# --- Ctrl-C in a terminal -------------------------------------------------------------------------------------------
def test_ctrl_c_on_image_create_wait_cancels_the_job_and_returns_within_two_seconds(cli: Cli) -> None:
    register(cli, build_slow_chain(cli.root / "srv" / "web1"))
    pid, terminal = pty.fork()
    if pid == 0:  # the child: `imaging image create --wait` on the pty, as a user's terminal runs it
        os.chdir(cli.root)
        os.execve(sys.executable, cli.argv("image", "create", "web1", "--wait"), cli.env)
    output = bytearray()
    try:

        def uploading() -> Job | None:
            _drain(terminal, output)  # the pty's buffer never fills while the bar runs
            return running_job(cli)

        job = wait_for("the job to upload", uploading)
        os.write(terminal, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
        pressed = time.monotonic()
        status = wait_for("the command to exit", lambda: _exited(pid, terminal, output), timeout=10, interval=0.01)
        took = time.monotonic() - pressed
    finally:
        _reap(pid)
    text = output.decode(errors="replace")
    assert took < 2.0, text
    assert os.waitstatus_to_exitcode(status) == 130, text
    assert "Traceback" not in text and "Aborted" not in text
    assert f"job {job.id}" in text
    listed = cli.run("image", "list", "--json")  # ends it if it was still stopping when the command exited
    assert listed.returncode == 0, listed.stderr
    ended = job_of(cli, job.id)
    assert (ended.status, ended.error_code) == (Status.ERROR, "CANCELLED")
    assert lock_holder(cli) is None
    assert_nothing_left(cli.store)


def _drain(terminal: int, output: bytearray) -> None:
    while select.select([terminal], [], [], 0)[0]:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:
            return
        if not chunk:
            return
        output += chunk


def _exited(pid: int, terminal: int, output: bytearray) -> int | None:
    _drain(terminal, output)
    done, status = os.waitpid(pid, os.WNOHANG)
    return status if done == pid else None


def _reap(pid: int) -> None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# --- where things live ----------------------------------------------------------------------------------------------
def test_imaging_a_registered_server_keeps_its_disks_beside_its_chain_and_leaves_nothing_behind(cli: Cli) -> None:
    leaf = build_slow_chain(cli.root / "srv" / "web2")
    register(cli, leaf, "web2")
    cli.env["IMAGING_OBJECT_LAYOUT"] = "auto"

    created = cli.run("image", "create", "web2", "--json")

    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    new_leaf = Path(record["server_disk"])
    assert new_leaf.parent == leaf.parent and new_leaf.is_file()
    assert vhdcore.open_chain(str(new_leaf)).layers[1].path == str(leaf)
    shown = json.loads(cli.run("server", "show", "web2", "--json").stdout)
    assert shown["disk"] == str(new_leaf)
    assert not (cli.store / "sr").exists(), "no disk of the server moved into the data directory"
    summary = cli.run("image", "create", "web2")
    assert summary.returncode == 0, summary.stderr
    assert "server disk:" in summary.stdout and str(leaf.parent) in summary.stdout
    assert_nothing_left(cli.store)

    for image_id in (record["id"], *[item["id"] for item in json.loads(cli.run("image", "list", "--json").stdout)]):
        cli.run("image", "delete", image_id)
    assert json.loads(cli.run("image", "list", "--json").stdout) == []
    assert not (cli.store / "images").exists(), "deleting the images leaves no empty folder"
    assert_nothing_left(cli.store)


def test_an_image_of_a_dead_job_can_be_deleted_once_recovered(cli: Cli) -> None:
    cli.env |= FAST_RECOVERY
    job = killed_mid_upload(cli)
    wait_for("the job to go stale", lambda: _stale(cli, job.id), timeout=30, interval=0.2)

    deleted = cli.run("image", "delete", job.image_id, "--json")

    assert deleted.returncode == 0, deleted.stderr
    assert (job_of(cli, job.id).status, job_of(cli, job.id).error_code) == (Status.ERROR, "INTERRUPTED")
    state = cli.state()
    try:
        with pytest.raises(NotFoundError):
            state.get_image(job.image_id)
    finally:
        state.close()
    assert lock_holder(cli) is None
    assert_nothing_left(cli.store, killed=True)
