"""The content hash of a disk: a tree hash over its chunks, so that the Map's workers compute it as they compress
and nothing re-reads the disk.

Each chunk of `chunk_size` bytes of the flattened disk (zeros included; the last one may be shorter) has a digest:
the sha256 of the sha256 digests of its `vhdcore.CONTENT_LEAF_SIZE` (2 MiB) slices, in order, so that an all-zero
slice is known by a remembered digest instead of hashed. The disk's content hash is the sha256 of the chunks'
32-byte digests, in order. Anyone can check it on a raw disk (1024 = 32 bytes per slice of a 64 MiB chunk):
`split -b 2M --filter=sha256sum disk.raw | cut -c1-64 | xxd -r -p | split -b 1024 --filter=sha256sum | cut -c1-64
| xxd -r -p | sha256sum`.

Images made before the slices were introduced hash each chunk whole (`LEGACY_METHOD`); verification follows the
method their manifest names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cache

import vhdcore

READ_SIZE = 16 * 1024**2
_ZEROS = memoryview(bytes(READ_SIZE))
METHOD = (
    "sha256 of the chunks' digests, in order; a chunk's digest is the sha256 of the sha256 digests of its "
    "2 MiB slices, in order"
)
LEGACY_METHOD = "sha256 of the sha256 digests of the disk's chunk_size slices, in order"


def content_tree_sha256(chunk_digests: Iterable[str]) -> str:
    """The disk's content hash from its chunks' hex sha256 digests, in chunk order."""
    tree = hashlib.sha256()
    for digest in chunk_digests:
        tree.update(bytes.fromhex(digest))
    return tree.hexdigest()


@cache
def _zero_leaf(length: int) -> bytes:
    digest = hashlib.sha256()
    for offset in range(0, length, READ_SIZE):
        digest.update(_ZEROS[: min(READ_SIZE, length - offset)])
    return digest.digest()


def chunk_content_sha256s(chain: vhdcore.Chain, chunk_size: int, method: str = METHOD) -> list[str]:
    """The digest of each `chunk_size` slice of the chain's flattened content, by `method` (METHOD or
    LEGACY_METHOD), read extent by extent so that ranges no layer holds are hashed as zeros without being read, and
    (METHOD) a slice no layer holds is not hashed at all."""
    if method not in (METHOD, LEGACY_METHOD):
        raise ValueError(f"unknown content hash method {method!r}")
    leaf_size = vhdcore.CONTENT_LEAF_SIZE if method == METHOD else chunk_size
    if chunk_size < 1 or chunk_size % leaf_size:
        raise ValueError(f"chunk size {chunk_size} is not a multiple of {leaf_size}")
    extents = chain.map()
    first = 0  # the first extent that may still reach into the next leaf (extents are in disk order)
    leaves: list[bytes] = []
    for start in range(0, chain.virtual_size, leaf_size):
        end = min(start + leaf_size, chain.virtual_size)
        while first < len(extents) and extents[first].start + extents[first].length <= start:
            first += 1
        inside = []
        for extent in extents[first:]:
            if extent.start >= end:
                break
            inside.append(extent)
        if method == METHOD and all(e.layer is None for e in inside):
            leaves.append(_zero_leaf(end - start))
            continue
        digest = hashlib.sha256()
        for extent in inside:
            offset, stop = max(extent.start, start), min(extent.start + extent.length, end)
            while offset < stop:
                length = min(READ_SIZE, stop - offset)
                digest.update(_ZEROS[:length] if extent.layer is None else chain.read(offset, length))
                offset += length
        leaves.append(digest.digest())
    if method == LEGACY_METHOD:
        return [leaf.hex() for leaf in leaves]
    per_chunk = chunk_size // leaf_size
    return [hashlib.sha256(b"".join(leaves[i : i + per_chunk])).hexdigest() for i in range(0, len(leaves), per_chunk)]
