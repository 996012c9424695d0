"""Stored images after the workflow: verify (re-read and check every checksum and the content hash), export,
delete. Decompression uses the `zstandard` library (the image is a plain multi-frame zstd stream)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import zstandard

import vhdcore
from functions.imaging import keys
from functions.imaging.content import LEGACY_METHOD, READ_SIZE, chunk_content_sha256s, content_tree_sha256
from functions.imaging.errors import ImagingError
from functions.imaging.services import ImagingServices
from functions.state import Image, Status
from functions.storage import NotFoundError
from functions.storage.checksums import crc32c
from functions.storage.retry import call_with_retries

ExportFormat = Literal["vhd.zst", "vhd", "raw"]


class ImageBusyError(ImagingError):
    code = "IMAGE_BUSY"
    hint = "the image is still being made: wait until it is ACTIVE or ERROR"


class ManifestMissingError(ImagingError):
    code = "MANIFEST_MISSING"
    hint = "the image has no manifest (it never became ACTIVE): delete it and image the server again"


@dataclass
class Verification:
    """What `verify` checked; `problems` empty means the image is intact."""

    image_id: str
    object_key: str
    size: int
    parts_checked: int = 0
    frames_checked: int = 0
    object_sha256: str | None = None
    content_sha256: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "ok": self.ok,
            "object_key": self.object_key,
            "size": self.size,
            "parts_checked": self.parts_checked,
            "frames_checked": self.frames_checked,
            "object_sha256": self.object_sha256,
            "content_sha256": self.content_sha256,
            "problems": self.problems,
        }


def load_manifest(services: ImagingServices, image_id: str) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads(services.store.get(keys.manifest_key(image_id)))
    except NotFoundError as error:
        raise ManifestMissingError(f"image {image_id} has no manifest at {keys.manifest_key(image_id)}") from error
    return manifest


def _read(services: ImagingServices, key: str, offset: int, length: int) -> bytes:
    return call_with_retries(partial(services.store.get_range, key, offset, length), services.config.retry)


def verify_image(services: ImagingServices, image_id: str, work_dir: Path | None = None) -> Verification:
    """Re-read the stored image: size, every part's and frame's CRC32C, every frame's decompression (zstd checks
    its content checksum; the head's sha256 too), the object's sha256, and the content hash of the disk the
    decompressed VHD holds (read back with vhdcore), chunk by chunk against the manifest."""
    manifest = load_manifest(services, image_id)
    key = str(manifest["object_key"])
    report = Verification(image_id, key, services.store.head(key).size)
    if report.size != manifest["compressed_size"]:
        report.problems.append(f"the object has {report.size} bytes, the manifest says {manifest['compressed_size']}")
        return report
    for part in manifest["parts"]:
        found = crc32c(_read(services, key, part["offset"], part["length"]))
        if found != part["crc32c"]:
            report.problems.append(f"part {part['number']}: CRC32C {found:#010x}, expected {part['crc32c']:#010x}")
        report.parts_checked += 1
    object_digest = hashlib.sha256()
    decompressor = zstandard.ZstdDecompressor()
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        vhd_path = Path(folder) / "image.vhd"
        with vhd_path.open("wb") as vhd:
            for frame in manifest["frames"]:
                data = _read(services, key, frame["offset"], frame["compressed_bytes"])
                object_digest.update(data)
                name = "head" if frame["index"] is None else f"chunk {frame['index']}"
                if crc32c(data) != frame["crc32c"]:
                    report.problems.append(f"frame of {name}: CRC32C differs from the manifest")
                    continue
                logical = decompressor.decompress(data, max_output_size=frame["logical_bytes"]) if data else b""
                if frame.get("sha256") is not None and hashlib.sha256(logical).hexdigest() != frame["sha256"]:
                    report.problems.append(f"frame of {name}: sha256 of its content differs from the manifest")
                vhd.write(logical)
                report.frames_checked += 1
        if manifest.get("object_sha256") is not None:  # an image written in place has none: its parts vouch
            report.object_sha256 = object_digest.hexdigest()
            if report.object_sha256 != manifest["object_sha256"]:
                report.problems.append("the object's sha256 differs from the manifest")
        if report.ok:
            method = str(manifest.get("content_hash", LEGACY_METHOD))
            try:
                chunks = chunk_content_sha256s(vhdcore.open_chain(str(vhd_path)), int(manifest["chunk_size"]), method)
            except vhdcore.VhdError as error:
                report.problems.append(f"the decompressed image is not a valid VHD: {error}")
            except ValueError as error:
                report.problems.append(f"the manifest's content hash cannot be checked: {error}")
            else:
                _compare_chunk_digests(report, chunks, manifest["frames"])
                report.content_sha256 = content_tree_sha256(chunks)
                if report.content_sha256 != manifest["content_sha256"]:
                    report.problems.append("the disk content's sha256 differs from the manifest")
    return report


def _compare_chunk_digests(report: Verification, found: list[str], frames: list[dict[str, Any]]) -> None:
    """Each chunk's content, read back from the decompressed VHD, against the digest its worker recorded."""
    recorded = {frame["index"]: frame.get("content_sha256") for frame in frames if frame["index"] is not None}
    if len(recorded) != len(found):
        report.problems.append(f"the manifest lists {len(recorded)} chunks, the disk has {len(found)}")
        return
    for index, digest in enumerate(found):
        if recorded.get(index) != digest:
            report.problems.append(f"chunk {index}: the sha256 of its disk content differs from the manifest")


def export_image(services: ImagingServices, image_id: str, out: Path, fmt: ExportFormat) -> int:
    """Write the image to `out`: as stored (vhd.zst), decompressed (a dynamic VHD), or flattened (raw).
    Returns the bytes written."""
    manifest = load_manifest(services, image_id)
    key = str(manifest["object_key"])
    size = int(manifest["compressed_size"])
    staged = out.with_name(out.name + ".partial")
    try:
        if fmt == "vhd.zst":
            with staged.open("wb") as target:
                for offset in range(0, size, READ_SIZE):
                    target.write(_read(services, key, offset, READ_SIZE))
        else:
            vhd_target = staged if fmt == "vhd" else staged.with_name(staged.name + ".vhd")
            decompressor = zstandard.ZstdDecompressor()
            with vhd_target.open("wb") as target:
                for frame in manifest["frames"]:
                    data = _read(services, key, frame["offset"], frame["compressed_bytes"])
                    if data:
                        target.write(decompressor.decompress(data, max_output_size=frame["logical_bytes"]))
            if fmt == "raw":
                vhdcore.open_chain(str(vhd_target)).export(str(staged), "raw")
                vhd_target.unlink()
        shutil.move(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return out.stat().st_size


def delete_image(services: ImagingServices, image_id: str) -> Image:
    """Delete a finished image's object, manifest and record (an image still being made is refused)."""
    image = services.state.get_image(image_id)
    if image.status not in (Status.ACTIVE, Status.ERROR):
        raise ImageBusyError(f"image {image_id} is {image.status}")
    for info in list(services.store.list_objects(f"images/{image_id}/")):
        services.store.delete(info.key)
    services.state.delete_image(image_id)
    return image
