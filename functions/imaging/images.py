"""Stored images after the workflow: verify (re-read and check every checksum and the content hash), export,
delete. Decompression uses the `zstandard` library (the image is a plain multi-frame zstd stream), frame by frame as
the manifest lists them, in pieces: memory stays bounded whatever the disk's size."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, cast

import zstandard

import vhdcore
from functions.imaging import keys
from functions.imaging.content import LEGACY_METHOD, READ_SIZE, chunk_content_sha256s, content_tree_sha256
from functions.imaging.errors import (
    ImageBusyError,
    ImageCorruptError,
    ImageNotFoundError,
    ManifestMissingError,
)
from functions.imaging.services import ImagingServices
from functions.state import Image, Status
from functions.state import NotFoundError as RecordNotFoundError
from functions.storage import ObjectNotFoundError
from functions.storage.checksums import crc32c
from functions.storage.retry import call_with_retries

ExportFormat = Literal["vhd.zst", "vhd", "raw"]
Progress = Callable[[str, int, int], None]
"""Told (what is being done, bytes done, bytes in all) as the work moves on."""
WRITE_SIZE = 1024**2
"""Decompressed bytes handed to the target at a time."""


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
    except ObjectNotFoundError as error:
        raise ManifestMissingError(f"image {image_id} has no manifest at {keys.manifest_key(image_id)}") from error
    return manifest


def active_manifest(services: ImagingServices, image_id: str) -> tuple[Image, dict[str, Any]]:
    """The record and manifest of an ACTIVE image: ImageNotFoundError when there is no such image, ImageBusyError
    while it is being made, ManifestMissingError when it failed."""
    try:
        record = services.state.get_image(image_id)
    except RecordNotFoundError as error:
        raise ImageNotFoundError(f"no such image: {image_id}") from error
    if record.status is Status.ERROR:
        raise ManifestMissingError(f"image {image_id} failed (ERROR): it holds no disk")
    if record.status is not Status.ACTIVE:
        raise ImageBusyError(f"image {image_id} is {record.status.value}, not yet ACTIVE")
    return record, load_manifest(services, image_id)


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
                try:
                    logical = decompressor.decompress(data, max_output_size=frame["logical_bytes"]) if data else b""
                except zstandard.ZstdError as error:
                    report.problems.append(f"frame of {name}: does not decompress ({error})")
                    continue
                if frame.get("sha256") is not None and hashlib.sha256(logical).hexdigest() != frame["sha256"]:
                    report.problems.append(f"frame of {name}: sha256 of its content differs from the manifest")
                vhd.write(logical)
                report.frames_checked += 1
        if manifest.get("object_sha256") is not None:  # an image written in place has none: its parts vouch
            report.object_sha256 = object_digest.hexdigest()
            if report.object_sha256 != manifest["object_sha256"]:
                report.problems.append("the object's sha256 differs from the manifest")
        if report.ok:
            report.content_sha256 = check_content(manifest, vhd_path, report.problems)
    return report


def check_content(manifest: dict[str, Any], vhd_path: Path, problems: list[str]) -> str | None:
    """The content hash of the disk that the decompressed image `vhd_path` holds (None when it cannot be read),
    each chunk's digest and the whole checked against the manifest; what differs is added to `problems`."""
    method = str(manifest.get("content_hash", LEGACY_METHOD))
    try:
        chunks = chunk_content_sha256s(vhdcore.open_chain(str(vhd_path)), int(manifest["chunk_size"]), method)
    except vhdcore.VhdError as error:
        problems.append(f"the decompressed image is not a valid VHD: {error}")
        return None
    except ValueError as error:
        problems.append(f"the manifest's content hash cannot be checked: {error}")
        return None
    _compare_chunk_digests(problems, chunks, manifest["frames"])
    content_sha256 = content_tree_sha256(chunks)
    if content_sha256 != manifest["content_sha256"]:
        problems.append("the disk content's sha256 differs from the manifest")
    return content_sha256


