"""Typed stubs of the native module built from rust_core/crates/vhdcore-py."""

from collections.abc import Callable, Sequence
from typing import Any, Literal, final

from vhdcore import LayerReader

DiskType = Literal["fixed", "dynamic", "differencing"]
ExportFormat = Literal["raw", "vhd"]

CONTENT_LEAF_SIZE: int
"""Bytes of disk content per leaf of a chunk's content digest: the digest is the sha256 of its slices' sha256s."""
DEFAULT_BLOCK_SIZE: int
DEFAULT_CHUNK_SIZE: int
DEFAULT_LEVEL: int
MAX_CHAIN_DEPTH: int
MAX_VIRTUAL_SIZE: int

class VhdError(Exception):
    """Root of every error vhdcore raises. `kind` is a stable machine name."""

    kind: str
    path: str | None
    field: str | None
    offset: int | None

class VhdIoError(VhdError): ...
class VhdFormatError(VhdError): ...
class ChecksumError(VhdFormatError): ...
class TruncatedError(VhdFormatError): ...
class BatError(VhdFormatError): ...
class UnsupportedError(VhdFormatError): ...
class ChainError(VhdError): ...
class MissingParentError(ChainError): ...
class ParentMismatchError(ChainError): ...
class ChainCycleError(ChainError): ...
class ChainTooDeepError(ChainError): ...
class InvalidArgumentError(VhdError): ...

class CoalescePendingError(ChainError):
    """A coalesce of the chain was interrupted and its journal is pending; run coalesce to finish it."""

@final
class Layer:
    path: str
    disk_type: DiskType
    virtual_size: int
    file_size: int
    block_size: int | None
    max_table_entries: int
    allocated_blocks: int
    uuid: str
    timestamp: int
    creator_app: str
    legacy_footer: bool
    parent_uuid: str | None
    parent_name: str | None
    parent_timestamp: int | None
    def to_dict(self) -> dict[str, Any]: ...

@final
class Extent:
    start: int
    length: int
    layer: int | None
    """Index into Chain.layers (0 = leaf), or None when no layer holds the range (reads as zeros)."""

@final
class ExportStats:
    format: str
    virtual_size: int
    bytes_written: int
    data_bytes: int
    zero_bytes: int
    seconds: float

@final
class Diff:
    ranges: list[tuple[int, int]]
    total: int
    shared_layers: int

@final
class Problem:
    kind: str
    path: str
    field: str | None
    offset: int | None
    message: str

@final
class SourceRead:
    """One contiguous read of a layer's file: whole blocks with their bitmaps, or a fixed layer's bytes."""

    layer: int
    file_offset: int
    length: int
    first_block: int
    blocks: int

@final
class ChunkPlan:
    index: int
    start: int
    length: int
    reads: list[SourceRead]
    unallocated: list[tuple[int, int]]
    read_bytes: int
    free: list[tuple[int, int]]

