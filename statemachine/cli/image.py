"""`imaging image create|list|show|delete|cancel|verify|export`: images of servers or disks, made by the imaging
workflow (statemachine/imaging.asl.json) on the embedded engine in this process.

The embedded engine (and with it moto, boto3 and Powertools) is imported by `image create` only, when it runs one.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import click

from functions.imaging import head_start
from functions.imaging.errors import ImageCorruptError
from functions.imaging.images import (
    ExportFormat,
    delete_image,
    export_image,
    export_image_to,
    load_manifest,
    verify_image,
)
from functions.imaging.services import ImagingServices
from functions.settings import Settings
from functions.state import NotFoundError, Status
from functions.state.models import TERMINAL_STATUSES
from statemachine.cli import image_output, jobs
from statemachine.cli.common import UserError, json_option
from statemachine.cli.output import human_size, print_fields, print_json
from statemachine.cli.progress import ProgressMode, image_progress
from statemachine.cli.server import DEFAULT_TENANT
from statemachine.cli.services import disk_argument, embedded_workflow, location_options, opened


@click.group()
def image() -> None:
    """Create images of servers (or of a disk chain) and manage them."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@image.command()
@click.argument("server_id", metavar="SERVER", required=False)
@click.option("--disk", "leaf", help="Image this leaf's chain as it is (read-only), instead of a registered server.")
@click.option("--name", help="A name for the image (default: from the server or disk).")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True)
@click.option(
    "--wait",
    "live",
    is_flag=True,
    help="Show progress on stderr: a live bar (step, %, bytes, ETA) on a terminal, else the final state's line.",
)
@click.option(
    "--progress",
    "progress",
    type=click.Choice(["bar", "jsonl"]),
    help="How to show progress (implies --wait): bar, or jsonl: one JSON object per change on stderr "
    '{"job_id", "status", "percent", "bytes_done", "bytes_total", "eta_seconds"}.',
)
@click.option(
    "--all-blocks",
    is_flag=True,
    help="Image every block. By default the ranges the disk's filesystems prove free (ext2/3/4, XFS, NTFS, swap) "
    "are stored as zeros; anything in doubt is kept (see `imaging vhd usage`).",
)
@location_options
@json_option
def create(
    server_id: str | None,
    leaf: str | None,
    name: str | None,
    tenant: str,
    live: bool,
    progress: Literal["bar", "jsonl"] | None,
    all_blocks: bool,
    settings: Settings,
    as_json: bool,
) -> None:
    """Image SERVER (or --disk LEAF): coalesce, snapshot, compress, upload, verify.

    The embedded engine runs in this command, so it returns when the image is ACTIVE or has failed. With --json,
    stdout holds the image record (with the object's URL and the manifest) and `server_disk`, the server's active
    disk after its snapshot (a new leaf beside its chain); progress and logs go to stderr.

    If the last job of SERVER (or of LEAF) was interrupted (its process killed), that job is resumed, with its image
    id, keeping the frames and parts it had stored. Ctrl-C cancels the job and exits 130 (a second Ctrl-C at once).
    """
    if (server_id is None) == (leaf is None):
        raise click.UsageError("name a SERVER or give --disk LEAF (exactly one)")
    mode: ProgressMode = progress or ("bar" if live else "none")
    job_id, image_id = new_id("job"), new_id("img")
    request: dict[str, Any] = {
        "job_id": job_id,
        "image_id": image_id,
        "tenant": tenant,
        "name": name or server_id or Path(leaf or "disk").name,
    }
    if server_id is not None:
        request["server_id"] = server_id
    if all_blocks:
        request["all_blocks"] = True
    with opened(settings) as services, jobs.interrupts_handled():
        if leaf is not None:
            request["disk"] = disk_argument(services.disk_store, leaf)
        adopted = jobs.adoptable(services, request)  # an interrupted job of this server or disk: resumed
        if adopted is None:
            _start_ahead(services, request)
        try:
            with embedded_workflow(services) as workflow:
                execution = jobs.start_or_resume(services, workflow, request, adopted)
                job_id, image_id = str(request["job_id"]), str(request["image_id"])
                result = jobs.follow(workflow, execution, services, job_id, mode)
        finally:
            head_start.end(services)
        record = services.state.get_image(image_id) if _exists(services, image_id) else None
        if not result.succeeded or record is None or record.status is not Status.ACTIVE:
            job = services.state.get_job(job_id) if _job_exists(services, job_id) else None
            detail = job.history[-1].detail if job is not None and job.history else None
            raise UserError(
                f"image {image_id} failed: {result.error or 'unknown error'}" + (f" ({detail})" if detail else ""),
                hint=result.cause,
            )
        manifest = load_manifest(services, image_id)
        server_disk = services.state.get_server(record.server_id).disk if record.server_id is not None else None
    image_output.show_created(record, manifest, server_disk, as_json)


