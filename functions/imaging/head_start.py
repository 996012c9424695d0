"""A head start for a job about to run in this process (issue 13: the whole job as users run it).

A command that runs a job on the embedded engine spends its first second importing and starting the engine, on one
core. vhdcore releases the GIL, so the other core can already estimate the chain and, where the image is written in
place, compress the chain into the job's own image file, as the job's Compress step would. The steps take that work
only if it is exactly theirs: the chain is the same files, unchanged since before the head start read them
(`ChainFingerprint`), and the plan is the one the Estimate step staged; anything else is thrown away and done again
by the step. A head start never decides anything the steps decide (locks, layout, the ASL's order): it only does
their work early, where they would have done it.

Only a chain whose files were last modified a while before the head start began is compressed ahead (the rule git
uses for racily clean files): a later write then always gives a different modification time, however coarse the
file system's clock, so a chain written while it was read is never taken for an unchanged one; the change time is
compared too, so a writer that puts the modification time back is seen as well. On Lambda nothing starts a head
start, and the steps find none.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import vhdcore
from functions.imaging.layout import (
    SYNC_BYTES,
    Layout,
    StagedFrame,
    choose_layout,
    record_written,
    spool_key,
    written_prefix,
)
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import is_store_key
from functions.storage import FileObjectStore

QUIET_BEFORE_S = 2.0
"""How long before the head start a chain's files must have last been modified for it to be compressed ahead: more
than the coarsest modification-time resolution of the file systems a chain may live on (FAT's 2 s)."""


class LayerStamp(NamedTuple):
    path: str
    uuid: str
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


class ChainFingerprint(NamedTuple):
    """What work on a chain of local files depends on: each layer's file (path, UUID, inode, size, modification and
    change times) and the parameters of the work."""

    layers: tuple[LayerStamp, ...]
    level: int
    chunk_size: int

    def quiet_since(self, instant_ns: int) -> bool:
        """Whether no layer was modified at or after `instant_ns` (wall clock)."""
        return all(layer.mtime_ns < instant_ns for layer in self.layers)


def chain_fingerprint(chain: vhdcore.Chain, level: int, chunk_size: int) -> ChainFingerprint | None:
    """The chain's fingerprint, or None for a chain that is not all local files."""
    layers = []
    for layer in chain.layers:
        try:
            info = Path(layer.path).stat()
        except OSError:
            return None
        layers.append(LayerStamp(layer.path, layer.uuid, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return ChainFingerprint(tuple(layers), level, chunk_size)


class _CancelledError(Exception):
    """Raised from the frame callback to stop vhdcore's compress of a head start nobody wants any more."""


@dataclass
class _HeadStart:
    job_id: str
    all_blocks: bool = False
    """Every block (no filesystem-aware imaging), as the job will plan."""
    planned: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    fingerprint: ChainFingerprint | None = None
    estimate: vhdcore.Estimate | None = None
    plan: vhdcore.ImagePlan | None = None
    plan_json: str | None = None
    frames: list[StagedFrame] = field(default_factory=list)
    compressed: bool = False


_current: _HeadStart | None = None
_lock = threading.Lock()


def begin(
    services: ImagingServices,
    job_id: str,
    leaf: str,
    *,
    all_blocks: bool = False,
    quiet_before_s: float = QUIET_BEFORE_S,
) -> None:
    """Start the head start of job `job_id` on the chain of the local file `leaf` (one per process: a new one
    replaces an earlier one nobody took), planning as the job will: live data only, or every block with
    `all_blocks`. Failures are left for the steps to meet and report."""
    global _current
    if is_store_key(leaf):
        return
    head = _HeadStart(job_id, all_blocks=all_blocks)
    started_ns = time.time_ns()
    with _lock:
        previous, _current = _current, head
    if previous is not None:
        previous.cancelled.set()
    quiet_since_ns = started_ns - _ns(quiet_before_s)
    threading.Thread(target=_run, args=(services, head, leaf, quiet_since_ns), name="head-start", daemon=True).start()


def _run(services: ImagingServices, head: _HeadStart, leaf: str, quiet_since_ns: int) -> None:
    config = services.config
    try:
        chain = vhdcore.open_chain(leaf)
        head.fingerprint = chain_fingerprint(chain, config.level, config.chunk_size)
        if head.fingerprint is None:
            return
        usage = None if head.all_blocks else chain.usage()
        head.estimate = chain.estimate(level=config.level, chunk_size=config.chunk_size, usage=usage)
        store = services.store
        if not isinstance(store, FileObjectStore) or choose_layout(services, leaf) is not Layout.IN_PLACE:
            return
        if not head.fingerprint.quiet_since(quiet_since_ns):
            return
        plan = head.plan = chain.plan(config.chunk_size, usage=usage)
        head.plan_json = plan.to_json()
        head.planned.set()
        batch: list[StagedFrame] = []

        def on_frame(frame: vhdcore.ChunkFrame) -> None:
            if head.cancelled.is_set():
                raise _CancelledError
            batch.append(StagedFrame.of(frame, offset=frame.object_offset))

        def on_durable(end: int) -> None:
            record_written(services, head.job_id, batch)
            head.frames.extend(batch)
            batch.clear()

        chain.compress_chunks_into(
            plan,
            0,
            len(plan.chunks),
            str(store.spool_path(spool_key(head.job_id))),
            plan.head_room,
            level=config.level,
            digest="content",
            sync_bytes=SYNC_BYTES,
            on_frame=on_frame,
            on_durable=on_durable,
        )
        head.compressed = True
    except Exception:  # the step does the work again and reports what it meets
        head.compressed = False
    finally:
        head.planned.set()
        head.finished.set()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _of_this_chain(chain: vhdcore.Chain, level: int, chunk_size: int, all_blocks: bool) -> _HeadStart | None:
    """The head start, once planned, if it was made of this very chain in this mode (else None)."""
    head = _current
    if head is None:
        return None
    head.planned.wait()
    fingerprint = chain_fingerprint(chain, level, chunk_size)
    mine = fingerprint is not None and head.fingerprint == fingerprint and head.all_blocks == all_blocks
    return head if mine else None


def estimate_for(
    chain: vhdcore.Chain, level: int, chunk_size: int, *, all_blocks: bool = False
) -> vhdcore.Estimate | None:
    """The head start's estimate, if it is of this very chain and mode (waiting for it if it is still being
    made)."""
    head = _of_this_chain(chain, level, chunk_size, all_blocks)
    return head.estimate if head is not None else None


def plan_for(
    job_id: str, chain: vhdcore.Chain, level: int, chunk_size: int, *, all_blocks: bool = False
) -> vhdcore.ImagePlan | None:
    """The plan job `job_id`'s head start is compressing, if it is of this very chain and mode: the Estimate step
    stages it (a plan made anew would name another image UUID, and the frames written ahead would not be its)."""
    head = _of_this_chain(chain, level, chunk_size, all_blocks)
    return head.plan if head is not None and head.job_id == job_id else None


def take_frames(
    services: ImagingServices, job_id: str, plan: vhdcore.ImagePlan, chain: vhdcore.Chain
) -> list[StagedFrame]:
    """The frames the head start of `job_id` wrote into its image file, recorded as durable, if they are exactly
    what the Compress step of this plan would write: waits for it to end. Otherwise its records and image file are
    removed (the step writes them anew) and the list is empty."""
    global _current
    with _lock:
        head = _current if _current is not None and _current.job_id == job_id else None
        if head is not None:
            _current = None
    if head is None:
        return []
    head.finished.wait()
    config = services.config
    unchanged = chain_fingerprint(chain, config.level, config.chunk_size)
    if head.compressed and head.plan_json == plan.to_json() and unchanged == head.fingerprint:
        return list(head.frames)
    _discard(services, job_id)
    return []


def end(services: ImagingServices) -> None:
    """Stop a head start nobody took (its job failed before compressing) and remove what it wrote."""
    global _current
    with _lock:
        head, _current = _current, None
    if head is None:
        return
    head.cancelled.set()
    head.finished.wait()
    _discard(services, head.job_id)


def _discard(services: ImagingServices, job_id: str) -> None:
    store = services.store
    store.delete_many([info.key for info in store.list_objects(written_prefix(job_id))] + [spool_key(job_id)])
