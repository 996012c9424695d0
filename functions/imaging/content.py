"""The sha256 of a disk's logical content (its flattened bytes, zeros included), read extent by extent so that
ranges no layer holds are hashed as zeros without being read."""

from __future__ import annotations

import hashlib

import vhdcore

READ_SIZE = 16 * 1024**2
_ZEROS = bytes(READ_SIZE)


def content_sha256(chain: vhdcore.Chain) -> str:
    digest = hashlib.sha256()
    for extent in chain.map():
        end = extent.start + extent.length
        offset = extent.start
        while offset < end:
            length = min(READ_SIZE, end - offset)
            digest.update(_ZEROS[:length] if extent.layer is None else chain.read(offset, length))
            offset += length
    return digest.hexdigest()
