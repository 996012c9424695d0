"""Cutting an object into multipart parts that respect S3's limits (5 MiB minimum except the last, 5 GiB maximum,
10,000 parts), either along an image's zstd frame boundaries or in plain fixed-size pieces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from functions.storage.errors import PartPlanError
from functions.storage.objects import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE

DEFAULT_PART_SIZE = 16 * 1024**2
"""Large enough that per-request costs vanish, small enough that concurrency * part size stays modest in memory."""


@dataclass(frozen=True)
class PartPlan:
    """Part `number` (1-based) holds the object's bytes [offset, offset + length)."""

    number: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _part_floor(total_size: int, target: int) -> int:
    """The smallest part size that keeps a plan within 10,000 parts: full parts are at least this, so at most
    9,999 of them fit, plus the final short one."""
    return max(target, MIN_PART_SIZE, -(-total_size // (MAX_PARTS - 1)))


def plan_fixed_parts(total_size: int, part_size: int = DEFAULT_PART_SIZE) -> list[PartPlan]:
    """Plain parts of `part_size` (raised if needed to stay within 10,000 parts); an empty file gets one empty part."""
    if total_size < 0:
        raise PartPlanError(f"a file size cannot be negative, got {total_size}")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise PartPlanError(f"part size {part_size} is outside {MIN_PART_SIZE}..{MAX_PART_SIZE}")
    size = _part_floor(total_size, part_size)
    if size > MAX_PART_SIZE:
        raise PartPlanError(f"{total_size} bytes do not fit in {MAX_PARTS} parts of at most {MAX_PART_SIZE}")
    if total_size == 0:
        return [PartPlan(1, 0, 0)]
    return [
        PartPlan(number, offset, min(size, total_size - offset))
        for number, offset in enumerate(range(0, total_size, size), start=1)
    ]


def plan_frame_parts(frame_sizes: Sequence[int], target_part_size: int = DEFAULT_PART_SIZE) -> list[PartPlan]:
    """Group consecutive frames (the image's independent zstd frames, in object order) into parts of at least
    `target_part_size` (raised if needed to stay within 10,000 parts), so that every part boundary is a frame
    boundary. A frame larger than 5 GiB cannot be placed and is an error."""
    if any(size < 0 for size in frame_sizes):
        raise PartPlanError("a frame size cannot be negative")
    total = sum(frame_sizes)
    target = _part_floor(total, target_part_size)
    if target > MAX_PART_SIZE:
        raise PartPlanError(f"{total} bytes do not fit in {MAX_PARTS} parts of at most {MAX_PART_SIZE}")
    parts: list[PartPlan] = []
    start = offset = 0
    for index, size in enumerate(frame_sizes):
        if size > MAX_PART_SIZE:
            raise PartPlanError(f"frame {index} has {size} bytes, more than a part may hold ({MAX_PART_SIZE})")
        if offset - start + size > MAX_PART_SIZE:
            parts.append(PartPlan(len(parts) + 1, start, offset - start))
            start = offset
        offset += size
        if offset - start >= target:
            parts.append(PartPlan(len(parts) + 1, start, offset - start))
            start = offset
    if offset > start or not parts:
        parts.append(PartPlan(len(parts) + 1, start, offset - start))
    check_plan(parts, total)
    return parts


def check_plan(parts: Sequence[PartPlan], total_size: int) -> None:
    """Raise PartPlanError unless `parts` are numbered 1..n, cover [0, total_size) contiguously and fit S3's limits."""
    if not parts:
        raise PartPlanError("a plan needs at least one part")
    if len(parts) > MAX_PARTS:
        raise PartPlanError(f"{len(parts)} parts exceed S3's {MAX_PARTS}")
    expected_offset = 0
    for index, part in enumerate(parts):
        if part.number != index + 1:
            raise PartPlanError(f"part {index + 1} is numbered {part.number}")
        if part.offset != expected_offset:
            raise PartPlanError(f"part {part.number} starts at {part.offset}, expected {expected_offset}")
        if part.length > MAX_PART_SIZE:
            raise PartPlanError(f"part {part.number} has {part.length} bytes, more than {MAX_PART_SIZE}")
        if index < len(parts) - 1 and part.length < MIN_PART_SIZE:
            raise PartPlanError(f"part {part.number} has {part.length} bytes, less than {MIN_PART_SIZE}")
        expected_offset = part.end
    if expected_offset != total_size:
        raise PartPlanError(f"the parts cover {expected_offset} bytes, the file has {total_size}")