@final
class ImagePlan:
    """The flattened disk cut into chunks, each with the reads that hold its data (from metadata alone)."""

    @property
    def virtual_size(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def layer_paths(self) -> list[str]: ...
    @property
    def chunks(self) -> list[ChunkPlan]: ...
    @property
    def head_room(self) -> int:
        """Bytes kept at the image's start for its head frame (compressed last) and the skippable frame after it."""
    @property
    def free_bytes(self) -> int:
        """Bytes stored as zeros because a filesystem proves them free (0 for a plan of every block)."""
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(text: str) -> ImagePlan: ...
    def __len__(self) -> int: ...

@final
class ChunkFrame:
    """One independent zstd frame of the image; `index` is None for the head (footer copy, header, BAT).

    In ImageStats the frames are already in the image file: `frame` is empty there, and `object_offset` and
    `compressed_bytes` say where each one is.
    """

    index: int | None
    frame: bytes
    logical_bytes: int
    sha256: str | None
    """Of the bytes the frame decompresses to (digest "image"; always for the head and in ImageStats)."""
    content_sha256: str | None
    """Of the chunk's disk content (digest "content"): the flattened disk's bytes in its range, zeros included, as the
    sha256 of the sha256 of each CONTENT_LEAF_SIZE slice, in order."""
    crc32c: int
    stored_blocks: list[int]
    virtual_bytes: int
    read_bytes: int
    compressed_bytes: int
    object_offset: int | None

@final
class ImageStats:
    level: int
    virtual_size: int
    image_bytes: int
    compressed_bytes: int
    data_bytes: int
    read_bytes: int
    head: ChunkFrame
    chunks: list[ChunkFrame]
    seconds: float

@final
class Estimate:
    """Predicted size of the compressed image (a point, and a low-high range meant to hold the truth) and time."""

    level: int
    virtual_size: int
    allocated_bytes: int
    unallocated_bytes: int
    sampled_bytes: int
    samples: int
    spans: int
    zero_fraction: float
    estimated_nonzero_bytes: int
    candidate_blocks: int
    image_blocks: int
    image_bytes: int
    compressed_bytes: int
    low: int
    high: int
    context_correction: float
    sampling_error: float
    correction_error: float
    seconds_spent: float
    predicted_seconds: float
    threads: int

@final
class Partition:
    """A partition (or the whole disk without a table) and what a live-data image does with it."""

    index: int
    start: int
    length: int
    type_id: str
    filesystem: str
    decision: Literal["dropped", "keep_whole"]
    reason: str | None
    used_bytes: int
    free_bytes: int

@final
class DiskUsage:
    """What the flattened disk's partitions and filesystems prove free (``Chain.usage()``)."""

    @property
    def size(self) -> int: ...
    @property
    def table(self) -> Literal["none", "mbr", "gpt"]: ...
    @property
    def partitions(self) -> list[Partition]: ...
    @property
    def free(self) -> list[tuple[int, int]]: ...
    @property
    def free_bytes(self) -> int: ...
    @property
    def warnings(self) -> list[str]: ...
    def is_free(self, start: int, length: int) -> bool: ...
    def free_within(self, start: int, length: int) -> int: ...
    def free_blocks(self, block_size: int) -> list[bool]: ...
    def to_json(self) -> str: ...

@final
class Chain:
    layers: list[Layer]
    virtual_size: int
    warnings: list[str]
    @property
    def depth(self) -> int: ...
    @property
    def leaf(self) -> Layer: ...
    def map(self) -> list[Extent]: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def export(
        self,
        out: str,
        format: ExportFormat = "raw",
        progress: Callable[[int, int], None] | None = None,
        usage: DiskUsage | None = None,
    ) -> ExportStats: ...
    def usage(self) -> DiskUsage: ...
    def plan(self, chunk_size: int = 67108864, usage: DiskUsage | None = None) -> ImagePlan: ...
    def compress(
        self,
        out: str,
        level: int = 3,
        chunk_size: int = 67108864,
        progress: Callable[[int, int], None] | None = None,
        usage: DiskUsage | None = None,
    ) -> ImageStats: ...
    def compress_chunk(
        self, plan: ImagePlan, index: int, level: int = 3, digest: ChunkDigest = "image"
    ) -> ChunkFrame: ...
    def compress_chunks_into(
        self,
        plan: ImagePlan,
        first: int,
        count: int,
        out: str,
        offset: int,
        level: int = 3,
        digest: ChunkDigest = "content",
        sync_bytes: int = 268435456,
        on_frame: Callable[[ChunkFrame], None] | None = None,
        on_durable: Callable[[int], None] | None = None,
    ) -> int:
        """Compress chunks first..first+count-1 into `out` in place, frames in order from `offset`; the end."""
    def estimate(
        self, level: int = 3, chunk_size: int = 67108864, seed: int | None = None, usage: DiskUsage | None = None
    ) -> Estimate: ...
    def snapshot_bytes(self, relative_parent: str) -> bytes: ...
    def merge_layout(self, layer: int) -> MergeLayout: ...
    def merged_block(self, layer: int, index: int) -> bytes: ...

@final
class MergeLayout:
    size: int
    uuid: str
    added_bytes: int
    merged_bytes: int
    segments: list[tuple[Literal["copy", "block", "bytes"], int, int, int | None, bytes | None]]

ChunkDigest = Literal["image", "content"]
"""Which sha256 a compressed chunk carries: of the bytes its frame decompresses to, or of its disk content."""

CoalescePhase = Literal["copy", "relink", "remove"]

@final
class CoalesceMerge:
    """One read-only layer merged into its parent (its child relinked to the parent, the layer deleted)."""

    layer: str
    parent: str
    child: str
    duplicate_bytes: int
    """Bytes of the parent that the layer overwrote: stored twice before the merge."""
    bytes_copied: int
    file_bytes_freed: int
    """Size of the deleted layer file."""
    file_bytes_added: int
    """Growth of the parent and child files."""

@final
class PendingMerge:
    layer: str
    parent: str
    phase: CoalescePhase
    bytes_copied: int
    bytes_total: int

@final
class SkippedLayer:
    layer: str
    reason: str

@final
class CoalesceStep:
    done: bool
    """Nothing is left to merge and no journal is pending."""
    recovered: bool
    """The step finished a journal left by an interrupted run."""
    merges: list[CoalesceMerge]
    bytes_copied: int
    pending: PendingMerge | None
    skipped: list[SkippedLayer]
    depth: int

@final
class CoalesceReport:
    merges: list[CoalesceMerge]
    steps: int
    recovered: bool
    skipped: list[SkippedLayer]
    depth_before: int
    depth: int
    duplicate_bytes: int
    bytes_copied: int
    file_bytes_freed: int
    file_bytes_added: int

def coalesce_step(
    leaf: str,
    siblings: Sequence[str],
    budget_bytes: int | None = None,
    budget_seconds: float | None = None,
) -> CoalesceStep: ...
def coalesce(leaf: str, siblings: Sequence[str], step_bytes: int | None = None) -> CoalesceReport:
    """Merge the chain's read-only layers; `siblings` are the files that may be other children of its layers."""

def open_chain(path: str, max_depth: int = 30) -> Chain: ...
def open_chain_from(reader: LayerReader, leaf: str, max_depth: int = 30, layers: list[str] | None = None) -> Chain: ...
def check(path: str, max_depth: int = 30) -> list[Problem]: ...
def diff(old: str, new: str, max_depth: int = 30) -> Diff: ...
def create(
    path: str, size: int, disk_type: Literal["fixed", "dynamic"] = "dynamic", block_size: int = ...
) -> Layer: ...
def snapshot(parent: str, child: str) -> Layer: ...
def write(path: str, offset: int, data: bytes) -> None: ...
def restamp(path: str) -> int:
    """Mark the layer as changed: its footer timestamp becomes now (always later than before); returns it."""

def set_uuid(path: str, uuid: str | None = None) -> str:
    """Give the disk a new identity: `uuid` (a new random one when None) in its footer and, for a dynamic or
    differencing disk, the footer's copy at offset 0, with their checksums; returns it. The content is unchanged.
    A layer that has children loses them (they name their parent by UUID)."""

def children(path: str, candidates: Sequence[str]) -> list[str]:
    """The candidates that are differencing children of the layer at `path` (their parent UUID is its UUID)."""

def compress_fetched_chunk(
    plan: ImagePlan, index: int, reads: list[bytes], level: int = 3, digest: ChunkDigest = "image"
) -> ChunkFrame: ...
def compress_head(plan: ImagePlan, chunks: list[tuple[list[int], int]], level: int = 3) -> ChunkFrame: ...
def head_region(head_frame: bytes, room: int) -> bytes:
    """The head frame followed by the header of the skippable frame that fills the rest of `room`."""
