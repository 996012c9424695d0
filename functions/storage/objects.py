"""What every object store offers (a Protocol both backends satisfy), the values it returns, key rules, S3 limits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from functions.storage.errors import InvalidKeyError, InvalidPartError

MIN_PART_SIZE = 5 * 1024**2
"""S3's minimum size of every part but the last."""
MAX_PART_SIZE = 5 * 1024**3
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class ObjectInfo:
    """An object's metadata. `etag` is bare (unquoted); `checksum_crc32c` is S3's text form when the store knows it
    (a full-object CRC32C, or a composite `<crc>-<parts>` for a multipart object)."""

    key: str
    size: int
    etag: str
    checksum_crc32c: str | None = None


@dataclass(frozen=True)
class PartInfo:
    """A stored part of a multipart upload; `crc32c` is None when the store does not report it (e.g. ListParts on
    some S3 implementations), in which case the ETag (MD5) identifies the content."""

    number: int
    size: int
    etag: str
    crc32c: int | None


@dataclass(frozen=True)
class UploadInfo:
    """A multipart upload in progress."""

    key: str
    upload_id: str
    initiated: datetime


class ObjectStore(Protocol):
    """Object storage with S3's semantics. Keys are relative to the store's root (a directory or a bucket prefix).

    Writes are atomic: an object is either absent or complete under its key. ETags are bare strings.
    """

    @property
    def url(self) -> str: ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes from `start` (fewer at the object's end); InvalidRangeError if `start` is past it."""
        ...

    def get(self, key: str) -> bytes: ...

    def head(self, key: str) -> ObjectInfo: ...

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> ObjectInfo:
        """Write a whole object. `if_none_match`: only if the key is absent; `if_match`: only if its ETag is this."""
        ...

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, in key order."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting an absent key succeeds, as on S3."""
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove several objects at once (S3's DeleteObjects); absent keys are fine, as with `delete`."""
        ...

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload (parts carry CRC32C checksums) and return its id."""
        ...

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes, crc32c: int) -> PartInfo:
        """Store one part; the store checks `crc32c` against the bytes it received (ChecksumMismatchError otherwise)."""
        ...

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, start: int, length: int
    ) -> PartInfo:
        """Store one part from a byte range of an existing object, without moving the bytes through this process."""
        ...

    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]: ...

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[PartInfo]) -> ObjectInfo:
        """Assemble the given parts (ascending numbers; ETags must match) into the object, atomically."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discard an upload and its parts; UploadNotFoundError if it is gone."""
        ...

    def list_multipart_uploads(self, prefix: str = "") -> list[UploadInfo]: ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidKeyError naming what is wrong.

    Rules (stricter than S3, so that a key maps to a path under the file store's root and nowhere else): non-empty,
    at most 1024 UTF-8 bytes, no NUL or backslash, no leading '/', and every '/'-separated segment non-empty and
    neither '.' nor '..'.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("an object key must be a non-empty string", key=repr(key))
    if "\x00" in key:
        raise InvalidKeyError("an object key must not contain NUL", key=key)
    if "\\" in key:
        raise InvalidKeyError("an object key must not contain a backslash", key=key)
    if key.startswith("/"):
        raise InvalidKeyError("an object key must be relative (no leading '/')", key=key)
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"an object key must be at most {MAX_KEY_BYTES} bytes of UTF-8", key=key[:64] + "...")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"a key must not contain an empty, '.' or '..' segment ({segment!r})", key=key)
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key (a trailing '/' allowed, to list one 'folder')."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def validate_part_number(number: int) -> int:
    if not 1 <= number <= MAX_PARTS:
        raise InvalidPartError(f"part number {number} is outside 1..{MAX_PARTS}")
    return number
