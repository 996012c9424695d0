"""How `imaging vhd ...` shows what vhdcore returned: with `--json` one document (its fields named as vhdcore names
them), else aligned fields, tables and a closing line for people. The commands (statemachine/cli/vhd.py) call
vhdcore and hand the result here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

import vhdcore
from statemachine.cli.output import human_size, print_fields, print_json, print_table, size_with_bytes

if TYPE_CHECKING:
    from functions.imaging.prediction import JobTime


def plural(count: int, word: str, many: str = "s") -> str:
    return f"{word}{many if count != 1 else ''}"


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


def show_info(chain: vhdcore.Chain, as_json: bool) -> None:
    """`vhd info`: the leaf and its whole chain."""
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
            ("chain", f"{chain.depth} {plural(chain.depth, 'layer')}, leaf first"),
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


def show_problems(path: str, problems: Sequence[vhdcore.Problem], as_json: bool) -> None:
    """`vhd check`: every problem found in the chain, or that there is none."""
    if as_json:
        print_json({"path": path, "ok": not problems, "problems": [problem_dict(p) for p in problems]})
    elif not problems:
        click.echo(f"ok: {path}: no problems found in the chain")
    else:
        for problem in problems:
            click.echo(f"{problem.kind}: {problem.message}")


def show_map(chain: vhdcore.Chain, extents: Sequence[vhdcore.Extent], as_json: bool) -> None:
    """`vhd map`: the extents of the flattened disk and the bytes each layer (or zero) holds."""
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


def show_diff(old: str, new: str, result: vhdcore.Diff, as_json: bool) -> None:
    """`vhd diff`: the differing ranges and their total (the command sets the exit code)."""
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
        return
    if result.ranges:
        rows = [[str(start), str(length), human_size(length)] for start, length in result.ranges]
        print_table(["start", "length", ""], rows, right=[0, 1, 2])
        click.echo()
    count = len(result.ranges)
    shared = f"{result.shared_layers} shared base {plural(result.shared_layers, 'layer')} skipped"
    if count == 0:
        click.echo(f"identical: no differing bytes ({shared})")
    else:
        click.echo(f"total: {size_with_bytes(result.total)} in {count} {plural(count, 'range')} ({shared})")


def speed_text(virtual_size: int, seconds: float) -> str:
    return f"{human_size(int(virtual_size / seconds))}/s" if seconds > 0 else "-"


def show_export(path: str, out: str, chain: vhdcore.Chain, stats: vhdcore.ExportStats, as_json: bool) -> None:
    """`vhd export --format raw|vhd`: what was written."""
    seconds = stats.seconds
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
            ("time", f"{seconds:.3f} s ({speed_text(stats.virtual_size, seconds)} of virtual disk)"),
        ]
    )


def show_image(path: str, out: str, chain: vhdcore.Chain, stats: vhdcore.ImageStats, as_json: bool) -> None:
    """`vhd export --format vhd.zst`: the image written, its sizes and its frames."""
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
    click.echo(f"compressed {path} (chain of {chain.depth}) to {out} as vhd.zst (zstd level {stats.level})")
    print_fields(
        [
            ("virtual size", size_with_bytes(stats.virtual_size)),
            ("data", size_with_bytes(stats.data_bytes)),
            ("image (vhd)", size_with_bytes(stats.image_bytes)),
            ("compressed", f"{size_with_bytes(stats.compressed_bytes)}, {ratio:.1%} of the virtual size"),
            ("frames", f"{len(stats.chunks) + 1} (head + {len(stats.chunks)} chunks)"),
            ("time", f"{seconds:.3f} s ({speed_text(stats.virtual_size, seconds)} of virtual disk)"),
        ]
    )


def show_estimate(
    path: str, chain: vhdcore.Chain, result: vhdcore.Estimate, job: JobTime, store_url: str, as_json: bool
) -> None:
    """`vhd estimate`: the predicted image size (with its range) and the time to make it."""
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


def show_layer(layer: vhdcore.Layer, headline: str, as_json: bool) -> None:
    """`vhd create` and `vhd snapshot`: the new disk."""
    if as_json:
        print_json(layer.to_dict())
        return
    click.echo(headline)
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


def show_written(path: str, offset: int, written: int, as_json: bool) -> None:
    """`vhd write`: how many bytes went where."""
    if as_json:
        print_json({"path": path, "offset": offset, "bytes": written})
    else:
        click.echo(f"wrote {size_with_bytes(written)} at offset {offset} into {path}")


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


def pending_label(pending: vhdcore.PendingMerge) -> str:
    """The progress bar's label while a merge runs."""
    return f"merging {Path(pending.layer).name} into {Path(pending.parent).name}"


def show_coalesce(
    path: str,
    depth_before: int | None,
    merges: Sequence[vhdcore.CoalesceMerge],
    last: vhdcore.CoalesceStep,
    recovered: bool,
    steps: int,
    as_json: bool,
) -> None:
    """`vhd coalesce`: the merges of this run's steps (`last` the final one), their totals, and what is left."""
    totals = {
        "duplicate_bytes": sum(m.duplicate_bytes for m in merges),
        "bytes_copied": sum(m.bytes_copied for m in merges),
        "file_bytes_freed": sum(m.file_bytes_freed for m in merges),
        "file_bytes_added": sum(m.file_bytes_added for m in merges),
    }
    if as_json:
        print_json(
            {
                "path": path,
                "done": last.done,
                "recovered": recovered,
                "steps": steps,
                "depth_before": depth_before,
                "depth": last.depth,
                "layers_merged": len(merges),
                **totals,
                "merges": [merge_dict(m) for m in merges],
                "pending": pending_dict(last.pending),
                "skipped": [{"layer": s.layer, "reason": s.reason} for s in last.skipped],
            }
        )
        return
    state = "coalesced" if last.done else "coalesce paused (budget spent; run again to resume)"
    before = "?" if depth_before is None else str(depth_before)
    click.echo(f"{state}: {path}: {len(merges)} {plural(len(merges), 'layer')} merged, depth {before} -> {last.depth}")
    rows = [
        ("duplicates", f"{size_with_bytes(totals['duplicate_bytes'])} stored twice before, now once"),
        ("copied", size_with_bytes(totals["bytes_copied"])),
        ("files freed", size_with_bytes(totals["file_bytes_freed"])),
        ("files grown", size_with_bytes(totals["file_bytes_added"])),
    ]
    if recovered:
        rows.append(("resumed", "finished a coalesce left pending (paused or interrupted) by an earlier run"))
    if last.pending is not None:
        p = last.pending
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
    for skipped in last.skipped:
        click.echo(f"  left alone: {skipped.layer}: {skipped.reason}")
