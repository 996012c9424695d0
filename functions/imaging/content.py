"""The content hash of a disk: a tree hash over its chunks, so that the Map's workers compute it as they compress
and nothing re-reads the disk.

Each chunk of `chunk_size` bytes of the flattened disk (zeros included; the last one may be shorter) has a sha256;
the disk's content hash is the sha256 of those 32-byte digests, in order. Anyone can check it on a raw disk:
`split -b CHUNK_SIZE --filter=sha256sum disk.raw | cut -c1-64 | xxd -r -p | sha256sum`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import vhdcore

READ_SIZE = 16 * 1024**2
_ZEROS = memoryview(bytes(READ_SIZE))


def content_tree_sha256(chunk_digests: Iterable[str]) -> str:
    """The disk's content hash from its chunks' hex sha256 digests, in chunk order."""
    tree = hashlib.sha256()
    for digest in chunk_digests:
        tree.update(bytes.fromhex(digest))
    return tree.hexdigest()


def chunk_content_sha256s(chain: vhdcore.Chain, chunk_size: int) -> list[str]:
    """The sha256 of each `chunk_size` slice of the chain's flattened content, read extent by extent so that ranges
    no layer holds are hashed as zeros without being read."""
    digests = []
    extents = chain.map()
    first = 0  # the first extent that may still reach into the next chunk (extents are in disk order)
    for start in range(0, chain.virtual_size, chunk_size):
        end = min(start + chunk_size, chain.virtual_size)
        digest = hashlib.sha256()
        while first < len(extents) and extents[first].start + extents[first].length <= start:
            first += 1
        for extent in extents[first:]:
            if extent.start >= end:
                break
            offset, stop = max(extent.start, start), min(extent.start + extent.length, end)
            while offset < stop:
                length = min(READ_SIZE, stop - offset)
                digest.update(_ZEROS[:length] if extent.layer is None else chain.read(offset, length))
                offset += length
        digests.append(digest.hexdigest())
    return digests