def _start_ahead(services: ImagingServices, request: dict[str, Any]) -> None:
    """Estimate (and where the image is written in place, compress) the chain now, on the core the engine's imports
    leave idle; the job's steps take that work if it is exactly theirs (functions.imaging.head_start)."""
    disk = request.get("disk")
    all_blocks = bool(request.get("all_blocks", False))
    if disk is None:
        try:
            server = services.state.get_server(str(request["server_id"]))
        except NotFoundError:
            return  # the workflow's Prepare says so, with its code and hint
        disk, all_blocks = server.disk, all_blocks or server.all_blocks
    head_start.begin(services, str(request["job_id"]), str(disk), all_blocks=all_blocks)


def _exists(services: ImagingServices, image_id: str) -> bool:
    try:
        services.state.get_image(image_id)
    except NotFoundError:
        return False
    return True


def _job_exists(services: ImagingServices, job_id: str) -> bool:
    try:
        services.state.get_job(job_id)
    except NotFoundError:
        return False
    return True


@image.command(name="list")
@click.option("--server", "server_id", help="Only this server's images.")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True)
@location_options
@json_option
def list_images(server_id: str | None, tenant: str, settings: Settings, as_json: bool) -> None:
    """List images, oldest first (jobs whose runner died are failed INTERRUPTED first: see `image cancel`)."""
    with opened(settings) as services:
        jobs.recover_without_engine(services)
        if server_id is not None:
            images = services.state.list_images(server_id=server_id)
        else:
            images = services.state.list_images(tenant=tenant)
    image_output.show_images(images, as_json)


@image.command()
@click.argument("image_id", metavar="ID")
@location_options
@json_option
def show(image_id: str, settings: Settings, as_json: bool) -> None:
    """Show an image and its job: status, progress, bytes, ETA, error code and hint."""
    with opened(settings) as services:
        record = services.state.get_image(image_id)
        job = services.state.get_job(record.job_id) if record.job_id and _job_exists(services, record.job_id) else None
    image_output.show_image(record, job, as_json)
    if not as_json:
        from statemachine.cli.vhd_usage import live_data_lines

        for line in live_data_lines(record.manifest):
            click.echo(line)


@image.command()
@click.argument("image_id", metavar="ID")
@location_options
@json_option
def delete(image_id: str, settings: Settings, as_json: bool) -> None:
    """Delete a finished image: its object, manifest and record."""
    with opened(settings) as services:
        jobs.recover_without_engine(services, which=lambda job: job.image_id == image_id)  # a dead job's image
        record = delete_image(services, image_id)
    if as_json:
        print_json({"deleted": record.id})
        return
    click.echo(f"deleted image {record.id}")


@image.command()
@click.argument("image_id", metavar="ID")
@click.option(
    "--wait-seconds",
    type=click.FloatRange(0, 3600),
    default=jobs.CANCEL_WAIT_S,
    show_default=True,
    help="How long to wait for a running job to stop.",
)
@location_options
@json_option
def cancel(image_id: str, wait_seconds: float, settings: Settings, as_json: bool) -> None:
    """Stop the job making image ID: the job ends ERROR CANCELLED, its upload aborted, its staging removed and its
    server's lock released.

    A job whose runner is alive (an `image create` or `imaging serve` running it) stops at its next frame, part or
    step; a job whose runner died is stopped here. Exit code 1 if the image had already ended.
    """
    with opened(settings) as services:
        outcome = jobs.cancel(services, image_id, wait_seconds)
    if not outcome.requested:
        raise UserError(
            f"image {image_id} is {outcome.status.value}: there is no running job to cancel",
            hint="an image that ended is deleted with `imaging image delete`",
        )
    if as_json:
        print_json(outcome.to_json())
    elif outcome.cancelled:
        by = "by its runner" if outcome.stopped_by == "runner" else "here (its runner had stopped)"
        click.echo(f"cancelled job {outcome.job_id} of image {image_id}: ERROR CANCELLED, stopped {by}")
    elif outcome.status in TERMINAL_STATUSES:
        click.echo(f"job {outcome.job_id} of image {image_id} ended {outcome.status.value} before it stopped")
    else:
        click.echo(
            f"asked job {outcome.job_id} of image {image_id} to stop; it is still {outcome.status.value}: it stops at "
            f"its next step (`imaging image show {image_id}` follows it)"
        )