def _compare_chunk_digests(problems: list[str], found: list[str], frames: list[dict[str, Any]]) -> None:
    """Each chunk's content, read back from the decompressed VHD, against the digest its worker recorded."""
    recorded = {frame["index"]: frame.get("content_sha256") for frame in frames if frame["index"] is not None}
    if len(recorded) != len(found):
        problems.append(f"the manifest lists {len(recorded)} chunks, the disk has {len(found)}")
        return
    for index, digest in enumerate(found):
        if recorded.get(index) != digest:
            problems.append(f"chunk {index}: the sha256 of its disk content differs from the manifest")


class _Counted:
    """A write target that counts what goes through it and reports it to `progress`."""

    def __init__(self, target: BinaryIO, progress: Progress | None, label: str, done: int, total: int) -> None:
        self._target = target
        self._progress = progress
        self._label = label
        self.done = done
        self._total = total

    def write(self, data: bytes) -> int:
        self._target.write(data)
        self.done += len(data)
        if self._progress is not None:
            self._progress(self._label, self.done, self._total)
        return len(data)


def _frame_name(frame: dict[str, Any]) -> str:
    return "head" if frame["index"] is None else f"chunk {frame['index']}"


def vhd_size(manifest: dict[str, Any]) -> int:
    """The bytes of the dynamic VHD that the image decompresses to."""
    return sum(int(frame["logical_bytes"]) for frame in manifest["frames"] if frame["compressed_bytes"])


def write_image_vhd(
    services: ImagingServices, manifest: dict[str, Any], target: BinaryIO, progress: Progress | None = None
) -> int:
    """Decompress the image's frames, in order, into `target`: the dynamic VHD the image holds. Each frame is read
    in pieces of at most READ_SIZE and handed on in pieces of WRITE_SIZE; its CRC32C and length are checked
    (zstd checks its own content checksum). ImageCorruptError names the first frame that is wrong and where it
    lies in the object. Returns the bytes written."""
    image_id, key = str(manifest["image_id"]), str(manifest["object_key"])
    decompressor = zstandard.ZstdDecompressor()
    sink = _Counted(target, progress, "decompressing", 0, vhd_size(manifest))
    for frame in manifest["frames"]:
        offset, length, expected = int(frame["offset"]), int(frame["compressed_bytes"]), int(frame["logical_bytes"])
        if not length:
            continue
        where = f"frame of {_frame_name(frame)} at object offset {offset} ({length} bytes)"
        first, crc = sink.done, 0
        try:
            with decompressor.stream_writer(cast(IO[bytes], sink), write_size=WRITE_SIZE, closefd=False) as writer:
                for at in range(offset, offset + length, READ_SIZE):
                    piece = _read(services, key, at, min(READ_SIZE, offset + length - at))
                    crc = crc32c(piece, crc)
                    writer.write(piece)
        except zstandard.ZstdError as error:
            raise ImageCorruptError(f"image {image_id}: the {where} does not decompress: {error}") from error
        if crc != frame["crc32c"]:
            raise ImageCorruptError(f"image {image_id}: the {where} fails its CRC32C ({crc:#010x})")
        if sink.done - first != expected:
            raise ImageCorruptError(
                f"image {image_id}: the {where} holds {sink.done - first} bytes, the manifest says {expected}"
            )
    return sink.done


def _copy_object(
    services: ImagingServices, manifest: dict[str, Any], target: BinaryIO, progress: Progress | None
) -> int:
    """The stored object as it is, each part's CRC32C checked as it goes by (when the parts tile the object)."""
    image_id, key, size = str(manifest["image_id"]), str(manifest["object_key"]), int(manifest["compressed_size"])
    parts = sorted(manifest.get("parts") or [], key=lambda part: int(part["offset"]))
    spans: list[tuple[int, int, int | None]] = [(int(p["offset"]), int(p["length"]), int(p["crc32c"])) for p in parts]
    tiled = bool(spans) and all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(spans))
    if not (tiled and spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == size):
        spans = [(0, size, None)]
    sink = _Counted(target, progress, "copying", 0, size)
    for offset, length, expected in spans:
        crc = 0
        for at in range(offset, offset + length, READ_SIZE):
            piece = _read(services, key, at, min(READ_SIZE, offset + length - at))
            crc = crc32c(piece, crc)
            sink.write(piece)
        if expected is not None and crc != expected:
            raise ImageCorruptError(
                f"image {image_id}: the part at object offset {offset} ({length} bytes) fails its CRC32C ({crc:#010x})"
            )
    return size


