"""`imaging vhd ...`: thin commands over vhdcore to inspect, check, compare, flatten, create and write VHD chains."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import click

import vhdcore
from functions.imaging.chain_files import sibling_files
from functions.settings import Settings
from statemachine.cli import vhd_usage
from statemachine.cli.common import (
    SIZE,
    UserError,
    human_size,
    json_option,
    print_fields,
    print_json,
    print_table,
    require_file,
    size_with_bytes,
)
from statemachine.cli.write_guard import check_layer_write, check_output, replacing

WRITE_CHUNK = 16 * 1024 * 1024


@click.group()
def vhd() -> None:
    """Inspect, check, compare, flatten, create and write VHD chains (fixed, dynamic, differencing).

    A chain is named by its leaf file; parents are found from it (by name and locators, checked by UUID).
    Sizes accept binary units: 1048576, 512M, 10G.
    """


def block_size_text(layer: vhdcore.Layer) -> str:
    return size_with_bytes(layer.block_size) if layer.block_size else "none (fixed disk)"


def allocated_text(layer: vhdcore.Layer) -> str:
    if layer.disk_type == "fixed":
        return "all (fixed disk)"
    return f"{layer.allocated_blocks} of {layer.max_table_entries}"


def parent_dict(chain: vhdcore.Chain) -> dict[str, Any] | None:
    leaf = chain.leaf
    if leaf.parent_uuid is None:
        return None
    return {
        "uuid": leaf.parent_uuid,
        "name": leaf.parent_name,
        "path": chain.layers[1].path if chain.depth > 1 else None,
    }


@vhd.command()
@click.argument("path")
@json_option
def info(path: str, as_json: bool) -> None:
    """Show a disk and its whole chain: type, sizes, blocks, UUIDs, parents, warnings."""
    require_file(path)
    chain = vhdcore.open_chain(path)
    leaf = chain.leaf
    parent = parent_dict(chain)
    if as_json:
        print_json(
            {
                "path": leaf.path,
                "type": leaf.disk_type,
                "virtual_size": chain.virtual_size,
                "file_size": leaf.file_size,
                "block_size": leaf.block_size,
                "allocated_blocks": leaf.allocated_blocks,
                "max_table_entries": leaf.max_table_entries,
                "uuid": leaf.uuid,
                "parent": parent,
                "depth": chain.depth,
                "chain": [layer.to_dict() for layer in chain.layers],
                "warnings": list(chain.warnings),
            }
        )
        return
    parent_text = "none"
    if parent is not None:
        parent_text = f"{parent['path'] or parent['name']} (uuid {parent['uuid']})"
    print_fields(
        [
            ("path", leaf.path),
            ("type", leaf.disk_type),
            ("virtual size", size_with_bytes(chain.virtual_size)),
            ("file size", size_with_bytes(leaf.file_size)),
            ("block size", block_size_text(leaf)),
            ("allocated blocks", allocated_text(leaf)),
            ("uuid", leaf.uuid),
            ("parent", parent_text),
            ("chain", f"{chain.depth} layer{'s' if chain.depth != 1 else ''}, leaf first"),
        ]
    )
    rows = [
        [
            str(i),
            layer.disk_type,
            human_size(layer.file_size),
            "-" if layer.disk_type == "fixed" else f"{layer.allocated_blocks}/{layer.max_table_entries}",
            layer.uuid,
            layer.path,
        ]
        for i, layer in enumerate(chain.layers)
    ]
    click.echo()
    print_table(["#", "type", "file size", "blocks", "uuid", "path"], rows, right=[0, 2, 3])
    if chain.warnings:
        click.echo("\nwarnings:")
        for warning in chain.warnings:
            click.echo(f"  - {warning}")


def problem_dict(problem: vhdcore.Problem) -> dict[str, Any]:
    return {
        "kind": problem.kind,
        "path": problem.path,
        "field": problem.field,
        "offset": problem.offset,
        "message": problem.message,
    }


@vhd.command()
@click.argument("path")
@json_option
def check(path: str, as_json: bool) -> None:
    """Validate the whole chain of PATH and list every problem found (exit code 1 if there is any)."""
    require_file(path)
    problems = vhdcore.check(path)
    if as_json:
        print_json({"path": path, "ok": not problems, "problems": [problem_dict(p) for p in problems]})
    elif not problems:
        click.echo(f"ok: {path}: no problems found in the chain")
    else:
        for problem in problems:
            click.echo(f"{problem.kind}: {problem.message}")
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
    extents = chain.map()
    paths = [layer.path for layer in chain.layers]
    if as_json:
        print_json(
            {
                "path": chain.leaf.path,
                "virtual_size": chain.virtual_size,
                "layers": paths,
                "extents": [
                    {
                        "start": e.start,
                        "length": e.length,
                        "layer": e.layer,
                        "path": None if e.layer is None else paths[e.layer],
                    }
                    for e in extents
                ],
            }
        )
        return
    rows = [
        [
            str(e.start),
            str(e.length),
            human_size(e.length),
            "zero" if e.layer is None else f"[{e.layer}] {paths[e.layer]}",
        ]
        for e in extents
    ]
    print_table(["start", "length", "", "source"], rows, right=[0, 1, 2])
    totals: dict[int | None, int] = defaultdict(int)
    for e in extents:
        totals[e.layer] += e.length
    click.echo(f"\n{len(extents)} extents over {size_with_bytes(chain.virtual_size)}:")
    for index in [*range(len(paths)), None]:
        if index in totals:
            name = "zero" if index is None else f"[{index}] {paths[index]}"
            click.echo(f"  {name}: {size_with_bytes(totals[index])}")


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
    if as_json:
        print_json(
            {
                "old": old,
                "new": new,
                "ranges": [{"start": start, "length": length} for start, length in result.ranges],
                "total": result.total,
                "shared_layers": result.shared_layers,
            }
        )
        raise SystemExit(1 if result.ranges else 0)
    if result.ranges:
        rows = [[str(start), str(length), human_size(length)] for start, length in result.ranges]
        print_table(["start", "length", ""], rows, right=[0, 1, 2])
        click.echo()
    count = len(result.ranges)
    shared = f"{result.shared_layers} shared base layer{'s' if result.shared_layers != 1 else ''} skipped"
    if count == 0:
        click.echo(f"identical: no differing bytes ({shared})")
    else:
        click.echo(f"total: {size_with_bytes(result.total)} in {count} range{'s' if count != 1 else ''} ({shared})")
        raise SystemExit(1)


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


@contextmanager
def export_progress(enabled: bool) -> Iterator[ProgressUpdate | None]:
    """vhdcore's export callback feeding a progress bar, or no callback at all."""
    with byte_progress(enabled, "exporting") as progress:
        yield None if progress is None else progress.update


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
    show = progress if progress is not None else (sys.stderr.isatty() and not as_json)
    usage = chain.usage() if live_only else None
    if fmt == "vhd.zst":
        compress_image(chain, path, out, level, chunk_size, show, as_json, usage=usage)
        return
    with replacing(Path(out)) as temporary, export_progress(show) as callback:
        stats = chain.export(str(temporary), format=fmt, progress=callback, usage=usage)
    seconds = stats.seconds
    speed = f"{human_size(int(stats.virtual_size / seconds))}/s" if seconds > 0 else "-"
    if as_json:
        print_json(
            {
                "path": path,
                "out": out,
                "format": stats.format,
                "depth": chain.depth,
                "virtual_size": stats.virtual_size,
                "bytes_written": stats.bytes_written,
                "data_bytes": stats.data_bytes,
                "zero_bytes": stats.zero_bytes,
                "seconds": seconds,
            }
        )
        return
    click.echo(f"exported {path} (chain of {chain.depth}) to {out} as {stats.format}")
    print_fields(
        [
            ("virtual size", size_with_bytes(stats.virtual_size)),
            ("written", size_with_bytes(stats.bytes_written)),
            ("data", size_with_bytes(stats.data_bytes)),
            ("zeros", size_with_bytes(stats.zero_bytes)),
            ("time", f"{seconds:.3f} s ({speed} of virtual disk)"),
        ]
    )


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
    seconds = stats.seconds
    ratio = stats.compressed_bytes / stats.virtual_size if stats.virtual_size else 0.0
    if as_json:
        print_json(
            {
                "path": path,
                "out": out,
                "format": "vhd.zst",
                "depth": chain.depth,
                "level": stats.level,
                "virtual_size": stats.virtual_size,
                "image_bytes": stats.image_bytes,
                "compressed_bytes": stats.compressed_bytes,
                "data_bytes": stats.data_bytes,
                "read_bytes": stats.read_bytes,
                "seconds": seconds,
                "chunks": [
                    {
                        "index": c.index,
                        "virtual_bytes": c.virtual_bytes,
                        "logical_bytes": c.logical_bytes,
                        "compressed_bytes": c.compressed_bytes,
                        "object_offset": c.object_offset,
                        "sha256": c.sha256,
                        "crc32c": c.crc32c,
                    }
                    for c in [stats.head, *stats.chunks]
                ],
            }
        )
        return
    speed = f"{human_size(int(stats.virtual_size / seconds))}/s" if seconds > 0 else "-"
    click.echo(f"compressed {path} (chain of {chain.depth}) to {out} as vhd.zst (zstd level {stats.level})")
    print_fields(
        [
            ("virtual size", size_with_bytes(stats.virtual_size)),
            ("data", size_with_bytes(stats.data_bytes)),
            ("image (vhd)", size_with_bytes(stats.image_bytes)),
            ("compressed", f"{size_with_bytes(stats.compressed_bytes)}, {ratio:.1%} of the virtual size"),
            ("frames", f"{len(stats.chunks) + 1} (head + {len(stats.chunks)} chunks)"),
            ("time", f"{seconds:.3f} s ({speed} of virtual disk)"),
        ]
    )


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
    job = predict_cli_job(result, store_url)
    if as_json:
        print_json(
            {
                "path": path,
                "level": result.level,
                "virtual_size": result.virtual_size,
                "allocated_bytes": result.allocated_bytes,
                "unallocated_bytes": result.unallocated_bytes,
                "image_bytes": result.image_bytes,
                "compressed_bytes": result.compressed_bytes,
                "low": result.low,
                "high": result.high,
                "predicted_seconds": result.predicted_seconds,
                "job": {"command": "imaging image create --disk", "store": store_url, **job.to_json()},
                "threads": result.threads,
                "sampled_bytes": result.sampled_bytes,
                "samples": result.samples,
                "zero_fraction": result.zero_fraction,
                "context_correction": result.context_correction,
                "seconds_spent": result.seconds_spent,
            }
        )
        return
    click.echo(f"estimate for {path} (chain of {chain.depth}), zstd level {result.level}")
    print_fields(
        [
            ("virtual size", size_with_bytes(result.virtual_size)),
            ("allocated", size_with_bytes(result.allocated_bytes)),
            (
                "compressed",
                f"{size_with_bytes(result.compressed_bytes)} "
                f"(range {human_size(result.low)} - {human_size(result.high)})",
            ),
            ("compress", f"about {result.predicted_seconds:.1f} s on {result.threads} threads"),
            (
                "image job",
                f"about {job.seconds:.1f} s for `imaging image create --disk` into {store_url} "
                f"(compress {job.compress_s:.1f} s, write {job.write_s:.1f} s, upload {job.upload_s:.1f} s, "
                f"start and steps {job.fixed_s + job.estimate_s:.1f} s)",
            ),
            ("sampled", f"{size_with_bytes(result.sampled_bytes)} in {result.seconds_spent:.3f} s"),
        ]
    )