@image.command()
@click.argument("image_id", metavar="ID")
@location_options
@json_option
def verify(image_id: str, settings: Settings, as_json: bool) -> None:
    """Re-read the stored image and check every part and frame checksum and each chunk's disk content against the
    manifest (and so its content hash)."""
    with opened(settings) as services:
        report = verify_image(services, image_id)
    if as_json:
        print_json(report.to_json())
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        verdict = "OK" if report.ok else "CORRUPT"
        click.echo(
            f"image {image_id}: {verdict} ({report.parts_checked} parts, {report.frames_checked} frames, "
            f"content sha256 {report.content_sha256 or '-'})"
        )
    if not report.ok:
        raise SystemExit(1)


@image.command()
@click.argument("image_id", metavar="ID")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(get_args(ExportFormat)),
    default="vhd.zst",
    show_default=True,
    help="vhd.zst: as stored; vhd: decompressed dynamic VHD; raw: the flattened disk.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never a layer of a registered server's chain).")
@location_options
@json_option
def export(image_id: str, out: Path, fmt: ExportFormat, force: bool, settings: Settings, as_json: bool) -> None:
    """Write image ID to OUT (`-`: to stdout, in order, for a pipe), with a progress bar when stderr is a terminal.

    A damaged image (a frame that fails its checksum or does not decompress) ends in one error naming the frame and
    its offset in the object, and leaves no OUT behind."""
    if str(out) == "-":
        _export_to_stdout(image_id, fmt, settings, as_json)
        return
    from statemachine.cli.write_guard import check_output

    check_output(out, force=force, settings=settings)
    with opened(settings) as services, image_progress(not as_json) as progress, _corrupt_image_hint(image_id):
        written = export_image(services, image_id, out, fmt, progress)
    if as_json:
        print_json({"image_id": image_id, "out": str(out), "format": fmt, "bytes": written})
        return
    click.echo(f"exported image {image_id} to {out} ({fmt}, {human_size(written)})")


def _export_to_stdout(image_id: str, fmt: ExportFormat, settings: Settings, as_json: bool) -> None:
    """`image export ID -`: the image in order on stdout (every format is written front to back, none seeks)."""
    if as_json:
        raise click.UsageError("--json cannot be used with - as OUT: stdout carries the image")
    if sys.stdout.isatty():
        raise UserError("refusing to write a disk image to a terminal", hint="redirect stdout to a file or a pipe")
    with opened(settings) as services, image_progress(True) as progress, _corrupt_image_hint(image_id):
        export_image_to(services, image_id, sys.stdout.buffer, fmt, progress)
        sys.stdout.buffer.flush()


@contextmanager
def _corrupt_image_hint(image_id: str) -> Iterator[None]:
    """A damaged image as one error line, with the command that lists all its damage."""
    try:
        yield
    except ImageCorruptError as error:
        raise UserError(
            f"{error.code}: {error}", hint=f"run `imaging image verify {image_id}` to list every problem"
        ) from error


@image.command()
@click.argument("image_id", metavar="ID")
@click.option(
    "--server", "server_id", metavar="NAME", required=True, help="The new server's name (it must not exist yet)."
)
@click.option(
    "--disk",
    "disk",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the server's disk (must not exist). Default: sr/NAME/<uuid>.vhd in the file store.",
)
@click.option("--tenant", help="The new server's tenant (default: the image's; an image of another is not found).")
@click.option("--flavor", default="standard", show_default=True, help="The new server's flavor.")
@location_options
@json_option
def restore(
    image_id: str,
    server_id: str,
    disk: Path | None,
    tenant: str | None,
    flavor: str,
    settings: Settings,
    as_json: bool,
) -> None:
    """Make a new server NAME (--server) whose disk is image ID: a dynamic VHD, checked against the image's content
    hash before the server is registered. A progress bar shows on stderr when it is a terminal."""
    from functions.imaging.restore import restore_image
    from statemachine.cli.write_guard import check_output

    if disk is not None:  # a layer of a chain in use, or not a regular file; restore refuses any existing file itself
        check_output(disk, force=True, settings=settings)
    with opened(settings) as services, image_progress(not as_json) as progress, _corrupt_image_hint(image_id):
        restored = restore_image(
            services, image_id, server_id, disk=disk, tenant=tenant, flavor=flavor, progress=progress
        )
    if as_json:
        print_json(restored.to_json())
        return
    print_fields(
        [
            ("server", restored.server.id),
            ("tenant", restored.server.tenant),
            ("disk", restored.disk),
            ("image", restored.image_id),
            ("virtual size", human_size(restored.virtual_size)),
            ("content sha256", f"{restored.content_sha256} (verified)"),
        ]
    )
