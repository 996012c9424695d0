"""How `imaging image ...` shows images and jobs: with `--json` the records as the state stores them (plus the
manifest, the sizes and ratios of an ACTIVE image, the job), else fields and tables for people. The commands
(statemachine/cli/image.py) read the state and hand the records here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from functions.state import PROGRESS_OF_STATUS, Image, Job, Status
from statemachine.cli.output import human_size, print_fields, print_json, print_table
from statemachine.cli.progress import bytes_text, eta_text

STEP_LABEL = {"QUEUED": "coalesce (0%)", "SAVING": "saving (25%)", "UPLOADING": "uploading (50%)"}
"""What each status of a job's history stands for, as the DESIGN's table names the steps."""


def image_json(record: Image, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    if manifest is not None:
        data["manifest"] = manifest
    return data


def show_created(record: Image, manifest: dict[str, Any], server_disk: str | None, as_json: bool) -> None:
    """`image create`: the image made (with its manifest), and the server's active disk after its snapshot."""
    if as_json:
        print_json({**image_json(record, manifest), "server_disk": server_disk})
        return
    timings = manifest.get("timings", {})
    print_fields(
        [
            ("image", record.id),
            ("status", f"{record.status.value} ({PROGRESS_OF_STATUS[record.status]}%)"),
            ("object", record.object_url or ""),
            ("virtual size", human_size(manifest["virtual_size"])),
            ("compressed", f"{human_size(manifest['compressed_size'])} ({manifest['compression_ratio']:.1f}x)"),
            ("content sha256", manifest["content_sha256"]),
            *([("server disk", f"{server_disk} (the server's active disk now)")] if server_disk else []),
            *[
                (f"{STEP_LABEL[step]} took", f"{seconds:.2f} s")
                for step, seconds in timings.items()
                if step in STEP_LABEL
            ],
        ]
    )


def show_images(images: Sequence[Image], as_json: bool) -> None:
    """`image list`: one row per image."""
    if as_json:
        print_json([image_json(record) for record in images])
        return
    rows = [
        [
            record.id,
            record.server_id or "-",
            record.status.value,
            human_size(record.compressed_size) if record.compressed_size is not None else "-",
            record.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            record.name,
        ]
        for record in images
    ]
    print_table(["ID", "SERVER", "STATUS", "SIZE", "CREATED", "NAME"], rows, right=(3,))


def active_summary(record: Image) -> dict[str, Any] | None:
    """An ACTIVE image's sizes, its compression ratio against the live data (the non-zero bytes of the disk) and
    against the virtual size, and the content hash (sha256 of the logical disk, by the manifest's method)."""
    if record.status is not Status.ACTIVE:
        return None
    manifest = record.manifest

    def size(name: str) -> int | None:
        value = manifest.get(name)
        return value if isinstance(value, int) else None

    virtual = record.virtual_size if record.virtual_size is not None else size("virtual_size")
    compressed = record.compressed_size if record.compressed_size is not None else size("compressed_size")
    live = size("nonzero_bytes")
    return {
        "sizes": {
            "virtual": virtual,
            "allocated": size("allocated_bytes"),
            "live": live,
            "image_vhd": size("vhd_physical_size"),
            "compressed": compressed,
        },
        "ratio": {
            "compressed_to_live": compressed / live if compressed is not None and live else None,
            "compressed_to_virtual": compressed / virtual if compressed is not None and virtual else None,
        },
        "content_sha256": manifest.get("content_sha256"),
        "content_hash_method": manifest.get("content_hash"),
    }


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    sizes, ratio = summary["sizes"], summary["ratio"]

    def text(n: int | None) -> str:
        return "-" if n is None else f"{human_size(n)} ({n} bytes)"

    def percent(r: float | None, of: str) -> str:
        return "-" if r is None else f"{r:.1%} of the {of}"

    return [
        ("virtual size", text(sizes["virtual"])),
        ("allocated", text(sizes["allocated"])),
        ("live data", f"{text(sizes['live'])} (non-zero bytes)"),
        ("compressed", text(sizes["compressed"])),
        (
            "ratio",
            f"{percent(ratio['compressed_to_live'], 'live data')}, "
            f"{percent(ratio['compressed_to_virtual'], 'virtual size')}",
        ),
        ("content sha256", f"{summary['content_sha256'] or '-'} ({summary['content_hash_method'] or '-'})"),
    ]


def show_image(record: Image, job: Job | None, as_json: bool) -> None:
    """`image show`: the image, its sizes and ratio once ACTIVE, and its job's progress, error and hint."""
    summary = active_summary(record)
    if as_json:
        data = image_json(record)
        data["job"] = job.model_dump(mode="json") if job is not None else None
        if summary is not None:
            data.update(summary)
        print_json(data)
        return
    rows = [("image", record.id), ("name", record.name), ("status", record.status.value)]
    rows.append(("object", record.object_url or "-"))
    if summary is not None:
        rows += summary_rows(summary)
    if job is not None:
        rows += [("job", job.id), ("progress", f"{job.progress}%"), ("bytes", bytes_text(job) or "-")]
        rows.append(("eta", eta_text(job)))
        if job.error_code:
            rows += [("error", job.error_code), ("hint", job.error_hint or "")]
    print_fields(rows)
