"""`imaging vhd usage PATH`: the flattened disk's partitions and filesystems, what they prove free, what a live-data
image leaves out and why the rest is kept (DESIGN §5 "Live data only", §7b)."""

from __future__ import annotations

import json
from typing import Any

import click

import vhdcore
from statemachine.cli.common import json_option, require_file


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def usage_document(usage: vhdcore.DiskUsage) -> dict[str, Any]:
    """The usage as one JSON document: vhdcore's, with the totals an operator asks first."""
    document: dict[str, Any] = json.loads(usage.to_json())
    free = usage.free_bytes
    document["free_bytes"] = free
    document["kept_bytes"] = usage.size - free
    document["kept_whole"] = [
        {"index": p.index, "filesystem": p.filesystem, "reason": p.reason}
        for p in usage.partitions
        if p.decision == "keep_whole"
    ]
    return document


def show_usage(path: str, usage: vhdcore.DiskUsage, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(usage_document(usage), indent=2))
        return
    free = usage.free_bytes
    click.echo(f"disk:        {path}")
    click.echo(f"size:        {_size(usage.size)} ({usage.size} bytes)")
    click.echo(f"table:       {usage.table}")
    headers = ("#", "start", "length", "type", "filesystem", "used", "free", "decision")
    rows = [
        (
            str(p.index),
            str(p.start),
            _size(p.length),
            p.type_id or "-",
            p.filesystem,
            _size(p.used_bytes),
            _size(p.free_bytes),
            "dropped" if p.decision == "dropped" else "kept whole",
        )
        for p in usage.partitions
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("")
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    share = 100.0 * free / usage.size if usage.size else 0.0
    click.echo("")
    click.echo(
        f"an image leaves out {_size(free)} ({free} bytes, {share:.1f}% of the disk) that filesystems prove free"
    )
    click.echo("kept: everything else (boot-loader gaps, partition gaps, tails past a filesystem, used blocks)")
    for p in usage.partitions:
        if p.decision == "keep_whole":
            click.echo(f"kept whole: partition {p.index} ({p.filesystem}): {p.reason}")
    for warning in usage.warnings:
        click.echo(f"warning: {warning}")


@click.command(name="usage")
@click.argument("path")
@json_option
def usage(path: str, as_json: bool) -> None:
    """List PATH's partitions and filesystems, used and free bytes, what an image leaves out and every reason a
    partition is kept whole (`imaging image create --all-blocks` keeps everything)."""
    require_file(path)
    show_usage(path, vhdcore.open_chain(path).usage(), as_json)


def live_data_lines(manifest: dict[str, Any]) -> list[str]:
    """What `imaging image show` says of an image's filesystem-aware imaging: how much was left out and why the
    rest was kept (from the manifest's `live_data`)."""
    live = manifest.get("live_data")
    if not isinstance(live, dict):
        return []
    if live.get("mode") != "live":
        return ["live data:   off (every block imaged: --all-blocks, or the server's setting)"]
    dropped = int(live.get("dropped_bytes") or 0)
    lines = [f"live data:   on; {_size(dropped)} ({dropped} bytes) that filesystems prove free left out"]
    for p in live.get("partitions") or []:
        if not isinstance(p, dict):
            continue
        where = f"partition {p.get('index')} ({p.get('filesystem')}, {_size(int(p.get('size') or 0))})"
        if p.get("decision") == "dropped":
            lines.append(f"  {where}: {_size(int(p.get('dropped_bytes') or 0))} left out")
        else:
            lines.append(f"  {where}: kept whole: {p.get('reason')}")
    return lines
