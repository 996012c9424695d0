"""How the CLI's image commands look after jobs (DESIGN §3, "Jobs outlive their runners"; issue 14 items 2 and 3):
recovery of jobs whose runner died, run by `image create|list|delete|cancel` (and `imaging serve` at its start),
the resume of an interrupted job by an `image create` of the same server or disk, Ctrl-C on `image create`, and
`follow`: waiting for the run that `image create` started, its progress shown by `progress.ProgressView`.

Ctrl-C while a job runs in this command asks the job to stop (a cancel) and gives it STOP_WAIT_S to end through
its failure path; if it has not ended by then, the job is handed over (the next command or server start finishes
it at once) and the command says how to follow it. Either way the command exits 130 within 2 s, without a
traceback; a second Ctrl-C exits at once. The process ends with `os._exit`: the engine's threads (moto's, the
Map's) are not joined, which is what hung the interpreter on Ctrl-C before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from functions.imaging.services import ImagingServices
from functions.state import Job, NotFoundError
from functions.state.models import TERMINAL_STATUSES
from statemachine.cli.progress import ProgressMode, ProgressView

if TYPE_CHECKING:
    from functions.imaging.cancel import CancelOutcome
    from functions.imaging.jobs import ImagingRequest
    from functions.imaging.recovery import Recovered
    from statemachine.engine import ExecutionResult
    from statemachine.local import LocalImaging

# The failure path and recovery (and what they import) are imported by the functions that use them: `imaging image`
# commands that never recover anything start without them.

STOP_WAIT_S = 1.5
"""How long Ctrl-C waits for the job to end through its failure path before handing it over and exiting."""
INTERRUPTED_EXIT = 130
"""128 + SIGINT, as shells report a command ended by Ctrl-C."""
RECOVERY_EVERY_S = 15.0
"""How often `imaging serve` looks for jobs whose runner died while it serves (a third of the staleness threshold
when that is shorter)."""
CANCEL_WAIT_S = 30.0
"""How long `image cancel` waits for a live runner to stop its job (it looks at every frame, part and step)."""


def exit_now(code: int, message: str | None = None) -> None:
    """Print `message` on stderr, flush, and end the process at once (no thread is joined)."""
    if message:
        with contextlib.suppress(OSError, ValueError):
            click.echo(message, err=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


@dataclass
class Interrupts:
    """Ctrl-C (SIGINT) while an `image create` runs: before its job starts, the command ends at once; once it has a
    job, the first Ctrl-C asks `follow` to stop the job (it wakes `wake`), and a second one ends the command."""

    count: int = 0
    job_id: str | None = None
    image_id: str | None = None
    wake: threading.Event = field(default_factory=threading.Event)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.job_id is None:
            exit_now(INTERRUPTED_EXIT, "interrupted: no job was started")
        if self.count > 1:
            exit_now(
                INTERRUPTED_EXIT,
                f"interrupted again: job {self.job_id} is left to recovery "
                f"(`imaging image show {self.image_id}` follows it)",
            )
        self.wake.set()


_current: Interrupts | None = None


@contextmanager
def interrupts_handled() -> Iterator[Interrupts]:
    """Ctrl-C handled as above while the block runs (on the main thread; elsewhere Python's default stays)."""
    global _current
    state = Interrupts()
    previous: Any = None
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        previous = signal.signal(signal.SIGINT, state.on_signal)
    _current = state
    try:
        yield state
    finally:
        _current = None
        if installed:
            signal.signal(signal.SIGINT, previous)


def current_interrupts() -> Interrupts | None:
    return _current


def stop_on_interrupt(
    services: ImagingServices, interrupts: Interrupts, before_exit: Callable[[], None], ended: Callable[[], bool]
) -> None:
    """The first Ctrl-C with a job running here: cancel it, wait up to STOP_WAIT_S for its failure path to end (the
    job ERROR and its execution `ended`, so no step of it is still writing), else hand it over; then exit 130 (never
    returns)."""
    from functions.imaging.cancel import mark_cancel
    from functions.imaging.recovery import hand_over

    job_id, image_id = interrupts.job_id, interrupts.image_id
    assert job_id is not None
    before_exit()
    click.echo(f"interrupted: asking job {job_id} to stop ...", err=True)
    job: Job | None
    try:
        job = mark_cancel(services, job_id)
    except NotFoundError:
        job = None  # not recorded yet: recovery fails it once its heartbeat is stale
    deadline = time.monotonic() + STOP_WAIT_S
    while job is not None and not (job.status in TERMINAL_STATUSES and ended()) and time.monotonic() < deadline:
        interrupts.wake.clear()
        interrupts.wake.wait(0.05)
        job = services.state.get_job(job_id)
    if job is not None and job.status in TERMINAL_STATUSES:
        if not ended():  # marked ERROR, its failure path maybe not done: finish it here (it is safe to repeat)
            from functions.imaging.errors import JobCancelledError
            from functions.imaging.failure import fail_job

            fail_job(services, job_id, JobCancelledError.__name__, "cancelled on request (Ctrl-C)")
        code = f" {job.error_code}" if job.error_code else ""
        exit_now(INTERRUPTED_EXIT, f"job {job_id} stopped: image {image_id} is {job.status.value}{code}")
    if job is not None:
        hand_over(services, [job_id])
    exit_now(
        INTERRUPTED_EXIT,
        f"job {job_id} is still stopping: the next `imaging image list` (or any image command) ends it as "
        f"CANCELLED; `imaging image show {image_id}` follows it",
    )


def report(recovered: list[Recovered]) -> None:
    """One line on stderr per job recovery resumed or failed (stdout is the command's result)."""
    for item in recovered:
        what = "resumed" if item.action == "resumed" else f"failed {item.code}"
        target = f"server {item.server_id}" if item.server_id else "a disk"
        click.echo(f"recovered job {item.job_id} of {target} (image {item.image_id}): its runner had stopped; {what}",
                   err=True)  # fmt: skip


def recover_without_engine(services: ImagingServices, which: Callable[[Job], bool] | None = None) -> None:
    """What a command that cannot run a job does with the jobs that lost their runner: fail them INTERRUPTED (or
    CANCELLED), lock released and staging removed, so no server stays blocked by a dead job."""
    from functions.imaging.recovery import recover_jobs

    report(recover_jobs(services, which=which))


def adoptable(services: ImagingServices, request: dict[str, Any]) -> Job | None:
    """The interrupted job that an `image create` of the same server or disk resumes instead of starting anew."""
    from functions.imaging.recovery import resumable_job_of

    server_id, disk = request.get("server_id"), request.get("disk")
    return resumable_job_of(services, server_id=str(server_id) if server_id else None, disk=str(disk) if disk else None)


def start_or_resume(
    services: ImagingServices, workflow: LocalImaging, request: dict[str, Any], adopted: Job | None
) -> str:
    """Start the execution of `request`, or resume the interrupted job `adopted` (the request then names its job
    and image); other jobs that lost their runner are failed first (this command runs only its own to the end)."""
    from functions.catalog.launch import execution_input
    from functions.imaging.recovery import recover_job, remove_orphans

    recover_without_engine(services, which=lambda job: adopted is None or job.id != adopted.id)
    remove_orphans(services)  # what runners killed during their failure path left
    interrupts = current_interrupts()
    if adopted is not None:
        started: list[str] = []

        def resume(resumed: ImagingRequest, name: str) -> None:
            if interrupts is not None:
                interrupts.job_id, interrupts.image_id = resumed.job_id, resumed.image_id
            started.append(workflow.start(execution_input(resumed), name=name))

        outcome = recover_job(services, adopted, resume=resume)
        if outcome is not None and outcome.action == "resumed" and started:
            request["job_id"], request["image_id"] = adopted.id, adopted.image_id
            click.echo(
                f"resuming job {adopted.id} (image {adopted.image_id}), interrupted at {adopted.progress}%: "
                "what it stored is kept, only what is missing is done",
                err=True,
            )
            return started[0]
        if outcome is not None:
            report([outcome])
    if interrupts is not None:
        interrupts.job_id, interrupts.image_id = str(request["job_id"]), str(request["image_id"])
    return workflow.start(request)


def cancel(services: ImagingServices, image_id: str, wait_s: float) -> CancelOutcome:
    """`image cancel`: functions.imaging.cancel.request_cancel, then the other dead jobs recovered."""
    from functions.imaging.cancel import request_cancel

    outcome = request_cancel(services, image_id, wait_s=wait_s)
    recover_without_engine(services)
    return outcome


def serve_hooks(services: ImagingServices, runner: LocalImaging) -> tuple[Callable[[], None], Callable[[], None]]:
    """`imaging serve`'s `on_start` and `on_shutdown`. At start, the jobs whose runner died (an earlier server killed
    or stopped) are resumed in this server's engine (or failed when they cannot be) and orphans removed; while it
    serves, that recovery runs again every RECOVERY_EVERY_S (a job whose runner died just before the start becomes
    stale only later). At shutdown, the jobs still running here are handed over, so the next start takes them at
    once."""
    from functions.imaging.jobs import STALE_AFTER_S

    stopping = threading.Event()
    every = min(RECOVERY_EVERY_S, STALE_AFTER_S / 3)

    def recover() -> None:
        from functions.catalog.launch import execution_input
        from functions.imaging.recovery import recover_jobs

        def resume(request: ImagingRequest, name: str) -> None:
            runner.start(execution_input(request), name=name)

        report(recover_jobs(services, resume=resume))

    def keep_recovering() -> None:
        while not stopping.wait(every):
            try:
                recover()
            except Exception as error:  # a store or state hiccup: the next round tries again
                click.echo(f"recovery failed: {error}", err=True)

    def on_start() -> None:
        from functions.imaging.recovery import remove_orphans

        recover()
        remove_orphans(services)
        threading.Thread(target=keep_recovering, name="job-recovery", daemon=True).start()

    def on_shutdown() -> None:
        from functions.imaging.recovery import hand_over

        stopping.set()
        handed = hand_over(services, runner.running_jobs())
        if handed:
            click.echo(f"handed over {len(handed)} running job(s) to the next start: {', '.join(handed)}", err=True)

    return on_start, on_shutdown


POLL_INTERVAL_S = 0.2
"""How often `follow` re-reads the job (the execution's status is polled, as Step Functions clients do)."""


def follow(
    workflow: LocalImaging, execution_arn: str, services: ImagingServices, job_id: str, mode: ProgressMode
) -> ExecutionResult:
    """Wait for the execution, showing the job's progress (step, %, bytes, ETA) on stderr as `mode` says."""
    from statemachine import engine

    interrupts = current_interrupts()
    idle = interrupts.wake if interrupts is not None else threading.Event()  # set by Ctrl-C, else paces polling
    view = ProgressView(mode, job_id)
    try:
        while True:
            if interrupts is not None and interrupts.count:
                stop_on_interrupt(
                    services,
                    interrupts,
                    view.close,
                    lambda: workflow.status(execution_arn) in engine.TERMINAL_EXECUTION_STATUSES,
                )
            status = workflow.status(execution_arn)
            try:
                job = services.state.get_job(job_id)
            except NotFoundError:
                job = None
            if job is not None:
                view.update(job)
            if status in engine.TERMINAL_EXECUTION_STATUSES:
                break
            idle.wait(POLL_INTERVAL_S)
    finally:
        view.close()
    return workflow.wait(execution_arn)
