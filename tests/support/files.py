"""Small file helpers for the tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_files(paths: Iterable[str | os.PathLike[str]]) -> dict[str, tuple[str, int, int]]:
    """sha256, size and mtime (ns) of each file, to prove that nothing touched them."""
    out: dict[str, tuple[str, int, int]] = {}
    for p in paths:
        st = Path(p).stat()
        out[str(p)] = (sha256_file(p), st.st_size, st.st_mtime_ns)
    return out


def supports_sparse_files(folder: Path) -> bool:
    """True when `folder`'s file system stores holes (so a sparse export can be checked)."""
    probe = folder / ".sparse-probe"
    with probe.open("wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    try:
        return probe.stat().st_blocks * 512 < 1024 * 1024
    finally:
        probe.unlink()


def chunk_content_sha256(chunk: bytes, leaf_size: int = 2 * 1024**2) -> str:
    """A chunk's content digest, computed independently of the product: the sha256 of the sha256 digests of its
    `leaf_size` slices (README, "Image format")."""
    leaves = b"".join(hashlib.sha256(chunk[at : at + leaf_size]).digest() for at in range(0, len(chunk), leaf_size))
    return hashlib.sha256(leaves).hexdigest()


def content_tree_sha256(flat: bytes, chunk_size: int) -> str:
    """The manifest's content hash, computed independently of the product: the sha256 of the chunks' digests."""
    tree = hashlib.sha256()
    for start in range(0, len(flat), chunk_size):
        tree.update(bytes.fromhex(chunk_content_sha256(flat[start : start + chunk_size])))
    return tree.hexdigest()
