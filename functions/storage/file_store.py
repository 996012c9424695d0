"""Object store on a local directory with S3's semantics (the embedded default, DESIGN §4).

Layout under the root: objects at `<root>/<key>`; the store's own area is `<root>/.imaging-store/` (keys may not
start with that segment): `tmp/` for files being written, `uploads/<upload id>/` for multipart staging
(`upload.json` plus `part-NNNNN` files), `locks/` for per-key lock files.

Guarantees: every write goes to a temp file on the same file system, is fsynced, then renamed into place
(`os.replace`, or `os.link` for if-none-match), so a reader or a crash never sees a partial object or part under
its final name; writers of one key serialise on an `flock` of that key's lock file, so conditional puts are
race-safe between threads and processes. ETags are opaque, as S3 documents them (an MD5 only in some cases): 32
hex digits made of the CRC32C and size of the bytes and a nonce of the write, so every write gets a new ETag
(if-match never mistakes a rewrite for the version it read) and no MD5 pass is spent on data that already carries a
CRC32C; a multipart object's ETag is S3's MD5-of-part-ETags `-N`. ETag and CRC32C are kept in extended attributes
(`user.imaging.*`) of the file, so they move with it atomically; a file placed by hand without them gets both
computed on `head`. Objects are never written in place (a new version is a new file renamed over the key), so a
part copied from a whole object is a hard link to it: no byte is copied twice.
Nothing is left behind by a finished operation: a key's lock file is removed by its last holder (a waiter that
finds its file unlinked opens the new one), and a delete removes the folders it leaves empty up to the root (a
writer that finds its folder removed meanwhile makes it again). A killed process may leave temp files in `tmp/`
(never visible as objects): `sweep_leftovers` removes those not touched for a while.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from functions.storage.checksums import (
    composite_crc32c,
    decode_crc32c,
    encode_crc32c,
    multipart_etag,
    unquote_etag,
)
from functions.storage.checksums import crc32c as _crc32c_of
from functions.storage.errors import (
    ChecksumMismatchError,
    InvalidKeyError,
    InvalidPartError,
    InvalidRangeError,
    ObjectNotFoundError,
    ObjectPreconditionFailedError,
    StorageError,
    UploadNotFoundError,
)
from functions.storage.objects import (
    MIN_PART_SIZE,
    ObjectInfo,
    PartInfo,
    UploadInfo,
    validate_key,
    validate_part_number,
    validate_prefix,
)

STORE_AREA = ".imaging-store"
_ETAG_ATTR = "user.imaging.etag"
_CRC32C_ATTR = "user.imaging.crc32c"
_COPY_BLOCK = 8 * 1024**2
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_PART_FILE = re.compile(r"part-(\d{5})")
_PLACE_ATTEMPTS = 8
T = TypeVar("T")


class FileObjectStore:
    """An ObjectStore on the directory `root` (created if missing)."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise StorageError(f"the file store root must be an absolute path, got {root}")
        self.root = root
        self._area = root / STORE_AREA
        self._tmp = self._area / "tmp"
        self._uploads = self._area / "uploads"
        self._locks = self._area / "locks"
        try:
            for folder in (self._tmp, self._uploads, self._locks):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create the file store at {root}: {error.strerror}") from error
        self._check_extended_attributes()

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _check_extended_attributes(self) -> None:
        with self._staged_file() as (_, fd):
            try:
                _set_metadata(fd, "probe", "probe")
            except OSError as error:
                raise StorageError(
                    f"the file system of {self.root} does not keep user extended attributes ({error.strerror})",
                    hint="put the file store on ext4, xfs, btrfs or tmpfs (Linux 6.6+), or use an s3:// store",
                ) from error

    # -- objects ----------------------------------------------------------------------------------------------

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidRangeError(f"a range needs start >= 0 and length >= 0, got {start}, {length}", key=key)
        path = self._object_path(key)
        if length == 0:
            return b""
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if start >= size:
                    raise InvalidRangeError(f"range start {start} is at or past the end ({size} bytes)", key=key)
                return os.pread(file.fileno(), min(length, size - start), start)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError("no such object", key=key) from None

    def get(self, key: str) -> bytes:
        try:
            return self._object_path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError("no such object", key=key) from None

    def head(self, key: str) -> ObjectInfo:
        path = self._object_path(key)
        try:
            return self._info(key, path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError("no such object", key=key) from None

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> ObjectInfo:
        path = self._object_path(key)
        crc = _crc32c_of(data)
        etag, checksum = _new_etag(crc, len(data)), encode_crc32c(crc)
        with self._staged_file() as (staged, fd):
            _write_all(fd, data)
            _set_metadata(fd, etag, checksum)
            os.fsync(fd)
            with self._key_lock(key):
                if if_match is not None:
                    try:
                        current = self._info(key, path).etag
                    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                        raise ObjectPreconditionFailedError("if-match: the object does not exist", key=key) from None
                    if current != unquote_etag(if_match):
                        raise ObjectPreconditionFailedError(f"if-match: the ETag is {current}, not {if_match}", key=key)
                if if_none_match:
                    try:
                        self._into_folder(key, path, lambda: os.link(staged, path))
                    except FileExistsError:
                        raise ObjectPreconditionFailedError(
                            "if-none-match: the object already exists", key=key
                        ) from None
                else:
                    self._into_folder(key, path, lambda: _replace(staged, path, key))
                _fsync_dir(path.parent)
        return ObjectInfo(key=key, size=len(data), etag=etag, checksum_crc32c=checksum)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix names; S3 orders keys by their UTF-8 bytes.
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        keys: list[str] = []
        for directory, subdirs, files in os.walk(folder):
            if Path(directory) == self.root and STORE_AREA in subdirs:
                subdirs.remove(STORE_AREA)
            for name in files:
                key = Path(directory, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys, key=lambda k: k.encode()):
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                yield self._info(key, self.root / key)

    def delete(self, key: str) -> None:
        path = self._object_path(key)
        with self._key_lock(key):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
            except IsADirectoryError:
                return  # a "folder" of other keys, not an object: nothing to delete, as on S3
            _fsync_dir(path.parent)
        self._prune(path.parent)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Each key removed as by `delete`, each folder made durable once at the end, not once per key."""
        folders: set[Path] = set()
        for key in keys:
            path = self._object_path(key)
            with self._key_lock(key):
                try:
                    path.unlink()
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue
            folders.add(path.parent)
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):  # pruned with a deeper one
                _fsync_dir(folder)
        for folder in sorted(folders, key=lambda item: len(item.parts), reverse=True):
            self._prune(folder)

    def sweep_leftovers(self, older_than_s: float = 300.0) -> int:
        """Remove what killed processes left in the store's area: temp files and folders not modified for
        `older_than_s` (a live writer keeps touching its file), and lock files nobody holds. Returns how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in list(self._tmp.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
                removed += 1
        for entry in list(self._locks.iterdir()):
            try:
                fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.samestat(os.fstat(fd), entry.stat()):
                    entry.unlink()  # while held, as a holder removes it (see _key_lock)
                    removed += 1
            except (BlockingIOError, FileNotFoundError):
                pass  # held right now, or removed by its holder
            finally:
                os.close(fd)
        return removed

    def write_rate(self) -> float:
        """Sustained bytes per second this store's file system takes to its device, as an image is written in place
        (direct writes of 8 MiB, then `fdatasync`): measured once by writing WRITE_PROBE_BYTES, then remembered
        (predictions read it; the probe costs about a fifth of a second)."""
        rate = self.measurement(WRITE_RATE)
        if rate is None:
            rate = _probe_write_rate(self._tmp)
            self.remember(WRITE_RATE, rate)
        return rate

    def measurement(self, name: str) -> float | None:
        """A figure this machine measured and remembered in the store's area (None if never, or unreadable)."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return float(json.loads((self._area / "measured.json").read_bytes())[name])
        return None

    def remember(self, name: str, value: float) -> None:
        """Keep a measured figure for later predictions (best effort: a figure that cannot be kept is measured
        again)."""
        record = self._area / "measured.json"
        with contextlib.suppress(OSError), self._key_lock(f"{STORE_AREA}/measured.json"):
            try:
                figures = json.loads(record.read_bytes())
            except (OSError, ValueError):
                figures = {}
            figures[name] = value
            with self._staged_file() as (staged, fd):
                _write_all(fd, json.dumps(figures).encode())
                os.fsync(fd)
                staged.replace(record)

    # -- writing in place (one write of an image: DESIGN §3, issue 13) ------------------------------------------

    def spool_path(self, key: str, *, create: bool = True) -> Path:
        """The file behind `key`, for a writer that fills it in place (vhdcore writes an image's frames where they
        belong) before `publish` moves it under its final key. Only spools are written in place: every other object
        is replaced whole, as on S3, and a spool is not published until its writer says it is complete. With
        `create=False`, ObjectNotFoundError if there is no such spool (published already, or never begun)."""
        path = self._object_path(key)
        if not create:
            if not path.is_file():
                raise ObjectNotFoundError("no such spool", key=key)
            return path
        fd = self._into_folder(key, path, lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        try:
            if _get_attr(fd, _ETAG_ATTR) is None:
                # Listed like any object meanwhile (staging is listed to be deleted): placeholder metadata spares
                # `head` a read of the whole file to compute what `publish` records anyway.
                _set_metadata(fd, _new_etag(0, 0), encode_crc32c(0))
        finally:
            os.close(fd)
        return path

    def publish(self, spool_key: str, key: str, checksum_crc32c: str) -> ObjectInfo:
        """Make the spool's bytes the object `key` by a rename (no byte copied): its checksum recorded (the caller
        computed it as it wrote), the file and the folder made durable. ObjectNotFoundError if the spool is gone."""
        spool, path = self._object_path(spool_key), self._object_path(key)
        try:
            fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError("no such spool", key=spool_key) from None
        try:
            size = os.fstat(fd).st_size
            etag = _new_etag(decode_crc32c(checksum_crc32c.partition("-")[0]), size)
            _set_metadata(fd, etag, checksum_crc32c)
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._key_lock(key):
            self._into_folder(key, path, lambda: _replace(spool, path, key))
            _fsync_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(spool.parent)
        self._prune(spool.parent)
        return ObjectInfo(key=key, size=size, etag=etag, checksum_crc32c=checksum_crc32c)

    # -- multipart --------------------------------------------------------------------------------------------

    def create_multipart(self, key: str) -> str:
        self._object_path(key)
        upload_id = uuid.uuid4().hex
        record = json.dumps({"key": key, "initiated": datetime.now(UTC).isoformat()}).encode()
        with self._staged_file(directory=True) as (staged, _):
            with self._staged_file() as (record_path, fd):
                _write_all(fd, record)
                os.fsync(fd)
                record_path.replace(staged / "upload.json")
            staged.replace(self._uploads / upload_id)
        _fsync_dir(self._uploads)
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes, crc32c: int) -> PartInfo:
        folder = self._upload_folder(key, upload_id)
        validate_part_number(number)
        actual = _crc32c_of(data)
        if actual != crc32c:
            raise ChecksumMismatchError(
                f"part {number}: CRC32C of the received bytes is {encode_crc32c(actual)}, "
                f"the sender said {encode_crc32c(crc32c)}",
                key=key,
            )
        etag = _new_etag(crc32c, len(data))
        with self._staged_file() as (staged, fd):
            _write_all(fd, data)
            _set_metadata(fd, etag, encode_crc32c(crc32c))
            os.fsync(fd)
            self._place_part(staged, folder, number, key, upload_id)
        return PartInfo(number=number, size=len(data), etag=etag, crc32c=crc32c)

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, start: int, length: int
    ) -> PartInfo:
        folder = self._upload_folder(key, upload_id)
        validate_part_number(number)
        source = self._object_path(source_key)
        try:
            with open(source, "rb") as reader:
                size = os.fstat(reader.fileno()).st_size
                if start < 0 or length < 1 or start + length > size:
                    raise InvalidRangeError(
                        f"copy range {start}+{length} is not inside the source ({size} bytes)", key=source_key
                    )
                if (start, length) == (0, size):
                    source_etag = _get_attr(reader.fileno(), _ETAG_ATTR)
                    source_crc = _get_attr(reader.fileno(), _CRC32C_ATTR)
                    if source_etag is not None and source_crc is not None:
                        part = PartInfo(number=number, size=size, etag=source_etag, crc32c=decode_crc32c(source_crc))
                        if self._link_part(source, reader.fileno(), part, folder, key, upload_id):
                            return part
                with self._staged_file() as (staged, fd):
                    checksum = _copy_range(reader.fileno(), fd, start, length, source_key)
                    etag = _new_etag(checksum, length)
                    _set_metadata(fd, etag, encode_crc32c(checksum))
                    os.fsync(fd)
                    self._place_part(staged, folder, number, key, upload_id)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError("no such source object", key=source_key) from None
        return PartInfo(number=number, size=length, etag=etag, crc32c=checksum)

    def _link_part(self, source: Path, source_fd: int, part: PartInfo, folder: Path, key: str, upload_id: str) -> bool:
        """The whole object `source` (open as `source_fd`) becomes `part` by a hard link, when the key still names
        that file: objects are never written in place, so the part keeps its bytes, ETag and CRC32C whatever later
        happens to the key. False (nothing linked) if the key moved on meanwhile."""
        staged = self._tmp / f"{uuid.uuid4().hex}.link"
        os.link(source, staged)
        try:
            if not os.path.samestat(staged.stat(), os.fstat(source_fd)):
                return False  # replaced between our open and the link
            self._place_part(staged, folder, part.number, key, upload_id)
            _fsync_dir(folder)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        folder = self._upload_folder(key, upload_id)
        parts: list[PartInfo] = []
        try:
            names = sorted(entry.name for entry in folder.iterdir())
        except FileNotFoundError:
            raise UploadNotFoundError(f"no multipart upload {upload_id}", key=key) from None
        for name in names:
            match = _PART_FILE.fullmatch(name)
            if match is None:
                continue
            with contextlib.suppress(FileNotFoundError):  # aborted meanwhile
                info = self._info(key, folder / name)
                crc = info.checksum_crc32c
                parts.append(
                    PartInfo(
                        number=int(match.group(1)),
                        size=info.size,
                        etag=info.etag,
                        crc32c=decode_crc32c(crc) if crc is not None else None,
                    )
                )
        return parts

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[PartInfo]) -> ObjectInfo:
        folder = self._upload_folder(key, upload_id)
        path = self._object_path(key)
        if not parts:
            raise InvalidPartError("a multipart upload needs at least one part to complete", key=key)
        stored = {part.number: part for part in self.list_parts(key, upload_id)}
        checksums: list[int] = []
        for index, part in enumerate(parts):
            if index and part.number <= parts[index - 1].number:
                raise InvalidPartError("parts must be listed in ascending order of part number", key=key)
            have = stored.get(part.number)
            if have is None or have.etag != unquote_etag(part.etag):
                raise InvalidPartError(f"part {part.number} is not stored with ETag {part.etag}", key=key)
            if index < len(parts) - 1 and have.size < MIN_PART_SIZE:
                raise InvalidPartError(
                    f"part {part.number} has {have.size} bytes, less than the {MIN_PART_SIZE} minimum "
                    "of every part but the last",
                    key=key,
                )
            if have.crc32c is None:
                raise StorageError(f"part {part.number} lost its checksum attribute", key=key)
            checksums.append(have.crc32c)
        etag = multipart_etag([stored[part.number].etag for part in parts])
        checksum = composite_crc32c(checksums)
        size = 0
        with self._staged_file() as (staged, fd):
            for part in parts:
                size += _append_file(fd, folder / f"part-{part.number:05d}")
            _set_metadata(fd, etag, checksum)
            os.fsync(fd)
            with self._key_lock(key):
                if not folder.is_dir():
                    raise UploadNotFoundError(f"multipart upload {upload_id} was aborted meanwhile", key=key)
                self._into_folder(key, path, lambda: _replace(staged, path, key))
                _fsync_dir(path.parent)
        self._discard_upload(folder)
        return ObjectInfo(key=key, size=size, etag=etag, checksum_crc32c=checksum)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        folder = self._upload_folder(key, upload_id)
        if not folder.is_dir():
            raise UploadNotFoundError(f"no multipart upload {upload_id}", key=key)
        self._discard_upload(folder)

    def list_multipart_uploads(self, prefix: str = "") -> list[UploadInfo]:
        validate_prefix(prefix)
        uploads: list[UploadInfo] = []
        for folder in self._uploads.iterdir():
            try:
                record = json.loads((folder / "upload.json").read_bytes())
            except FileNotFoundError:
                continue  # aborted or completed meanwhile
            if record["key"].startswith(prefix):
                uploads.append(
                    UploadInfo(
                        key=record["key"],
                        upload_id=folder.name,
                        initiated=datetime.fromisoformat(record["initiated"]),
                    )
                )
        return sorted(uploads, key=lambda upload: (upload.key.encode(), upload.initiated))

    # -- helpers ----------------------------------------------------------------------------------------------

    def _object_path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == STORE_AREA:
            raise InvalidKeyError(f"keys under {STORE_AREA}/ are reserved by the file store", key=key)
        return self.root / key

    def _upload_folder(self, key: str, upload_id: str) -> Path:
        self._object_path(key)
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise UploadNotFoundError(f"no multipart upload {upload_id!r} (not an id this store makes)", key=key)
        folder = self._uploads / upload_id
        try:
            record = json.loads((folder / "upload.json").read_bytes())
        except FileNotFoundError:
            raise UploadNotFoundError(f"no multipart upload {upload_id}", key=key) from None
        if record["key"] != key:
            raise UploadNotFoundError(f"multipart upload {upload_id} belongs to another key", key=key)
        return folder

    def _info(self, key: str, path: Path) -> ObjectInfo:
        with open(path, "rb") as file:
            fd = file.fileno()
            size = os.fstat(fd).st_size
            etag, checksum = _get_attr(fd, _ETAG_ATTR), _get_attr(fd, _CRC32C_ATTR)
            if etag is None or checksum is None:  # placed by hand
                crc = 0
                while block := file.read(_COPY_BLOCK):
                    crc = _crc32c_of(block, crc)
                etag, checksum = etag or _content_etag(crc, size), checksum or encode_crc32c(crc)
            return ObjectInfo(key=key, size=size, etag=etag, checksum_crc32c=checksum)

    def _place_part(self, staged: Path, folder: Path, number: int, key: str, upload_id: str) -> None:
        try:
            staged.replace(folder / f"part-{number:05d}")
        except FileNotFoundError:
            raise UploadNotFoundError(f"upload {upload_id} was aborted or completed meanwhile", key=key) from None

    def _discard_upload(self, folder: Path) -> None:
        """Rename first (atomic: the upload is gone for everyone at once), then delete at leisure."""
        graveyard = self._tmp / f"discard-{folder.name}-{uuid.uuid4().hex}"
        try:
            folder.replace(graveyard)
        except FileNotFoundError:
            return
        shutil.rmtree(graveyard, ignore_errors=True)

    def _into_folder(self, key: str, path: Path, place: Callable[[], T]) -> T:
        """`place()` (a rename, link or create at `path`) after making its folder, again if a delete's prune removed
        the folder in between (it removes only empty folders, so a few attempts always win)."""
        for _ in range(_PLACE_ATTEMPTS - 1):
            self._make_parent(key, path)
            with contextlib.suppress(FileNotFoundError):
                return place()
        self._make_parent(key, path)
        return place()

    def _prune(self, folder: Path) -> None:
        """Remove `folder` and its parents while they are empty, up to the root (never the root or the store's area)."""
        while folder != self.root and folder.is_relative_to(self.root) and folder != self._area:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty (or gone): its parents are not empty either
            folder = folder.parent

    def _make_parent(self, key: str, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidKeyError("a leading part of this key is an object in the file store", key=key) from None
        if path.is_dir():
            raise InvalidKeyError("this key is a folder of other objects in the file store", key=key)

    @contextlib.contextmanager
    def _staged_file(self, *, directory: bool = False) -> Iterator[tuple[Path, int]]:
        """A new temp file (open fd) or folder (fd -1) in the store's tmp area, removed unless moved away."""
        path = self._tmp / f"{uuid.uuid4().hex}.part"
        if directory:
            path.mkdir()
            try:
                yield path, -1
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            yield path, fd
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """An exclusive flock of the key's lock file, removed by its holder on release: a waiter that then holds an
        unlinked file sees that the path names another file (or none) and locks again, so at most one holds the
        file the path names, and no lock file outlives its use."""
        path = self._locks / hashlib.sha256(key.encode()).hexdigest()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                current = path.stat()
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            if os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)  # closing releases the flock


WRITE_RATE = "write_bytes_per_second"
WRITE_PROBE_BYTES = 64 * 1024**2
_PROBE_BLOCK = 8 * 1024**2


def _probe_write_rate(folder: Path) -> float:
    """Write WRITE_PROBE_BYTES to a new file in `folder` as vhdcore writes images (O_DIRECT, buffered where the
    file system refuses it), sync, and return the bytes per second; the file is removed."""
    path = folder / f"{uuid.uuid4().hex}.probe"
    block = mmap.mmap(-1, _PROBE_BLOCK)  # page-aligned, as O_DIRECT wants; random bytes, as compressed data is
    block.write(os.urandom(_PROBE_BLOCK))
    started = time.perf_counter()
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT, 0o600)
        except OSError:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for _ in range(WRITE_PROBE_BYTES // _PROBE_BLOCK):
                _write_all(fd, memoryview(block))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return WRITE_PROBE_BYTES / max(time.perf_counter() - started, 1e-6)
    finally:
        block.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _content_etag(crc: int, size: int) -> str:
    """The deterministic part of an ETag: the CRC32C and size of the bytes."""
    return f"{crc:08x}{size:016x}"


def _new_etag(crc: int, size: int) -> str:
    """The ETag of a new write: its content's, then a nonce that tells this write from any other (32 hex digits, the
    shape of an MD5 ETag, so multipart ETags are formed as S3 forms them)."""
    return _content_etag(crc, size) + uuid.uuid4().hex[:8]


def _copy_range(source_fd: int, fd: int, start: int, length: int, source_key: str) -> int:
    """Copy `length` bytes at `start` of `source_fd` to `fd`, returning their CRC32C."""
    checksum = done = 0
    while done < length:
        block = os.pread(source_fd, min(_COPY_BLOCK, length - done), start + done)
        if not block:
            raise InvalidRangeError("the source shrank while being copied", key=source_key)
        checksum = _crc32c_of(block, checksum)
        _write_all(fd, block)
        done += len(block)
    return checksum


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _append_file(fd: int, source: Path) -> int:
    """Append `source` to the open file `fd` in the kernel (copy_file_range), returning its size."""
    with open(source, "rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        left = size
        while left:
            copied = os.copy_file_range(reader.fileno(), fd, left)
            if copied == 0:
                raise StorageError(f"staged part {source.name} shrank during completion")
            left -= copied
    return size


def _set_metadata(fd: int, etag: str, checksum: str) -> None:
    os.setxattr(fd, _ETAG_ATTR, etag.encode())
    os.setxattr(fd, _CRC32C_ATTR, checksum.encode())


def _get_attr(fd: int, name: str) -> str | None:
    try:
        return os.getxattr(fd, name).decode()
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _replace(staged: Path, path: Path, key: str) -> None:
    try:
        staged.replace(path)
    except IsADirectoryError:
        raise InvalidKeyError("this key is a folder of other objects in the file store", key=key) from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
