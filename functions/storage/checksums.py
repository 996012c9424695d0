"""CRC32C and ETag values in the forms S3 uses on the wire, so both backends and the uploader agree on them."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import crc32c as _crc32c


def crc32c(data: bytes | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `value`."""
    return _crc32c.crc32c(data, value)


def encode_crc32c(value: int) -> str:
    """S3's form of a CRC32C: base64 of the 4 big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def decode_crc32c(text: str) -> int:
    """The integer of an S3 CRC32C (without a composite's `-N` suffix)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 4:
        raise ValueError(f"a CRC32C is 4 bytes, got {len(raw)} in {text!r}")
    return int.from_bytes(raw, "big")


def composite_crc32c(part_checksums: Sequence[int]) -> str:
    """S3's COMPOSITE checksum of a multipart object: the CRC32C of the parts' CRC32Cs, then `-<part count>`."""
    joined = b"".join(value.to_bytes(4, "big") for value in part_checksums)
    return f"{encode_crc32c(crc32c(joined))}-{len(part_checksums)}"


def same_object_checksum(stored: str, expected: str) -> bool:
    """Whether a stored object checksum equals the expected one; some S3 implementations omit the `-N` suffix."""
    stored_value, _, stored_parts = stored.partition("-")
    expected_value, _, expected_parts = expected.partition("-")
    return stored_value == expected_value and (not stored_parts or stored_parts == expected_parts)


def md5_etag(data: bytes | memoryview) -> str:
    """The ETag S3 gives a single-part object or a part (without SSE-KMS): the hex MD5 of its bytes."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def multipart_etag(part_etags: Sequence[str]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the parts' binary MD5s, then `-<part count>`."""
    digest = hashlib.md5(usedforsecurity=False)
    for etag in part_etags:
        digest.update(bytes.fromhex(etag))
    return f"{digest.hexdigest()}-{len(part_etags)}"


def unquote_etag(etag: str) -> str:
    """ETags travel quoted in HTTP; this layer passes them around bare."""
    return etag.strip('"')
