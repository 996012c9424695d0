"""`imaging vhd ...`: thin commands over vhdcore to inspect, check, compare, flatten, create and write VHD chains.

Each command checks its inputs (and that what it writes is not a layer in use: statemachine/cli/write_guard.py),
calls vhdcore, and hands the result to statemachine/cli/vhd_output.py; a progress bar (statemachine/cli/progress.py)
shows on stderr for the long ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

import click

import vhdcore
from functions.imaging.chain_files import sibling_files
from functions.settings import Settings
from statemachine.cli import vhd_output, vhd_usage
from statemachine.cli.common import SIZE, UserError, json_option, require_file
from statemachine.cli.output import human_size, size_with_bytes
from statemachine.cli.progress import byte_progress, export_progress, show_progress
from statemachine.cli.write_guard import check_layer_write, check_output, replacing

WRITE_CHUNK = 16 * 1024 * 1024


@click.group()
def vhd() -> None:
    """Inspect, check, compare, flatten, create and write VHD chains (fixed, dynamic, differencing).

    A chain is named by its leaf file; parents are found from it (by name and locators, checked by UUID).
    Sizes accept binary units: 1048576, 512M, 10G.
    """


@vhd.command()
@click.argument("path")
@json_option
def info(path: str, as_json: bool) -> None:
    """Show a disk and its whole chain: type, sizes, blocks, UUIDs, parents, warnings."""
    require_file(path)
    vhd_output.show_info(vhdcore.open_chain(path), as_json)


@vhd.command()
@click.argument("path")
@json_option
def check(path: str, as_json: bool) -> None:
    """Validate the whole chain of PATH and list every problem found (exit code 1 if there is any)."""
    require_file(path)
    problems = vhdcore.check(path)
    vhd_output.show_problems(path, problems, as_json)
    if problems:
        count = len(problems)
        raise UserError(f"{count} problem{'s' if count != 1 else ''} found in the chain of {path}")


@vhd.command(name="map")
@click.argument("path")
@json_option
def map_(path: str, as_json: bool) -> None:
    """Print the extents of the flattened disk: start, length, and the layer holding them (or zero)."""
    require_file(path)
    chain = vhdcore.open_chain(path)
    vhd_output.show_map(chain, chain.map(), as_json)


@vhd.command(name="diff")
@click.argument("old")
@click.argument("new")
@json_option
def diff_(old: str, new: str, as_json: bool) -> None:
    """Print the byte ranges (sector granularity) where the flattened contents of OLD and NEW differ, and the total.

    Base layers that both chains share are skipped without reading. Exit code (as `qemu-img compare`): 0 when the
    contents are identical, 1 when they differ (the same with --json), 1 with an `error:` line for a bad input.
    """
    require_file(old)
    require_file(new)
    result = vhdcore.diff(old, new)
    vhd_output.show_diff(old, new, result, as_json)
    if result.ranges:
        raise SystemExit(1)  # the chains differ (as `qemu-img compare`)


def check_chunk_size(chain: vhdcore.Chain, chunk_size: int) -> None:
    """Refuse a `--chunk-size` that is not a whole number of blocks: of the image's blocks (2 MiB) and of every
    layer's (the chunks would otherwise be silently rounded up)."""
    unit = vhdcore.DEFAULT_BLOCK_SIZE
    for layer in chain.layers:
        if layer.block_size:
            unit = math.lcm(unit, layer.block_size)
    if chunk_size <= 0 or chunk_size % unit:
        below = max(unit, chunk_size // unit * unit)
        above = (chunk_size // unit + 1) * unit
        choices = human_size(below) if below == above else f"{human_size(below)} or {human_size(above)}"
        raise UserError(
            f"--chunk-size {chunk_size} is not a multiple of the block size, {size_with_bytes(unit)}",
            hint=f"a chunk holds whole blocks: use a multiple of {human_size(unit)}, e.g. {choices}",
        )


@vhd.command()
@click.argument("path")
@click.argument("out")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["raw", "vhd", "vhd.zst"]),
    default="raw",
    show_default=True,
    help="raw: the flattened disk (sparse); vhd: a dynamic VHD with all-zero blocks left unallocated; "
    "vhd.zst: that VHD compressed as the image format (one independent zstd frame per chunk; `zstd -d` reads it).",
)
@click.option(
    "--level",
    type=click.IntRange(-7, 22),
    default=vhdcore.DEFAULT_LEVEL,
    show_default=True,
    help="zstd level (vhd.zst only).",
)
@click.option(
    "--chunk-size",
    type=SIZE,
    default=vhdcore.DEFAULT_CHUNK_SIZE,
    show_default="64M",
    help="Virtual disk bytes per compressed frame (vhd.zst only).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: when stderr is a terminal and --json is not given).",
)
@click.option(
    "--live-only",
    is_flag=True,
    help="Write the ranges the disk's filesystems prove free as zeros, as an image stores them "
    "(see `imaging vhd usage`); the rest, and anything in doubt, as it is.",
)
@json_option
def export(
    path: str,
    out: str,
    fmt: Literal["raw", "vhd", "vhd.zst"],
    level: int,
    chunk_size: int,
    force: bool,
    progress: bool | None,
    live_only: bool,
    as_json: bool,
) -> None:
    """Flatten the chain of PATH into OUT: a raw disk, a dynamic VHD, or the compressed image (vhd.zst)."""
    require_file(path)
    chain = vhdcore.open_chain(path)
    if fmt == "vhd.zst":
        check_chunk_size(chain, chunk_size)
    check_output(Path(out), force=force, settings=Settings.resolve(), reading=[Path(path)])
    show = show_progress(progress, as_json)
    usage = chain.usage() if live_only else None
    if fmt == "vhd.zst":
        compress_image(chain, path, out, level, chunk_size, show, as_json, usage=usage)
        return
    with replacing(Path(out)) as temporary, export_progress(show) as callback:
        stats = chain.export(str(temporary), format=fmt, progress=callback, usage=usage)
    vhd_output.show_export(path, out, chain, stats, as_json)


