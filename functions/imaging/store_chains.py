"""Chains that live in the object store (DESIGN §3, §4): layers named by their keys (`sr/<server>/<uuid>.vhd`),
read by ranged GETs, a snapshot's new leaf written as a new object.

vhdcore opens such a chain through `StoreLayerReader` (parents found by the keys their locators give relative to
the child's key, checked by UUID); its metadata reads are small and many, so they go through a small LRU of aligned
pages. Map workers fetch each chunk's planned reads with `StoreChunkReads`: ranged GETs, in parallel, bounded.
"""

from __future__ import annotations

import posixpath
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from urllib.parse import unquote

import vhdcore
from functions.imaging.errors import DiskCorruptError, DiskMissingError, InvalidRequestError, domain_error
from functions.storage import InvalidKeyError, ObjectNotFoundError, ObjectStore, StorageError
from functions.storage.objects import validate_key

PAGE_SIZE = 64 * 1024
"""Reads up to this size (headers, BAT slices, bitmaps, estimate samples) are served from aligned cached pages."""
CACHE_PAGES = 256
"""Pages kept per reader: 16 MiB, a chain's metadata and a few samples' neighbourhoods."""
FETCH_PIECE = 8 * 1024**2
"""A planned read is fetched in ranged GETs of at most this many bytes, side by side."""
FETCH_CONCURRENCY = 8
"""Ranged GETs in flight per Map worker: enough to fill a link with S3's per-request latency, bounded in memory
(at most this many pieces beyond the chunks being compressed)."""


def is_store_key(location: str) -> bool:
    """A disk location is a local file when absolute, else a key in the configured object store."""
    return not location.startswith("/")


def disk_location(store: ObjectStore, given: str, *, local_exists: bool) -> str:
    """What to record for a disk given as a local path (`local_exists`: it names a file here), a store key, or a URL
    inside the configured store (`s3://bucket/prefix/sr/web1/leaf.vhd`); InvalidRequestError otherwise."""
    if local_exists:
        return posixpath.abspath(given)
    root = store.url.rstrip("/") + "/"
    if "://" in given:
        if not given.startswith(root):
            raise InvalidRequestError(f"{given} is not inside the configured store {store.url}")
        given = unquote(given[len(root) :])
    try:
        return validate_key(given)
    except InvalidKeyError as error:
        raise InvalidRequestError(f"{given!r} is neither a file nor a key of the store: {error}") from error


class StoreLayerReader:
    """vhdcore's LayerReader over an object store: `size` by HEAD, `read` by ranged GET (small reads cached)."""

    def __init__(self, store: ObjectStore, *, page_size: int = PAGE_SIZE, cache_pages: int = CACHE_PAGES) -> None:
        self._store = store
        self._page_size = page_size
        self._cache_pages = cache_pages
        self._pages: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.storage_error: StorageError | None = None
        """The last storage failure seen (vhdcore reports it as an I/O error; the caller may want the cause)."""

    def size(self, name: str, /) -> int | None:
        try:
            return self._store.head(name).size
        except (ObjectNotFoundError, InvalidKeyError):
            return None
        except StorageError as error:
            self.storage_error = error
            raise

    def read(self, name: str, offset: int, length: int, /) -> bytes:
        try:
            if length > self._page_size:
                return self._get(name, offset, length)
            first, last = offset // self._page_size, (offset + length - 1) // self._page_size
            joined = b"".join(self._page(name, index) for index in range(first, last + 1))
            start = offset - first * self._page_size
            return joined[start : start + length]
        except StorageError as error:
            self.storage_error = error
            raise

    def _page(self, name: str, index: int) -> bytes:
        key = (name, index)
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
                return page
        page = self._store.get_range(name, index * self._page_size, self._page_size)
        with self._lock:
            self._pages[key] = page
            while len(self._pages) > self._cache_pages:
                self._pages.popitem(last=False)
        return page

    def _get(self, name: str, offset: int, length: int) -> bytes:
        return self._store.get_range(name, offset, length)


def open_store_chain(store: ObjectStore, leaf: str, layers: Sequence[str] | None = None) -> vhdcore.Chain:
    """The chain whose leaf is the key `leaf`; DiskMissingError / DiskCorruptError as for files, a storage failure
    re-raised as itself (the workflow retries or reports it as the store's, not the disk's)."""
    reader = StoreLayerReader(store)
    try:
        return vhdcore.open_chain_from(reader, leaf, layers=list(layers) if layers else None)
    except vhdcore.VhdIoError as error:  # a read of the store failed: the store's error, or a missing object
        cause = reader.storage_error
        if isinstance(cause, ObjectNotFoundError) or (cause is None and reader.size(leaf) is None):
            raise DiskMissingError(f"disk {leaf}: no such object in {store.url}") from error
        if cause is not None:
            raise cause from error
        raise domain_error(error) from error
    except vhdcore.VhdError as error:
        raise domain_error(error) from error


def relative_key(parent: str, child: str) -> str:
    """How `child`'s locators name `parent`: relative to the child's folder, as a snapshot of files does."""
    return "./" + posixpath.relpath(parent, posixpath.dirname(child) or ".")


def snapshot_in_store(store: ObjectStore, chain: vhdcore.Chain, new_key: str) -> None:
    """Write `new_key`, an empty differencing child of the chain's leaf (a new object: never overwrites one)."""
    data = chain.snapshot_bytes(relative_key(chain.leaf.path, new_key))
    store.put(new_key, data, if_none_match=True)


_fetch_pool: ThreadPoolExecutor | None = None
_fetch_pool_lock = threading.Lock()


def _shared_fetch_pool() -> ThreadPoolExecutor:
    """One bounded pool of ranged GETs per process, shared by a worker's chunk threads (idle threads cost nothing)."""
    global _fetch_pool
    with _fetch_pool_lock:
        if _fetch_pool is None:
            _fetch_pool = ThreadPoolExecutor(max_workers=FETCH_CONCURRENCY, thread_name_prefix="fetch")
        return _fetch_pool


class StoreChunkReads:
    """A Map worker's fetcher for a chain in the store: each chunk's planned reads by ranged GETs, cut into pieces
    fetched side by side on `pool` (by default one per process, FETCH_CONCURRENCY GETs in flight)."""

    def __init__(self, store: ObjectStore, plan: vhdcore.ImagePlan, pool: Executor | None = None) -> None:
        self._store = store
        self._names = plan.layer_paths
        self._pool = pool if pool is not None else _shared_fetch_pool()

    def fetch(self, chunk: vhdcore.ChunkPlan) -> list[bytes]:
        """The chunk's source reads, in plan order."""
        pieces = [
            [
                self._pool.submit(
                    self._piece, read.layer, start, min(FETCH_PIECE, read.file_offset + read.length - start)
                )
                for start in range(read.file_offset, read.file_offset + read.length, FETCH_PIECE)
            ]
            for read in chunk.reads
        ]
        return [b"".join(future.result() for future in futures) for futures in pieces]

    def _piece(self, layer: int, start: int, length: int) -> bytes:
        name = self._names[layer]
        try:
            data = self._store.get_range(name, start, length)
        except ObjectNotFoundError as error:
            raise DiskMissingError(f"layer {name} of the frozen chain is gone") from error
        if len(data) != length:
            raise DiskCorruptError(f"{name}: read {len(data)} of {length} bytes at offset {start}")
        return data
