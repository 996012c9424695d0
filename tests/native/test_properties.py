"""Property-based tests (acceptance 2): random creates, snapshots and writes over chains up to depth 8 flatten,
map and diff exactly as a plain in-memory model of the disk says."""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vhdcore
from tests.support import pyvhd
from tests.support.model import ChainModel, assert_ranges_shape, diff_ranges, owners_from_extents

pytestmark = pytest.mark.native

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
MAX_DEPTH = 8
# Bounded so the native suite stays within minutes; raise it for a bug hunt (VHDCORE_PROPERTY_EXAMPLES=2000).
EXAMPLES = int(os.environ.get("VHDCORE_PROPERTY_EXAMPLES", "60"))


@dataclass(frozen=True)
class Write:
    offset: int
    length: int
    kind: Literal["random", "zeros", "byte", "same"]  # same: rewrite what the disk already holds
    seed: int


@dataclass(frozen=True)
class Snapshot:
    pass


Op = Write | Snapshot


@st.composite
def writes(draw: st.DrawFn, size: int, block: int) -> Write:
    shape = draw(st.sampled_from(["sector", "sectors", "unaligned", "cross_block", "tail", "tiny"]))
    if shape == "sector":
        offset = draw(st.integers(0, size // SECTOR - 1)) * SECTOR
        length = SECTOR
    elif shape == "sectors":
        count = draw(st.integers(1, 64))
        offset = draw(st.integers(0, size // SECTOR - 1)) * SECTOR
        length = min(count * SECTOR, size - offset)
    elif shape == "unaligned":
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(3 * SECTOR + 17, size - offset)))
    elif shape == "cross_block":
        boundary = draw(st.integers(1, max(1, (size - 1) // block))) * block
        before = draw(st.integers(0, min(boundary, 5000)))
        offset = boundary - before
        length = draw(st.integers(1, min(before + 5000, size - offset))) if offset < size else 1
        if offset >= size:
            offset, length = size - 1, 1
    elif shape == "tail":
        length = draw(st.integers(1, min(4 * SECTOR, size)))
        offset = size - length
    else:
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(7, size - offset)))
    kinds: list[Literal["random", "zeros", "byte", "same"]] = ["random", "random", "random", "zeros", "byte", "same"]
    kind = draw(st.sampled_from(kinds))
    return Write(offset, length, kind, draw(st.integers(0, 2**32 - 1)))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[str, int, int, list[Op]]:
    disk_type = draw(st.sampled_from(["dynamic", "dynamic", "fixed"]))
    block = draw(st.sampled_from([512 * KiB, 1 * MiB, 2 * MiB]))
    requested = draw(st.integers(1 * MiB, 8 * MiB))
    size = (requested + SECTOR - 1) // SECTOR * SECTOR
    n_ops = draw(st.integers(1, 30))
    snapshot_odds = draw(st.sampled_from([2, 4, 8]))  # 1 in N operations is a snapshot: deep and shallow chains
    ops: list[Op] = []
    depth = 1
    for _ in range(n_ops):
        if depth < MAX_DEPTH and draw(st.integers(1, snapshot_odds)) == 1:
            ops.append(Snapshot())
            depth += 1
        else:
            ops.append(draw(writes(size, block)))
    return disk_type, block, requested, ops


def payload_for(op: Write, model: ChainModel) -> bytes:
    if op.kind == "zeros":
        return bytes(op.length)
    if op.kind == "byte":
        return bytes([op.seed % 255 + 1]) * op.length
    if op.kind == "same":
        return bytes(model.data[op.offset : op.offset + op.length])
    return random.Random(op.seed).randbytes(op.length)


def check_map(chain: vhdcore.Chain, model: ChainModel) -> None:
    owners = owners_from_extents(chain.map(), model.virtual_size, chain.depth)
    for s, owner in enumerate(owners):
        allowed = model.allowed_owners(s)
        assert owner in allowed, (
            f"map names layer depth {owner} for sector {s} (byte {s * SECTOR}); the model allows {allowed} "
            f"(last writer depth {model.top_writer[s]}, chain depth {chain.depth})"
        )
        if owner is None:
            assert not any(model.data[s * SECTOR : (s + 1) * SECTOR]), f"sector {s} mapped to no layer is not zero"


def check_diff(old: Path, old_bytes: bytes, old_depth: int, new: Path, model: ChainModel) -> None:
    expected = diff_ranges(old_bytes, bytes(model.data))
    d = vhdcore.diff(str(old), str(new))
    assert_ranges_shape(d.ranges, model.virtual_size)
    assert [tuple(r) for r in d.ranges] == expected, f"diff({old.name}, {new.name})"
    assert d.total == sum(length for _, length in expected)
    assert d.shared_layers == old_depth, "every layer of the old chain is shared with the new one"
    back = vhdcore.diff(str(new), str(old))
    assert [tuple(r) for r in back.ranges] == expected, "diff is symmetric in its ranges"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
@given(scenarios())
def test_random_chains_match_the_model(scenario: tuple[str, int, int, list[Op]]) -> None:
    disk_type, block, requested, ops = scenario
    with tempfile.TemporaryDirectory(prefix="vhdprop-") as tmp:
        folder = Path(tmp)
        base = folder / "layer0.vhd"
        if disk_type == "fixed":
            layer = vhdcore.create(str(base), requested, "fixed")
        else:
            layer = vhdcore.create(str(base), requested, "dynamic", block)
        size = layer.virtual_size
        assert size == (requested + SECTOR - 1) // SECTOR * SECTOR
        model = ChainModel(size, "fixed" if disk_type == "fixed" else "dynamic", block)
        leaf = base
        frozen: list[tuple[Path, bytes, int]] = []  # (old leaf, its content, its chain depth)
        for op in ops:
            if isinstance(op, Snapshot):
                child = folder / f"layer{model.depth}.vhd"
                content = model.snapshot()
                frozen.append((leaf, content, model.depth - 1))
                created = vhdcore.snapshot(str(leaf), str(child))
                assert created.disk_type == "differencing"
                leaf = child
            else:
                data = payload_for(op, model)
                vhdcore.write(str(leaf), op.offset, data)
                model.write(op.offset, data)

        event(f"depth {model.depth}")
        chain = vhdcore.open_chain(str(leaf))
        assert chain.depth == model.depth
        assert chain.virtual_size == size
        assert chain.warnings == [], "a chain vhdcore wrote itself has no stale or zero parent timestamps"
        assert [Path(x.path).name for x in chain.layers] == [f"layer{i}.vhd" for i in range(model.depth - 1, -1, -1)]

        out = folder / "flat.raw"
        chain.export(str(out), "raw")
        assert out.read_bytes() == bytes(model.data), "export raw differs from the model"
        rng = random.Random(size)
        for _ in range(4):
            off = rng.randrange(size)
            length = rng.randrange(1, min(size - off, 3 * block) + 1)
            assert chain.read(off, length) == bytes(model.data[off : off + length]), f"read({off}, {length})"
        assert pyvhd.PyChain(leaf).flatten() == bytes(model.data), "the reference reader disagrees"

        check_map(chain, model)

        if frozen:
            picks = {0, len(frozen) - 1, rng.randrange(len(frozen))}
            for i in sorted(picks):
                old, content, depth = frozen[i]
                check_diff(old, content, depth, leaf, model)
        same = vhdcore.diff(str(leaf), str(leaf))
        assert same.ranges == [] and same.total == 0