def compress_image(
    chain: vhdcore.Chain,
    path: str,
    out: str,
    level: int,
    chunk_size: int,
    show: bool,
    as_json: bool,
    *,
    usage: vhdcore.DiskUsage | None = None,
) -> None:
    """`export --format vhd.zst`: the image format of DESIGN §5, written to a local file (of the live data only with
    `usage`)."""
    with replacing(Path(out)) as temporary, export_progress(show) as callback:
        stats = chain.compress(str(temporary), level=level, chunk_size=chunk_size, progress=callback, usage=usage)
    vhd_output.show_image(path, out, chain, stats, as_json)


@vhd.command()
@click.argument("path")
@click.option(
    "--level", type=click.IntRange(-7, 22), default=vhdcore.DEFAULT_LEVEL, show_default=True, help="zstd level."
)
@click.option(
    "--chunk-size",
    type=SIZE,
    default=vhdcore.DEFAULT_CHUNK_SIZE,
    show_default="64M",
    help="Virtual disk bytes per compressed frame, as the image will be made.",
)
@json_option
def estimate(path: str, level: int, chunk_size: int, as_json: bool) -> None:
    """Predict the size of PATH's compressed image (vhd.zst) and the time to make it, before making it.

    Unallocated bytes are counted exactly from the BATs; the data is sampled (stratified 16 KiB units classed by
    content, a few per class compressed, and a correction from 4 MiB spans compressed as whole frames would be), so
    the cost does not grow with the disk beyond its metadata.
    """
    require_file(path)
    chain = vhdcore.open_chain(path)
    check_chunk_size(chain, chunk_size)
    result = chain.estimate(level=level, chunk_size=chunk_size)
    from functions.imaging.prediction import predict_cli_job

    store_url = Settings.resolve().store_url
    vhd_output.show_estimate(path, chain, result, predict_cli_job(result, store_url), store_url, as_json)


@vhd.command()
@click.argument("path")
@click.argument("size", type=SIZE)
@click.option(
    "--type",
    "disk_type",
    type=click.Choice(["dynamic", "fixed"]),
    default="dynamic",
    show_default=True,
    help="dynamic: blocks allocated on first write; fixed: the whole disk preallocated.",
)
@click.option("--block-size", type=SIZE, default=None, help="Block size of a dynamic disk (default 2M).")
@json_option
def create(path: str, size: int, disk_type: Literal["dynamic", "fixed"], block_size: int | None, as_json: bool) -> None:
    """Create an empty VHD of SIZE bytes at PATH (e.g. 10G, 512M, 1048576; rounded up to 512 bytes)."""
    if block_size is not None and disk_type == "fixed":
        raise click.UsageError("--block-size applies to dynamic disks only")
    check_output(Path(path), force=True, settings=Settings.resolve())
    if Path(path).exists() or Path(path).is_symlink():
        raise UserError(f"{path}: already exists", hint="creating a disk never overwrites a file")
    layer = vhdcore.create(path, size, disk_type, block_size if block_size is not None else vhdcore.DEFAULT_BLOCK_SIZE)
    vhd_output.show_layer(layer, f"created {layer.disk_type} VHD {layer.path}", as_json)


@vhd.command()
@click.argument("path")
@click.argument("new")
@json_option
def snapshot(path: str, new: str, as_json: bool) -> None:
    """Create NEW, an empty differencing child of PATH: PATH becomes read-only, writes go to NEW."""
    require_file(path)
    check_output(Path(new), force=True, settings=Settings.resolve(), reading=[Path(path)])
    if Path(new).exists() or Path(new).is_symlink():
        raise UserError(f"{new}: already exists", hint="a snapshot never overwrites a file")
    layer = vhdcore.snapshot(path, new)
    vhd_output.show_layer(layer, f"created differencing VHD {layer.path} on top of {path}", as_json)