def print_layer(layer: vhdcore.Layer) -> None:
    rows = [
        ("path", layer.path),
        ("type", layer.disk_type),
        ("virtual size", size_with_bytes(layer.virtual_size)),
        ("file size", size_with_bytes(layer.file_size)),
        ("block size", block_size_text(layer)),
        ("uuid", layer.uuid),
    ]
    if layer.parent_uuid is not None:
        rows.append(("parent", f"{layer.parent_name} (uuid {layer.parent_uuid})"))
    print_fields(rows)


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
    if as_json:
        print_json(layer.to_dict())
        return
    click.echo(f"created {layer.disk_type} VHD {layer.path}")
    print_layer(layer)


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
    if as_json:
        print_json(layer.to_dict())
        return
    click.echo(f"created differencing VHD {layer.path} on top of {path}")
    print_layer(layer)


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
    if as_json:
        print_json({"path": path, "offset": offset, "bytes": written})
    else:
        click.echo(f"wrote {size_with_bytes(written)} at offset {offset} into {path}")


COALESCE_STEP_BYTES = 64 * 1024 * 1024


def merge_dict(merge: vhdcore.CoalesceMerge) -> dict[str, Any]:
    return {
        "layer": merge.layer,
        "parent": merge.parent,
        "child": merge.child,
        "duplicate_bytes": merge.duplicate_bytes,
        "bytes_copied": merge.bytes_copied,
        "file_bytes_freed": merge.file_bytes_freed,
        "file_bytes_added": merge.file_bytes_added,
    }


