"""Progress on stderr (never stdout: it carries the result), shown only where someone watches or asked for it.

- `ByteProgress` / `byte_progress`: a rich bar of bytes, speed and ETA, for the work done in this process
  (`vhd export`, `vhd coalesce`, `image export`, `image restore`).
- `ProgressView`: a running image job's progress (step, 0/25/50/100 %, bytes, ETA), as a live bar on a terminal,
  one final line otherwise, or JSON lines (`image create --progress jsonl`); `jobs.follow` feeds it.

rich is imported when a bar is shown, and nothing here imports the domain: `imaging vhd ...` starts without either.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import click

from statemachine.cli.output import human_size

if TYPE_CHECKING:
    from functions.imaging.images import Progress
    from functions.state import Job


def show_progress(progress: bool | None, as_json: bool) -> bool:
    """`--progress/--no-progress` as given, else a bar when stderr is a terminal and --json is not given."""
    return progress if progress is not None else (sys.stderr.isatty() and not as_json)


ProgressUpdate = Callable[[int, int], None]


class ByteProgress:
    """A rich progress bar on stderr (bytes, speed, ETA) whose label can change as the work moves on."""

    def __init__(self, label: str) -> None:
        # Imported here: rich is only needed for the bar, and the other commands start faster without it.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task(label, total=None)

    def update(self, done: int, total: int, label: str | None = None) -> None:
        if label is not None:
            self.bar.update(self.task, description=label)
        self.bar.update(self.task, completed=done, total=total)


@contextmanager
def byte_progress(enabled: bool, label: str) -> Iterator[ByteProgress | None]:
    """A [`ByteProgress`] shown while the block runs, or None when disabled."""
    if not enabled:
        yield None
        return
    progress = ByteProgress(label)
    with progress.bar:
        yield progress


@contextmanager
def export_progress(enabled: bool) -> Iterator[ProgressUpdate | None]:
    """vhdcore's export callback feeding a progress bar, or no callback at all."""
    with byte_progress(enabled, "exporting") as progress:
        yield None if progress is None else progress.update


@contextmanager
def image_progress(wanted: bool) -> Iterator[Progress | None]:
    """A byte progress bar on stderr when `wanted` and stderr is a terminal (else None): told (what, done, total)."""
    if not (wanted and sys.stderr.isatty()):
        yield None
        return
    with byte_progress(True, "reading") as bar:
        yield None if bar is None else (lambda label, done, total: bar.update(done, total, label))


# --- a job's progress -------------------------------------------------------------------------------------------------
ProgressMode = Literal["bar", "jsonl", "none"]
STEP_SPAN: dict[str, int] = {"QUEUED": 25, "SAVING": 25, "UPLOADING": 50, "ACTIVE": 0, "ERROR": 0}
"""Percent of the bar each step (a job's status) covers after its own start (0, 25, 50, 100)."""


def overall_percent(job: Job) -> float:
    """0/25/50/100 at step boundaries, and the step's own bytes done in between."""
    base = float(job.progress)
    if job.bytes_total:
        base += STEP_SPAN[job.status] * job.bytes_done / job.bytes_total
    return min(100.0, base)


def eta_text(job: Job) -> str:
    if job.eta_seconds is None:
        return "ETA --"
    seconds = int(job.eta_seconds + 0.5)
    return f"ETA {seconds // 60}:{seconds % 60:02d}"


def bytes_text(job: Job) -> str:
    if not job.bytes_total:
        return ""
    return f"{human_size(job.bytes_done)}/{human_size(job.bytes_total)}"


class ProgressView:
    """How a running job's progress is shown on stderr (never stdout: it carries the result).

    "bar": a live rich bar (step, %, bytes, ETA) when stderr is a terminal, else one line with the final state;
    "jsonl": one JSON object per change ({"job_id", "status", "percent", "bytes_done", "bytes_total",
    "eta_seconds"}), for scripts; "none": nothing.
    """

    def __init__(self, mode: ProgressMode, job_id: str) -> None:
        self.mode = mode
        self.job_id = job_id
        self.last: Job | None = None
        self._last_line: tuple[Any, ...] | None = None
        self._bar: Any = None
        self._task: Any = None
        if mode == "bar" and sys.stderr.isatty():
            # rich only for a bar someone watches: imported here, it costs the other commands nothing.
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self._bar = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[bytes]}"),
                TextColumn("{task.fields[eta]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("QUEUED", total=100, bytes="", eta="ETA --")

    def update(self, job: Job) -> None:
        self.last = job
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=overall_percent(job),
                description=job.status.value,
                bytes=bytes_text(job),
                eta=eta_text(job),
            )
        elif self.mode == "jsonl":
            line = (job.status.value, int(overall_percent(job)), job.bytes_done, job.bytes_total)
            if line != self._last_line:
                self._last_line = line
                record = {
                    "job_id": self.job_id,
                    "status": job.status.value,
                    "percent": round(overall_percent(job), 1),
                    "bytes_done": job.bytes_done,
                    "bytes_total": job.bytes_total,
                    "eta_seconds": job.eta_seconds,
                }
                click.echo(json.dumps(record), err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.mode == "bar" and self.last is not None:
            job = self.last
            click.echo(f"{job.status.value} {overall_percent(job):.0f}% {bytes_text(job)}".rstrip(), err=True)
