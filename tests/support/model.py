"""A plain in-memory model of a VHD chain, to check flatten, map and diff against.

The model is the flattened disk as a bytearray plus, per sector, the depth (0 = base) of the last layer that wrote
it. From that it derives which layer `Chain.map()` must name for each sector and which byte ranges `diff` must
report, following the vhdcore contract: a differencing layer holds exactly the sectors written into it (partial
sectors are read-modify-written, so the whole sector is held); a fixed base holds everything; an allocated block of a
dynamic base holds its whole block (an implementation may leave a block unallocated when only zeros were written).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

SECTOR = 512


class ExtentLike(Protocol):
    start: int
    length: int
    layer: int | None


@dataclass
class ChainModel:
    virtual_size: int
    base_type: Literal["fixed", "dynamic"]
    base_block_size: int
    data: bytearray = field(init=False)
    depth: int = 1  # number of layers
    top_writer: list[int] = field(init=False)  # per sector: depth of the last writer, -1 = never written
    base_touched_blocks: set[int] = field(default_factory=set)
    base_nonzero_blocks: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.data = bytearray(self.virtual_size)
        self.top_writer = [-1] * (self.virtual_size // SECTOR)

    def write(self, offset: int, payload: bytes) -> None:
        """Apply a write to the leaf (depth - 1)."""
        if not payload:
            return
        end = offset + len(payload)
        assert offset >= 0 and end <= self.virtual_size
        self.data[offset:end] = payload
        layer = self.depth - 1
        first, last = offset // SECTOR, (end - 1) // SECTOR
        for s in range(first, last + 1):
            self.top_writer[s] = layer
        if layer == 0 and self.base_type == "dynamic":
            bs = self.base_block_size
            for b in range(offset // bs, (end - 1) // bs + 1):
                self.base_touched_blocks.add(b)
                lo, hi = max(offset, b * bs), min(end, (b + 1) * bs)
                if any(payload[lo - offset : hi - offset]):
                    self.base_nonzero_blocks.add(b)

    def snapshot(self) -> bytes:
        """Freeze the leaf: a new empty layer goes on top. Returns the frozen content."""
        frozen = bytes(self.data)
        self.depth += 1
        return frozen

    def allowed_owners(self, sector: int) -> set[int | None]:
        """Layers (by depth, 0 = base) that map() may name for `sector`; None = no layer holds it."""
        t = self.top_writer[sector]
        if t >= 1:
            return {t}
        if self.base_type == "fixed":
            return {0}
        block = sector * SECTOR // self.base_block_size
        if block in self.base_nonzero_blocks:
            return {0}
        if block in self.base_touched_blocks:
            return {0, None}
        return {None}


def owners_from_extents(extents: Sequence[ExtentLike], virtual_size: int, depth: int) -> list[int | None]:
    """Check the shape of a map (contiguous, covering, sector multiples, merged) and return per-sector owners as
    depths (0 = base), converting from vhdcore's leaf-first layer indexes."""
    pos = 0
    owners: list[int | None] = []
    previous: object = object()
    for ext in extents:
        assert ext.start == pos, f"extent starts at {ext.start}, expected {pos} (gap or overlap)"
        assert ext.length > 0, f"empty extent at {ext.start}"
        assert ext.start % SECTOR == 0 and ext.length % SECTOR == 0, f"extent {ext.start}+{ext.length} not in sectors"
        assert ext.layer is None or 0 <= ext.layer < depth, f"extent layer {ext.layer} out of range (depth {depth})"
        assert ext.layer != previous, f"adjacent extents with the same layer {ext.layer} not merged at {ext.start}"
        previous = ext.layer
        owner = None if ext.layer is None else depth - 1 - ext.layer
        owners.extend([owner] * (ext.length // SECTOR))
        pos += ext.length
    assert pos == virtual_size, f"extents cover {pos} bytes, disk has {virtual_size}"
    return owners


def diff_ranges(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """Sorted, merged (start, length) byte ranges, in whole sectors, where `old` and `new` differ."""
    assert len(old) == len(new)
    ranges: list[tuple[int, int]] = []
    start: int | None = None
    for s in range(len(old) // SECTOR):
        lo = s * SECTOR
        differs = old[lo : lo + SECTOR] != new[lo : lo + SECTOR]
        if differs and start is None:
            start = lo
        elif not differs and start is not None:
            ranges.append((start, lo - start))
            start = None
    if start is not None:
        ranges.append((start, len(old) - start))
    return ranges


def assert_ranges_shape(ranges: Iterable[tuple[int, int]], virtual_size: int) -> None:
    """Ranges are sorted, disjoint, non-adjacent (merged), non-empty, whole sectors, inside the disk."""
    end = -1
    for start, length in ranges:
        assert length > 0, f"empty range at {start}"
        assert start % SECTOR == 0 and length % SECTOR == 0, f"range {start}+{length} not in whole sectors"
        assert start > end, f"range at {start} not sorted/merged after end {end}"
        end = start + length
        assert end <= virtual_size