def _write_flat(chain: vhdcore.Chain, target: BinaryIO, progress: Progress | None) -> int:
    """The chain's flattened disk, in order (ranges no layer holds written as zeros without being read)."""
    size = chain.virtual_size
    sink = _Counted(target, progress, "flattening", 0, size)
    zeros = bytes(READ_SIZE)
    for extent in chain.map():
        for at in range(extent.start, extent.start + extent.length, READ_SIZE):
            length = min(READ_SIZE, extent.start + extent.length - at)
            sink.write(zeros[:length] if extent.layer is None else chain.read(at, length))
    return size


def _open_image_vhd(image_id: str, vhd_path: Path) -> vhdcore.Chain:
    try:
        return vhdcore.open_chain(str(vhd_path))
    except vhdcore.VhdError as error:  # whatever vhdcore finds wrong with a VHD we wrote: a corrupt image
        raise ImageCorruptError(f"image {image_id}: the decompressed image is not a valid VHD: {error}") from error


def export_image_to(
    services: ImagingServices,
    image_id: str,
    target: BinaryIO,
    fmt: ExportFormat,
    progress: Progress | None = None,
    work_dir: Path | None = None,
) -> int:
    """Write ACTIVE image `image_id` to the stream `target` (stdout, a pipe) in order: as stored (vhd.zst),
    decompressed (the dynamic VHD) or flattened (raw: decompressed first into a temporary VHD in `work_dir`).
    Returns the bytes written."""
    _, manifest = active_manifest(services, image_id)
    if fmt == "vhd.zst":
        return _copy_object(services, manifest, target, progress)
    if fmt == "vhd":
        return write_image_vhd(services, manifest, target, progress)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="imaging-export-") as folder:
        vhd_path = Path(folder) / "image.vhd"
        with vhd_path.open("wb") as vhd:
            write_image_vhd(services, manifest, vhd, progress)
        chain = _open_image_vhd(image_id, vhd_path)
        pipe = _pipe_path(target)
        if pipe is None:
            return _write_flat(chain, target, progress)
        # A pipe or device: vhdcore flattens into it in order, off the GIL (_write_flat runs at ~37 MB/s).
        target.flush()
        chain.export(pipe, "raw", progress=None if progress is None else partial(progress, "flattening"))
        return chain.virtual_size


def _pipe_path(target: BinaryIO) -> str | None:
    """A path that opens `target`'s own pipe or character device (`/dev/fd/N`), or None for anything else (a
    regular file, a socket, an in-memory buffer), which is written from Python."""
    try:
        fd = target.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        return None
    return f"/dev/fd/{fd}"


def export_image(
    services: ImagingServices, image_id: str, out: Path, fmt: ExportFormat, progress: Progress | None = None
) -> int:
    """Write ACTIVE image `image_id` to the file `out`: as stored (vhd.zst), decompressed (a dynamic VHD), or
    flattened (raw, sparse). Written beside it first and moved into place when whole. Returns the bytes written."""
    _, manifest = active_manifest(services, image_id)
    staged = out.with_name(out.name + ".partial")
    try:
        if fmt == "vhd.zst":
            with staged.open("wb") as target:
                _copy_object(services, manifest, target, progress)
        else:
            vhd_target = staged if fmt == "vhd" else staged.with_name(staged.name + ".vhd")
            try:
                with vhd_target.open("wb") as target:
                    write_image_vhd(services, manifest, target, progress)
                if fmt == "raw":
                    chain = _open_image_vhd(image_id, vhd_target)
                    report = None if progress is None else partial(progress, "flattening")
                    chain.export(str(staged), "raw", progress=report)
            finally:
                if fmt == "raw":
                    vhd_target.unlink(missing_ok=True)
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