def source_chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(WRITE_CHUNK):
        yield chunk


def layer_children(path: str) -> list[str]:
    """The differencing children of the layer at `path` among the files of its folder (as coalesce finds them)."""
    return vhdcore.children(path, sibling_files(path))


@vhd.command()
@click.argument("path")
@click.argument("offset", type=SIZE)
@click.argument("source")
@click.option(
    "--force",
    is_flag=True,
    help="Write even into a layer that has children (their content changes with it; `vhd check` of a child then "
    "reports it). Never into a layer of a registered server's chain.",
)
@json_option
def write(path: str, offset: int, source: str, force: bool, as_json: bool) -> None:
    """Write the bytes of the file SOURCE (`-` for stdin) into the disk PATH at byte OFFSET.

    For a differencing disk the data goes into PATH itself; partial sectors are completed from the chain below.
    A layer that has children (differencing disks beside it whose parent it is) is refused without --force, and a
    layer of a registered server's chain always.
    """
    require_file(path)
    if source != "-":
        require_file(source)
    virtual_size = vhdcore.open_chain(path).virtual_size
    check_layer_write(Path(path), settings=Settings.resolve())
    children = layer_children(path)
    if children and not force:
        count = len(children)
        raise UserError(
            f"{path}: has {count} child{'ren' if count != 1 else ''} ({', '.join(children)}); "
            "writing into it would change their content",
            hint="write into the leaf instead, or pass --force to change the children too",
        )

    def past_end(end: int, written: int = 0) -> UserError:
        done = f"; {written} bytes from the start of the input were written" if written else ""
        return UserError(
            f"{path}: write ends at byte {end}, past the end of the disk ({virtual_size} bytes){done}",
            hint=f"the disk's virtual size is {size_with_bytes(virtual_size)}",
        )

    end = offset + (Path(source).stat().st_size if source != "-" else 0)
    if end > virtual_size:
        raise past_end(end)
    written = 0
    with click.open_file(source, "rb") as stream:
        for chunk in source_chunks(stream):
            if offset + written + len(chunk) > virtual_size:
                raise past_end(offset + written + len(chunk), written)
            vhdcore.write(path, offset + written, chunk)
            written += len(chunk)
    if children and written:
        vhdcore.restamp(path)  # so that `vhd check` of a child tells that its parent changed after it
    vhd_output.show_written(path, offset, written, as_json)


COALESCE_STEP_BYTES = 64 * 1024 * 1024


def chain_depth(path: str) -> int | None:
    """The chain's depth, or None while an interrupted coalesce leaves it unreadable (the next step repairs it)."""
    try:
        return vhdcore.open_chain(path).depth
    except vhdcore.CoalescePendingError:
        return None


@vhd.command()
@click.argument("path")
@click.option(
    "--budget-bytes",
    type=SIZE,
    default=None,
    help="Do one bounded slice: copy about this many bytes (at least one block), then stop; run again to resume.",
)
@click.option(
    "--budget-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Do one bounded slice of about this many seconds (at least one block), then stop; run again to resume.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: when stderr is a terminal and --json is not given).",
)
@json_option
def coalesce(
    path: str, budget_bytes: int | None, budget_seconds: float | None, progress: bool | None, as_json: bool
) -> None:
    """Merge the read-only layers of PATH's chain into their parents, so the leaf ends on a single base.

    The leaf's content never changes (only its parent pointer). A layer whose parent has another child among the
    files of PATH's folder is left alone. A journal beside the chain makes this crash-safe: a run killed at any
    point leaves the content intact, and the next run finishes the merge.
    """
    require_file(path)
    depth_before = chain_depth(path)
    siblings = sibling_files(path)
    show = show_progress(progress, as_json)
    sliced = budget_bytes is not None or budget_seconds is not None
    merges: list[vhdcore.CoalesceMerge] = []
    recovered = False
    steps = 0
    with byte_progress(show, "coalescing") as bar:
        while True:
            step = vhdcore.coalesce_step(
                path,
                siblings,
                budget_bytes=budget_bytes if sliced else COALESCE_STEP_BYTES,
                budget_seconds=budget_seconds,
            )
            steps += 1
            merges.extend(step.merges)
            if steps == 1:
                # Only the first step can find an earlier run's journal; later ones resume this run's own
                # paused merge (each step is bounded), which is no recovery.
                recovered = step.recovered
            if bar is not None and step.pending is not None:
                pending = step.pending
                bar.update(pending.bytes_copied, pending.bytes_total, vhd_output.pending_label(pending))
            if step.done or sliced:
                break
    vhd_output.show_coalesce(path, depth_before, merges, step, recovered, steps, as_json)


# `imaging vhd usage`: partitions, filesystems and what a live-data image leaves out (statemachine/cli/vhd_usage.py).
vhd.add_command(vhd_usage.usage)
