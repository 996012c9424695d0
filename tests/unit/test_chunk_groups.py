"""The Map's items (DESIGN §3): chunks grouped in order, each group within the byte budget, an oversized chunk
alone (functions/imaging/planning.py)."""

from __future__ import annotations

from functions.imaging.planning import ChunkGroup, group_chunks


def test_chunk_groups_cover_the_plan_in_order_within_the_byte_budget() -> None:
    assert group_chunks([], 10) == []
    assert group_chunks([4, 4, 4, 4, 3], 8) == [ChunkGroup(0, 2), ChunkGroup(2, 2), ChunkGroup(4, 1)]
    assert group_chunks([20, 1, 1], 8) == [ChunkGroup(0, 1), ChunkGroup(1, 2)]  # an oversized chunk goes alone
