"""Restore: a new registered server whose base disk is an image (DESIGN §4, §5; issue 14 item 5).

The image object decompresses to a dynamic VHD (the flattened chain), so restoring is writing that VHD: decompressed
frame by frame into a hidden temporary file beside the destination, its disk content hashed and checked against the
manifest's content hash, given a UUID of its own (the image's VHD carries one UUID for every restore), then linked
into place (never over an existing file) and only then registered as the server's disk. A failure at any point
leaves no file and no server behind.

The default destination is the store's storage repository for servers, `sr/<server>/<uuid>.vhd` (a file: server
disks are files vhdcore opens); another may be given.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vhdcore
from functions.imaging import keys
from functions.imaging.errors import (
    DiskExistsError,
    ImageCorruptError,
    ImageNotFoundError,
    InvalidRequestError,
    ServerExistsError,
)
from functions.imaging.images import (
    Progress,
    active_manifest,
    check_content,
    write_image_vhd,
)
from functions.imaging.services import ImagingServices
from functions.state import AlreadyExistsError, NotFoundError, Server, validate_id


@dataclass(frozen=True)
class Restored:
    """What a restore made: the server registered on `disk`, a dynamic VHD of `vhd_bytes` whose disk content has
    the image's content hash."""

    server: Server
    image_id: str
    disk: str
    virtual_size: int
    vhd_bytes: int
    content_sha256: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server.model_dump(mode="json"),
            "image_id": self.image_id,
            "disk": self.disk,
            "virtual_size": self.virtual_size,
            "vhd_bytes": self.vhd_bytes,
            "content_sha256": self.content_sha256,
            "seconds": round(self.seconds, 3),
        }


def default_disk_path(services: ImagingServices, server_id: str) -> Path:
    """Where a restored server's disk goes by default: `sr/<server>/<uuid>.vhd` in the (file) store, beside the
    disks that snapshots of registered servers make."""
    try:
        return services.local_path(keys.server_disk_key(server_id, str(uuid.uuid4())))
    except InvalidRequestError as error:
        raise InvalidRequestError(f"{error}: give the restored disk's path (--disk)") from error


def restore_image(
    services: ImagingServices,
    image_id: str,
    server_id: str,
    *,
    disk: Path | None = None,
    tenant: str | None = None,
    flavor: str = "standard",
    progress: Progress | None = None,
) -> Restored:
    """Make server `server_id` (of `tenant`, by default the image's) whose disk is ACTIVE image `image_id`,
    written as a dynamic VHD to `disk` (default: `default_disk_path`) and checked against the manifest's content
    hash before the server is registered. `progress` is told ("decompressing" | "verifying", done, total).

    Refused: an image of another tenant (as if it did not exist), a server name in use (ServerExistsError), a
    `disk` that exists (DiskExistsError); a damaged image is ImageCorruptError and leaves nothing behind."""
    started = time.monotonic()
    validate_id("server", server_id)
    record, manifest = active_manifest(services, image_id)
    if tenant is not None and record.tenant != tenant:
        raise ImageNotFoundError(f"no such image: {image_id} (tenant {tenant})")
    _refuse_existing_server(services, server_id)
    target = (disk if disk is not None else default_disk_path(services, server_id)).absolute()
    if target.exists() or target.is_symlink():
        raise DiskExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with temp.open("xb") as out:
            written = write_image_vhd(services, manifest, out, progress)
            out.flush()
            os.fsync(out.fileno())
        if progress is not None:
            progress("verifying", 0, written)
        problems: list[str] = []
        content_sha256 = check_content(manifest, temp, problems)
        if problems or content_sha256 is None:
            raise ImageCorruptError(f"image {image_id}: the restored disk is not the image's: {'; '.join(problems)}")
        if progress is not None:
            progress("verifying", written, written)
        # A disk of its own: the image's VHD keeps the UUID it was made with, and two restores of one image must not
        # pass for the same parent (children find theirs by UUID). Footer only: the content hash stays.
        vhdcore.set_uuid(str(temp))
        _place(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    server = Server(
        id=server_id,
        tenant=record.tenant if tenant is None else tenant,
        name=server_id,
        disk=str(target),
        flavor=flavor,
        created_at=services.now(),
    )
    try:
        services.state.create_server(server)  # conditional: a server of that name made meanwhile is not replaced
    except AlreadyExistsError as error:
        target.unlink(missing_ok=True)
        raise ServerExistsError(f"server {server_id} already exists") from error
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return Restored(
        server=server,
        image_id=image_id,
        disk=str(target),
        virtual_size=int(manifest["virtual_size"]),
        vhd_bytes=written,
        content_sha256=content_sha256,
        seconds=time.monotonic() - started,
    )


def _refuse_existing_server(services: ImagingServices, server_id: str) -> None:
    try:
        services.state.get_server(server_id)
    except NotFoundError:
        return
    raise ServerExistsError(f"server {server_id} already exists")


def _place(temp: Path, target: Path) -> None:
    """Move the finished disk into place without ever replacing a file (a hard link fails if `target` exists)."""
    try:
        os.link(temp, target)
    except FileExistsError as error:
        raise DiskExistsError(f"{target} appeared while the image was restored") from error
    except OSError as error:  # a filesystem without hard links: check, then rename
        if target.exists():
            raise DiskExistsError(f"{target} already exists") from error
        temp.rename(target)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the new name is durable before a server record points at it
    finally:
        os.close(folder)