def pending_dict(pending: vhdcore.PendingMerge | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {
        "layer": pending.layer,
        "parent": pending.parent,
        "phase": pending.phase,
        "bytes_copied": pending.bytes_copied,
        "bytes_total": pending.bytes_total,
    }


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
    show = progress if progress is not None else (sys.stderr.isatty() and not as_json)
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
                label = f"merging {Path(pending.layer).name} into {Path(pending.parent).name}"
                bar.update(pending.bytes_copied, pending.bytes_total, label)
            if step.done or sliced:
                break
    totals = {
        "duplicate_bytes": sum(m.duplicate_bytes for m in merges),
        "bytes_copied": sum(m.bytes_copied for m in merges),
        "file_bytes_freed": sum(m.file_bytes_freed for m in merges),
        "file_bytes_added": sum(m.file_bytes_added for m in merges),
    }
    report: dict[str, Any] = {
        "path": path,
        "done": step.done,
        "recovered": recovered,
        "steps": steps,
        "depth_before": depth_before,
        "depth": step.depth,
        "layers_merged": len(merges),
        **totals,
        "merges": [merge_dict(m) for m in merges],
        "pending": pending_dict(step.pending),
        "skipped": [{"layer": s.layer, "reason": s.reason} for s in step.skipped],
    }
    if as_json:
        print_json(report)
        return
    state = "coalesced" if step.done else "coalesce paused (budget spent; run again to resume)"
    before = "?" if depth_before is None else str(depth_before)
    click.echo(
        f"{state}: {path}: {len(merges)} layer{'s' if len(merges) != 1 else ''} merged, depth {before} -> {step.depth}"
    )
    rows = [
        ("duplicates", f"{size_with_bytes(totals['duplicate_bytes'])} stored twice before, now once"),
        ("copied", size_with_bytes(totals["bytes_copied"])),
        ("files freed", size_with_bytes(totals["file_bytes_freed"])),
        ("files grown", size_with_bytes(totals["file_bytes_added"])),
    ]
    if recovered:
        rows.append(("resumed", "finished a coalesce left pending (paused or interrupted) by an earlier run"))
    if step.pending is not None:
        p = step.pending
        rows.append(
            (
                "pending",
                f"{Path(p.layer).name} into {Path(p.parent).name}: {p.phase}, "
                f"{human_size(p.bytes_copied)} of {human_size(p.bytes_total)} copied",
            )
        )
    print_fields(rows)
    for merge in merges:
        click.echo(f"  merged {merge.layer} into {merge.parent} (child {merge.child} relinked)")
    for skipped in step.skipped:
        click.echo(f"  left alone: {skipped.layer}: {skipped.reason}")


# `imaging vhd usage`: partitions, filesystems and what a live-data image leaves out (statemachine/cli/vhd_usage.py).
vhd.add_command(vhd_usage.usage)
